"""Training recipes: one YAML file, five sections, every field typed and documented.

    model:  the frozen base (hub id, local folder, or `smollm2-135m-instruct` offline)
    method: l2d | lora | full | mdm    (the baselines and masked diffusion run through the same script and data)
    l2d:    L2DConfig fields           (the diffusion path; used when method is l2d)
    lora:   peft LoRA fields           (used when method is lora)
    mdm:    MaskedDiffusionConfig fields (used when method is mdm)
    data:   sources (l2d.data.DataSource fields), max_length, chat template, system prompt
    train:  optimisation, batching, checkpoints, logging

`load_recipe(path, overrides)` reads the YAML, applies `--set a.b=c` overrides (values parsed as
YAML), and checks every key and type: an unknown key or a wrong type raises a `RecipeError`
that names the key (`train.lr: expected float, got str 'fast'`).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import L2DConfig, drop_removed_options
from .data import DataSource
from .mdm.config import MaskedDiffusionConfig
from .suggest import did_you_mean

METHODS = ("l2d", "lora", "full", "mdm")
MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")


class RecipeError(ValueError):
    """A recipe key is unknown, has the wrong type, or is out of range."""


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ModelSection:
    name_or_path: str = field(default="smollm2-135m-instruct", metadata=_help(
        "Base causal LM: hub id, local folder, or `smollm2-135m-instruct` (offline copy)."))
    dtype: str = field(default="float32", metadata=_help(
        f"dtype the frozen base is loaded in {DTYPES}; the trainable weights stay float32."))
    revision: str | None = field(default=None, metadata=_help("Hub revision of the base."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow custom modelling code."))
    attn_implementation: str | None = field(default=None, metadata=_help(
        "transformers attention backend (sdpa, eager, flash_attention_2); default: transformers' choice."))


@dataclass
class LoraSection:
    r: int = field(default=32, metadata=_help("LoRA rank (method: lora)."))
    alpha: float = field(default=32.0, metadata=_help("LoRA alpha; the update is scaled by alpha / r."))
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))
    target_modules: str | list[str] = field(default="all-linear", metadata=_help(
        "Modules that get LoRA: `all-linear` or a list of module names."))


@dataclass
class DataSection:
    sources: list[DataSource] = field(default_factory=list, metadata=_help(
        "Data sources (see l2d.data.DataSource): name (hub id, local file or rg:<generator>), subset, "
        "split, n, seed, category, prompt_column, completion_column, messages_column, exclude, "
        "generator_kwargs, cot."))
    max_length: int = field(default=2048, metadata=_help(
        "Tokens per example; longer ones lose prompt tokens first, then response tokens."))
    chat_template: bool = field(default=True, metadata=_help(
        "Render with the tokenizer's chat template (false: raw prompt + completion + EOS)."))
    system_prompt: str | None = field(default=None, metadata=_help("System turn for prompt/completion data."))


@dataclass
class TrainSection:
    output_dir: str = field(default="runs/l2d", metadata=_help(
        "Where the adapter, recipe, metrics.jsonl and checkpoints/ go."))
    batch_size: int = field(default=32, metadata=_help(
        "Global batch: sequences per optimizer step, over all processes and accumulation steps."))
    micro_batch_size: int = field(default=4, metadata=_help(
        "Sequences per forward on one process; accumulation = batch_size / (micro_batch_size x processes)."))
    epochs: int = field(default=1, metadata=_help("Passes over the data (when max_steps is null)."))
    max_steps: int | None = field(default=None, metadata=_help(
        "Optimizer steps of the whole run (sets the schedule's length); null: epochs over the data."))
    lr: float = field(default=1e-4, metadata=_help("Peak learning rate (AdamW)."))
    min_lr: float = field(default=1e-6, metadata=_help("Learning rate at the end of the cosine decay."))
    warmup_steps: int = field(default=100, metadata=_help("Linear warmup from 0 to lr."))
    schedule: str = field(default="cosine", metadata=_help("Decay after warmup: cosine, linear or constant."))
    head_lr_scale: float = field(default=1.0, metadata=_help(
        "l2d only: learning-rate multiplier of the path's conditioning heads (per-block adaLN heads, merge "
        "head, time MLP, class embedding); the deltas train at lr, the encoder at encoder_lr_scale x lr. 0 freezes "
        "the heads (no gradients, no optimizer state): the path then sees t only through x_t / s(t) and "
        "the merge gate (use l2d.merge_init open or ramp), and class labels have no effect."))
    encoder_lr_scale: float = field(default=1.0, metadata=_help(
        "l2d only: learning-rate multiplier of the parts that read the noisy latent: the input encoder and "
        "the latent map. 0 freezes them; with l2d.merge_init open or ramp (encoder output zero at init) the "
        "path then never reads x_t and is a plain adapter of the last position (an ablation, not a method)."))
    loraplus_lr_ratio: float = field(default=1.0, metadata=_help(
        "Learning rate of the up-projections B of low-rank deltas (l2d's path, kv deltas, peft's lora_B) "
        "over that of the down-projections A, as LoRA+ (Hayou et al. 2024) sets it; peft calls it "
        "loraplus_lr_ratio. B starts at zero, so its rate sets how fast a delta grows. 1: one rate."))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=_help("AdamW betas."))
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW decoupled weight decay."))
    grad_clip: float = field(default=1.0, metadata=_help("Max global gradient norm (0 disables clipping)."))
    mixed_precision: str = field(default="no", metadata=_help(
        f"Autocast {MIXED_PRECISION}; bf16 on GPUs (an accelerate config's setting wins when launched)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute activations in backward (the diffusion blocks for l2d; the base's layers for lora/full)."))
    seed: int = field(default=0, metadata=_help("Seed of the model init, data order and noise."))
    group_by_length: bool = field(default=True, metadata=_help(
        "Batch examples of similar length together (less padding); batch order stays random."))
    save_every: int = field(default=500, metadata=_help("Checkpoint every N optimizer steps (0: only at the end/on stop)."))
    keep_last: int = field(default=2, metadata=_help("Checkpoints kept on disk (older ones are deleted)."))
    log_every: int = field(default=1, metadata=_help("Write metrics every N steps."))
    report_to: list[str] = field(default_factory=list, metadata=_help(
        "Extra metric sinks besides metrics.jsonl: tensorboard and/or wandb (when installed)."))
    progress_bar: bool = field(default=True, metadata=_help("Show a tqdm bar with loss, lr, tokens/s and ETA."))


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection, metadata=_help("The frozen base model."))
    method: str = field(default="l2d", metadata=_help(
        f"What is trained {METHODS}: the diffusion path, a peft LoRA of the base, the whole base, "
        "or the base adapted into a masked diffusion LM."))
    l2d: L2DConfig = field(default_factory=L2DConfig, metadata=_help("Diffusion path (L2DConfig fields)."))
    lora: LoraSection = field(default_factory=LoraSection, metadata=_help("LoRA baseline settings."))
    mdm: MaskedDiffusionConfig = field(default_factory=MaskedDiffusionConfig, metadata=_help(
        "Masked-diffusion adaptation (method: mdm; DiffuGPT / DiffuLLaMA), MaskedDiffusionConfig fields."))
    data: DataSection = field(default_factory=DataSection, metadata=_help("Training data."))
    train: TrainSection = field(default_factory=TrainSection, metadata=_help("Optimisation and bookkeeping."))

    def to_dict(self) -> dict:
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------ checking and building
def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """`value` checked against the annotation `tp`; dataclasses are built recursively."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except RecipeError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else RecipeError(
            f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if tp is DataSource and isinstance(value, str):  # `- rg:chain_sum` is short for `- name: rg:chain_sum`
            value = {"name": value}
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return build(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if type(value) is tp:
            return value
    raise RecipeError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build(cls, raw: dict, prefix: str = ""):
    """Instance of dataclass `cls` from a mapping; unknown keys and wrong types name the key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    where = f"{prefix}." if prefix else ""
    if cls is L2DConfig:  # recipes written before an option was removed hold it at its old default
        try:
            raw = drop_removed_options(raw, prefix or "l2d")
        except ValueError as e:
            raise RecipeError(str(e)) from None
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(f"unknown key {where}{unknown[0]}{did_you_mean(unknown[0], known)}"
                          f"{' (and ' + str(unknown[1:]) + ')' if unknown[1:] else ''}; "
                          f"known keys{' of ' + prefix if prefix else ''}: {sorted(known)}")
    kwargs = {k: _convert(v, hints[k], f"{where}{k}") for k, v in raw.items()}
    try:

        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a section's own range checks (L2DConfig.validate)
        raise RecipeError(f"{prefix or cls.__name__}: {e}") from e


def _check(recipe: Recipe) -> Recipe:
    t = recipe.train
    checks = [
        (recipe.method in METHODS, "method", f"must be one of {METHODS}, got {recipe.method!r}"),
        (recipe.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}"),
        (t.mixed_precision in MIXED_PRECISION, "train.mixed_precision", f"must be one of {MIXED_PRECISION}"),
        (t.schedule in ("cosine", "linear", "constant"), "train.schedule", "must be cosine, linear or constant"),
        (t.batch_size > 0, "train.batch_size", "must be positive"),
        (t.micro_batch_size > 0, "train.micro_batch_size", "must be positive"),
        (t.batch_size % t.micro_batch_size == 0, "train.batch_size",
         f"({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})"),
        (t.epochs > 0, "train.epochs", "must be positive"),
        (t.max_steps is None or t.max_steps > 0, "train.max_steps", "must be positive or null"),
        (t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.min_lr", "must lie in [0, train.lr] (and lr > 0)"),
        (t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (t.head_lr_scale >= 0, "train.head_lr_scale", "must be >= 0 (0 freezes the conditioning heads)"),
        (t.encoder_lr_scale >= 0, "train.encoder_lr_scale", "must be >= 0 (0 freezes the encoder and latent map)"),
        (t.loraplus_lr_ratio > 0, "train.loraplus_lr_ratio", "must be > 0 (1 trains A and B at one rate)"),
        (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)"),
        (t.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
        (t.grad_clip >= 0, "train.grad_clip", "must be >= 0"),
        (t.save_every >= 0, "train.save_every", "must be >= 0"),
        (t.keep_last >= 1, "train.keep_last", "must be >= 1"),
        (t.log_every >= 1, "train.log_every", "must be >= 1"),
        (all(r in ("tensorboard", "wandb") for r in t.report_to), "train.report_to",
         "entries must be tensorboard or wandb"),
        (recipe.data.max_length >= 2, "data.max_length", "must be >= 2"),
        (recipe.lora.r > 0, "lora.r", "must be positive"),
        (0 <= recipe.lora.dropout < 1, "lora.dropout", "must lie in [0, 1)"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise RecipeError(f"{key}: {message}")
    if not recipe.data.sources:
        raise RecipeError("data.sources: the recipe names no data source")
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=5e-5` -> (['train', 'lr'], 5e-05); the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=5e-5")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {text!r}: empty key")
    return parts, (_load_yaml(value) if value.strip() else None)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        parts, value = parse_override(text)
        node = raw
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def recipe_from_dict(raw: dict, overrides: list[str] | None = None) -> Recipe:
    raw = apply_overrides(copy.deepcopy(raw or {}), overrides or [])
    return _check(build(Recipe, raw))


def _load_yaml(text: str):
    """YAML, except that `1e-4` is a float (YAML 1.1 reads it as a string; a number is what anyone means)."""
    loader = type("L2DLoader", (yaml.SafeLoader,), {})
    import re

    loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d+\.\d*$|^[-+]?\.\d+$"),
        list("-+0123456789."))
    return yaml.load(text, Loader=loader)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides, check keys and types."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        raw = _load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from e
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, method, l2d, lora, data, train)")
    try:
        return recipe_from_dict(raw or {}, overrides)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from e


def describe(cls=Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, recursively: the documentation of a recipe."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        rows.append((key, repr(_plain(default)), f.metadata.get("help", "")))
    return rows
