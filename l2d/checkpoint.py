"""Training checkpoints: written atomically, the last K kept, nothing unpickled.

A checkpoint is a folder `checkpoints/step-000120/` holding

    trainable.safetensors   the trainable weights, by parameter name
    optimizer.safetensors   AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, data position, schedule, optimizer hyper-parameters, recipe
                            and base fingerprints, python/numpy RNG states

It is written into a hidden temporary sibling folder and renamed into place, so a crash or a
Ctrl-C mid-write never leaves a half checkpoint where `latest_checkpoint` would find it.

Also here: :func:`check_resume` (a checkpoint resumes only under the recipe and base that wrote it)
and :class:`MetricSinks` (the run folder's metrics.jsonl, tensorboard, wandb).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import REMOVED_OPTIONS
from .recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | Path) -> Path | None:
    """`path` itself when it is a checkpoint folder, else the newest checkpoint of the run at `path`."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


# ------------------------------------------------------------------------------ optimizer state
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, meta = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                meta[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": meta}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ------------------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    extra = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        extra["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, extra


def set_rng_state(tensors: dict, extra: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    py = extra.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    if extra.get("numpy"):
        import numpy as np

        kind, keys, pos, has_gauss, cached = extra["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------ save / load
def save_checkpoint(output_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically (temp folder, then rename) and keep the last `keep_last`.

    `optimizer` None (and `weights` empty): FSDP / DeepSpeed runs, whose sharded weights and optimizer
    state accelerate writes beside this folder's step, data position and RNG state."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = optimizer_tensors(optimizer) if optimizer is not None else ({}, None)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_extra = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        payload = {**state, "step": step, "optimizer": opt_meta, "rng": rng_extra}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1))
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict, dict]:
    """(weights, optimizer tensors, state, rng tensors, rng extra) of the checkpoint folder `path`."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(path / "trainable.safetensors")
        opt = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt ({e})") from e
    return weights, opt, state, rng, state.get("rng", {})


# Recipe keys that must match for --resume (the rest, e.g. lr or micro_batch_size, may change).
# The lr scales are stored in the optimizer's groups, which a resume restores: they must match too.
_RESUME_KEYS = ("model.name_or_path", "model.revision", "method", "l2d", "lora", "mdm", "data",
                "train.batch_size", "train.seed", "train.group_by_length", "train.epochs",
                "train.head_lr_scale", "train.encoder_lr_scale", "train.loraplus_lr_ratio")
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training stopped on a problem (non-finite loss, bad resume directory, too little data)."""


def _resume_values(d: dict) -> dict:
    """The values at :data:`_RESUME_KEYS` of a recipe dict (None where it has none)."""
    out = {}
    for key in _RESUME_KEYS:
        node = d
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def _source_defaults() -> dict:
    """Every :class:`l2d.data.DataSource` field but ``name`` at its default."""
    from .data import DataSource

    return {k: v for k, v in dataclasses.asdict(DataSource(name="")).items() if k != "name"}


def _recipe_view(d: dict) -> dict:
    """What must match for a resume. Keys a checkpoint's recipe predates (a field added to a section,
    or to a data source, since) read as today's defaults, which the run used, so older checkpoints
    still resume."""
    out, saved = {}, _resume_values(d)
    for key, default in _resume_values(Recipe().to_dict()).items():
        value = saved[key]
        if isinstance(value, dict) and isinstance(default, dict):
            if key == "l2d":  # options removed since, at their old defaults (as every such run had them)
                value = {k: v for k, v in value.items() if not (k in REMOVED_OPTIONS and v == REMOVED_OPTIONS[k])}
            value = {**default, **value}
        out[key] = default if value is None else value
    sources = out["data"].get("sources")
    if isinstance(sources, list):
        out["data"] = {**out["data"], "sources": [{**_source_defaults(), **s} if isinstance(s, dict) else s
                                                  for s in sources]}
    if d.get("method") != "lora":
        out.pop("lora")
    if d.get("method") != "mdm":
        out.pop("mdm")
    return out


def check_resume(saved_state: dict, recipe: Recipe, fingerprint: dict, where: Path) -> None:
    """Raise when the checkpoint at `where` comes from another recipe or base model."""
    saved, now = _recipe_view(saved_state.get("recipe", {})), _recipe_view(recipe.to_dict())
    diffs = [f"{k}: checkpoint {json.dumps(saved.get(k))[:120]} vs recipe {json.dumps(now.get(k))[:120]}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if saved_state.get("base") != fingerprint:
        diffs.append(f"base model: checkpoint {saved_state.get('base')} vs now {fingerprint}")
    if diffs:
        raise TrainingError(f"cannot resume from {where}: it was written by another recipe or base model ("
                            + "; ".join(diffs) + "). Resume with the recipe that wrote it, or start a new "
                            "output_dir.")


class MetricSinks:
    """metrics.jsonl (always) plus tensorboard / wandb when installed and asked for."""

    def __init__(self, output_dir: Path, recipe: Recipe, keep_until: int | None):
        self.path = output_dir / METRICS_FILE
        lines = []
        if keep_until is not None and self.path.is_file():  # resume: drop what came after the checkpoint
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= keep_until]
        self.path.write_text("".join(ln + "\n" for ln in lines))
        self.tb = self.wandb = None
        if "tensorboard" in recipe.train.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                logger.warning("report_to tensorboard: tensorboard is not installed; logging to %s only", self.path)
        if "wandb" in recipe.train.report_to:
            try:
                import wandb

                self.wandb = wandb.init(project="l2d", config=recipe.to_dict(), dir=str(output_dir),
                                        resume="allow")
            except ImportError:
                logger.warning("report_to wandb: wandb is not installed; logging to %s only", self.path)

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
