"""Training checkpoints: written atomically, the last K kept, nothing unpickled.

A checkpoint is a folder `checkpoints/step-000120/` holding

    trainable.safetensors   the trainable weights, by parameter name
    optimizer.safetensors   AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, data position, schedule, optimizer hyper-parameters, recipe
                            and base fingerprints, python/numpy RNG states

It is written into a hidden temporary sibling folder and renamed into place, so a crash or a
Ctrl-C mid-write never leaves a half checkpoint where `latest_checkpoint` would find it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
