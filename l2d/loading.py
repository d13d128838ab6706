"""Load what training wrote: ADAPTER is an L2D adapter folder (l2d_config.json), a masked-diffusion
model (mdm_config.json), a peft adapter folder (adapter_config.json, e.g. the LoRA baseline of
``l2d train``), a full model folder (config.json), or ``base`` for the base model alone. The base
comes from ``--base``, else the adapter's recipe.yaml, else its own config.
"""
from __future__ import annotations

import json
from pathlib import Path

BASE_ONLY = ("base", "none")


def adapter_kind(path: str) -> str:
    """``base``, ``l2d``, ``mdm``, ``peft`` or ``full`` for an ADAPTER argument."""
    if path.lower() in BASE_ONLY:
        return "base"
    p = Path(path)
    if (p / "mdm_config.json").is_file():  # a masked-diffusion model (l2d.mdm): a model or peft folder too
        return "mdm"
    if (p / "l2d_config.json").is_file():
        return "l2d"
    if (p / "adapter_config.json").is_file():
        return "peft"
    if (p / "config.json").is_file():
        return "full"
    raise FileNotFoundError(f"{path!r} holds no l2d_config.json, adapter_config.json or config.json; pass an "
                            "adapter folder written by `l2d train`, a model folder, or `base`.")


def default_base(path: str, kind: str) -> str | None:
    """The base an adapter was trained on: its recipe.yaml, else its own config."""
    p = Path(path)
    if kind in ("base", "full"):
        return None
    recipe = p / "recipe.yaml"
    if recipe.is_file():
        import yaml

        try:
            name = ((yaml.safe_load(recipe.read_text()) or {}).get("model") or {}).get("name_or_path")
        except (yaml.YAMLError, AttributeError) as e:
            raise ValueError(f"{recipe} is not a readable recipe ({e}); fix it or pass --base.") from None
        if name:
            return name
    cfg = p / {"l2d": "l2d_config.json", "mdm": "mdm_config.json"}.get(kind, "adapter_config.json")
    try:
        saved = json.loads(cfg.read_text())
        return (saved.get("config", saved) if kind == "mdm" else saved).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON ({e}): the file is corrupt; re-save the adapter "
                         "(save_pretrained) or download it again.") from None


def load_trained(adapter: str, base: str | None = None, dtype: str = "float32"):
    """``(model, tokenizer, kind)``: the model of ADAPTER on its base, in eval mode (``l2d generate``,
    ``l2d eval``)."""
    from .pretrained import DTYPES, dtype_named, load_base

    kind = adapter_kind(adapter)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use --dtype {', '.join(DTYPES)}.")
    torch_dtype = dtype_named(dtype)
    if kind == "mdm":
        from .mdm.model import load_for_eval as load_mdm

        return (*load_mdm(adapter, base, torch_dtype), kind)
    if kind == "full":
        model, tok = load_base(base or adapter, dtype=torch_dtype)
        return model, tok, kind
    base = base or default_base(adapter, kind)
    if base is None:
        raise ValueError("no base model: pass --base (a hub id, a local folder or smollm2-135m-instruct).")
    base_model, tok = load_base(base, dtype=torch_dtype)
    if kind == "base":
        return base_model, tok, kind
    if kind == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, adapter).eval(), tok, kind
    from .model import L2DModel

    return L2DModel.from_pretrained(base_model, adapter), tok, kind
