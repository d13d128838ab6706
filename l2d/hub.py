"""Sharing an adapter on the Hugging Face Hub: the files, and a model card that says what they are.

    model.push_to_hub("me/smollm2-l2d-arith", recipe="runs/x/recipe.yaml", eval_results="runs/x/eval.json")
    l2d train recipes/smollm2-135m/arithmetic.yaml --push-to-hub me/smollm2-l2d-arith

What goes up: ``l2d_config.json`` and ``l2d_model.safetensors`` (as ``save_pretrained`` writes
them), ``recipe.yaml`` when the training recipe is known, and ``README.md``, a model card whose
metadata (base model, library, tags) the hub indexes and whose text says how to load the adapter
with ``L2DModel.from_pretrained``, the recipe, and the evaluation table when there is one. A
baseline folder of ``l2d train`` (peft LoRA or full weights) goes up with its own files and a
shorter card. ``api`` is an ``huggingface_hub.HfApi`` (tests pass a fake one).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .config import CONFIG_NAME, WEIGHTS_NAME, L2DConfig

RECIPE_FILE = "recipe.yaml"
CARD_FILE = "README.md"
TAGS = ["l2d", "lm-to-diffusion", "diffusion", "adapter"]
PAPER = "https://github.com/SakanaAI/L2D"  # the paper's reference code
# Files of a baseline's output folder worth sharing (checkpoints/ and logs stay home).
BASELINE_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
                  "model.safetensors", "model.safetensors.index.json", "model-*.safetensors", "tokenizer*",
                  "special_tokens_map.json", "chat_template.jinja", RECIPE_FILE, CARD_FILE)


def hub_base_id(name: str | None) -> str | None:
    """The hub id of a base name: the offline alias of SmolLM2 maps to its hub repository."""
    from .pretrained import SMOLLM2_HUB_ID, SMOLLM2_NAME

    return SMOLLM2_HUB_ID if name and name.lower() == SMOLLM2_NAME else name


def read_recipe(recipe) -> str | None:
    """The recipe as YAML text, from a :class:`~l2d.recipe.Recipe`, a mapping, a YAML file or text."""
    import yaml

    if recipe is None:
        return None
    if hasattr(recipe, "to_yaml"):
        return recipe.to_yaml()
    if isinstance(recipe, dict):
        return yaml.safe_dump(recipe, sort_keys=False)
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and os.path.isfile(recipe)):
        return Path(recipe).read_text()
    return str(recipe)


def read_eval_rows(eval_results) -> list[dict] | None:
    """Evaluation rows from :func:`l2d.eval.runner.evaluate` or the JSON that ``l2d eval --json`` writes."""
    if eval_results is None:
        return None
    if isinstance(eval_results, (str, Path)):
        try:
            eval_results = json.loads(Path(eval_results).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{eval_results} is not valid JSON ({e}): pass the file `l2d eval --json` wrote.") from None
    rows = eval_results.get("rows") if isinstance(eval_results, dict) else eval_results
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "accuracy" in r for r in rows):
        raise ValueError("eval_results: expected evaluation rows (l2d.eval.runner.evaluate) or the JSON of "
                         "`l2d eval --json`.")
    return rows


def markdown_table(rows: list[dict]) -> str:
    """A GitHub-flavoured markdown table; the header is the union of the rows' keys."""
    headers = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: "" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(r.get(h)) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def eval_table(rows: list[dict]) -> str:
    """Accuracy, interval and NFE per token by method, task and steps (an adaptive row shows its solver)."""
    out = []
    for r in rows:
        out.append({"method": r.get("method"), "task": r.get("task"),
                    "steps": r.get("solver") if r.get("steps") is None else r["steps"], "n": r.get("n"),
                    "accuracy %": round(100 * r["accuracy"], 1),
                    "95% CI": f"[{100 * r['low']:.1f}, {100 * r['high']:.1f}]" if "low" in r else None,
                    "NFE/token": round(r.get("nfe_per_token") or 0.0, 2)})
    return markdown_table(out)


def model_card(config: L2DConfig, repo_id: str, recipe: str | None = None, eval_rows: list[dict] | None = None,
               trainable_parameters: int | None = None, tags: list[str] | None = None) -> str:
    """README.md of an L2D adapter: hub metadata, what it is, how to load it, recipe and results."""
    from huggingface_hub import ModelCardData

    base = hub_base_id(config.base_model_name_or_path)
    tags = list(dict.fromkeys(TAGS + list(tags or []) + ["text-generation"]))
    meta = ModelCardData(base_model=base, library_name="l2d", tags=tags,
                         pipeline_tag="text-generation").to_yaml()
    params = f" ({trainable_parameters:,d} trainable parameters)" if trainable_parameters else ""
    parts = [f"---\n{meta}\n---", f"# {repo_id.split('/')[-1]}",
             f"An [L2D]({PAPER}) (LM-to-diffusion) adapter for `{base or 'its base model'}`: a small diffusion "
             f"path{params} trained beside the frozen base. For every generated token it integrates an ODE over "
             "the token's latent; more steps buy more accuracy, and `steps=0` is exactly the base model.",
             "## How to load", _load_snippet(base, repo_id),
             "## Adapter", markdown_table([_config_summary(config)])]
    if eval_rows:
        parts += ["## Evaluation", eval_table(eval_rows)]
    if recipe:
        parts += ["## Training recipe", "Train it again with `l2d train recipe.yaml`:",
                  f"```yaml\n{recipe.rstrip()}\n```"]
    parts += ["## Citation", "Cetin, Zhao, Tang. *Large Language Models to Diffusion Finetuning*, 2025 "
              f"(reference code: {PAPER})."]
    return "\n\n".join(parts) + "\n"


def _load_snippet(base: str | None, repo_id: str) -> str:
    base = base or "BASE_MODEL_ID"
    return f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from l2d import L2DModel   # pip install l2d

base = AutoModelForCausalLM.from_pretrained("{base}")
tok = AutoTokenizer.from_pretrained("{base}")
model = L2DModel.from_pretrained(base, "{repo_id}")
enc = tok.apply_chat_template([{{"role": "user", "content": "What is 17 + 25?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=64, steps=8)
print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def _config_summary(config: L2DConfig) -> dict:
    keys = ("latent_dim", "sigma", "path_variant", "rank", "context", "stream_layers", "stream_init", "merge_init",
            "num_classes", "base_model_revision")
    d = config.to_dict()
    return {k: d[k] for k in keys if k in d}


def _count_weights(path: Path) -> int:
    """Numbers stored in a safetensors file, read from its header (nothing is loaded)."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def baseline_card(kind: str, base: str | None, repo_id: str, recipe: str | None) -> str:
    """README.md of a LoRA (peft) or full fine-tune baseline that ``l2d train`` wrote."""
    from huggingface_hub import ModelCardData

    base = hub_base_id(base)
    library = "peft" if kind == "peft" else "transformers"
    meta = ModelCardData(base_model=base, library_name=library, tags=["l2d-baseline", "lora" if kind == "peft"
                         else "full-finetune", "text-generation"], pipeline_tag="text-generation").to_yaml()
    what = "A LoRA (peft) adapter" if kind == "peft" else "A fully fine-tuned copy"
    parts = [f"---\n{meta}\n---", f"# {repo_id.split('/')[-1]}",
             f"{what} of `{base}`, trained by `l2d train` as the baseline of an [L2D]({PAPER}) adapter."]
    if recipe:
        parts += ["## Training recipe", f"```yaml\n{recipe.rstrip()}\n```"]
    return "\n\n".join(parts) + "\n"


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, recipe=None, eval_results=None, revision: str | None = None,
                create_pr: bool = False, tags: list[str] | None = None, api=None):
    """Upload an adapter folder (``save_pretrained`` or ``l2d train`` output) with a generated card.

    The card is written into a copy, never into ``folder``. Returns the hub's commit info.
    """
    folder = Path(folder)
    recipe_text = read_recipe(recipe if recipe is not None else (
        folder / RECIPE_FILE if (folder / RECIPE_FILE).is_file() else None))
    rows = read_eval_rows(eval_results)
    if (folder / CONFIG_NAME).is_file():
        config, extra = L2DConfig.load(str(folder))
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"No {WEIGHTS_NAME} in {folder}: save the adapter before pushing it.")
        files = [CONFIG_NAME, WEIGHTS_NAME]
        card = model_card(config, repo_id, recipe_text, rows, _count_weights(folder / WEIGHTS_NAME), tags)
    else:
        from .loading import adapter_kind, default_base

        kind = adapter_kind(str(folder))
        files = sorted({p.name for pattern in BASELINE_FILES for p in folder.glob(pattern)} - {RECIPE_FILE, CARD_FILE})
        card = baseline_card(kind, default_base(str(folder), kind), repo_id, recipe_text)
    return _upload(folder, files, card, recipe_text, repo_id, private=private, token=token, revision=revision,
                   commit_message=commit_message or "Upload L2D adapter", create_pr=create_pr, api=api)


def _upload(folder: Path, files: list[str], card: str, recipe_text: str | None, repo_id: str, *, private, token,
            revision, commit_message, create_pr, api):
    import shutil

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="l2d-push-") as staging:
        for name in files:
            shutil.copy2(folder / name, Path(staging) / name)
        if recipe_text:
            (Path(staging) / RECIPE_FILE).write_text(recipe_text)
        (Path(staging) / CARD_FILE).write_text(card)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model", revision=revision,
                                 commit_message=commit_message, create_pr=create_pr)


def push_to_hub(model, repo_id: str, **kwargs):
    """:meth:`L2DModel.push_to_hub`: save the adapter to a temporary folder and push that."""
    with tempfile.TemporaryDirectory(prefix="l2d-save-") as folder:
        model.save_pretrained(folder)
        kwargs.setdefault("tags", getattr(model, "model_tags", None))  # e.g. TRL's "trl", "sft"
        return push_folder(folder, repo_id, **kwargs)
