"""Adapter files: ``l2d_config.json`` and ``l2d_model.safetensors`` (the path's weights only).

Written atomically (a temporary file renamed into place), with the l2d version and the base's
fingerprint; read from a local folder or the hub, checked against the base and the config.
"""
from __future__ import annotations

import os

from torch import nn

from . import __version__
from .arch import ArchAdapter
from .config import CONFIG_NAME, WEIGHTS_NAME, L2DConfig


def write_adapter(model, save_directory: str, state_dict: dict | None = None) -> None:
    """Write ``model``'s config and path weights (or ``state_dict``'s, see ``L2DModel.save_pretrained``)."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    if state_dict is None:
        state_dict = model.path.state_dict()
    elif any(k.startswith("path.") for k in state_dict):
        state_dict = {k[len("path."):]: v for k, v in state_dict.items() if k.startswith("path.")}
    missing = sorted(set(model.path.state_dict()) - set(state_dict))
    if missing:
        raise ValueError(f"state_dict lacks path weights {missing[:5]}: pass the whole model's state dict "
                         "(keys 'path.*') or the path's own.")
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    weights = os.path.join(save_directory, WEIGHTS_NAME)
    tmp = weights + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "l2d_version": __version__})
    os.replace(tmp, weights)
    extra = {"l2d_version": __version__, "base_fingerprint": model.arch.fingerprint()}
    revision = getattr(model.base_model.config, "_commit_hash", None)
    if revision and not model.config.base_model_revision:
        model.config.base_model_revision = revision
    model.config.save(save_directory, extra)


def read_adapter(base_model: nn.Module, adapter: str, revision=None, **hub_kwargs):
    """``(config, weights, weights path)`` of the adapter in a local folder or hub repo ``adapter``,
    after checking that it was trained for ``base_model``."""
    directory = _resolve_adapter(adapter, revision, **hub_kwargs)
    config, extra = L2DConfig.load(directory)
    _check_fingerprint(extra.get("base_fingerprint"), ArchAdapter(base_model).fingerprint(), directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r}; the adapter is incomplete.")
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{weights} could not be read as safetensors ({e}); the file is corrupt "
                         "or truncated: re-save or re-download the adapter.") from e
    return config, state, weights


def check_weights_fit(state: dict, expected: dict, weights: str) -> None:
    """Raise when the saved weights' names or shapes differ from the path's."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{weights} does not fit this base and config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}.")


def _resolve_adapter(adapter: str, revision=None, **hub_kwargs) -> str:
    if os.path.isdir(adapter):
        return adapter
    if os.path.exists(adapter):
        raise ValueError(f"{adapter!r} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(adapter, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **hub_kwargs)
    except Exception as e:
        raise FileNotFoundError(f"No local folder {adapter!r} and it could not be fetched from the hub ({e}).") from e


def _check_fingerprint(saved: dict | None, current: dict, directory: str) -> None:
    if not saved:
        return
    diffs = [f"{k}: adapter {saved[k]!r} vs base {current.get(k)!r}" for k in saved if saved[k] != current.get(k)]
    if diffs:
        raise ValueError(f"The adapter in {directory!r} was trained for another base model ("
                         + "; ".join(diffs) + "). Load it onto the base it was trained with.")
