"""The one dispatch point: Triton on CUDA tensors, the plain torch path everywhere else.

Backend switch, read once from ``L2D_KERNELS`` and changeable with ``set_backend``:

- ``auto`` (default): Triton for CUDA tensors when Triton imports, torch otherwise.
- ``torch``: always the torch path (the meaning every kernel reproduces).
- ``triton``: always Triton. On CPU tensors that needs ``TRITON_INTERPRET=1`` set before Triton is
  imported (that is how the tests run the kernels); otherwise it raises.

Triton is imported lazily, so ``import l2d_kernels`` works without it.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from .cross_entropy import linear_cross_entropy_chunked
from .modulated_norm_torch import modulated_norm_torch
from .reference import NORM_KINDS, latent_normalize_ref

BACKENDS = ("auto", "torch", "triton")


def _check(name: str) -> str:
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS} "
                         "(set through L2D_KERNELS or l2d_kernels.set_backend)")
    return name


_backend = _check(os.environ.get("L2D_KERNELS", "auto"))


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> str:
    """Select ``auto``, ``torch`` or ``triton``; returns the previous backend."""
    global _backend
    previous, _backend = _backend, _check(name)
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("torch"): ...`` for tests and benchmarks."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Whether the kernels run in Triton for a tensor ``t`` under the current backend."""
    if _backend == "torch":
        return False
    if _backend == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("L2D_KERNELS=triton but triton is not installed (pip install triton)")
    if not t.is_cuda and not _interpreting():
        raise RuntimeError("L2D_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 set before "
                           "triton is imported; use 'auto' or 'torch' on the CPU")
    return True


def _triton_dtype_ok(*tensors) -> bool:
    return all(t is None or t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)


def modulated_norm(x, weight, bias, dw, shift, eps: float, kind: str, out_dtype=torch.float32):
    """``y = Norm(x) * (g + dw) + b + shift`` (see ``reference.modulated_norm_ref``); float32 by default.

    ``kind``: ``rms``, ``rms_offset`` (Gemma ``1 + w``), ``layer`` (LayerNorm, ``bias`` may be None)
    or ``none``. ``x``, ``dw``, ``shift``: ``[..., H]``; ``weight``, ``bias``: ``[H]`` or None.
    The gradient of ``weight``/``bias`` is computed only when they require grad.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")
    from_triton = use_triton(x) and _triton_dtype_ok(x, weight, bias, dw, shift)
    if from_triton:
        from .modulated_norm_triton import MAX_HIDDEN, modulated_norm_triton
        from_triton = x.shape[-1] <= MAX_HIDDEN
    if from_triton:
        return modulated_norm_triton(x, weight, bias, dw, shift, eps, kind, out_dtype)
    return modulated_norm_torch(x, weight, bias, dw, shift, eps, kind).to(out_dtype)


def latent_normalize(u, eps: float = 1e-12):
    """``z = sqrt(d) * u / max(||u||, eps)`` per row, float32: every latent has norm ``sqrt(d)``."""
    if use_triton(u) and _triton_dtype_ok(u):
        from .latent_norm_triton import latent_normalize_triton
        return latent_normalize_triton(u, eps)
    return latent_normalize_ref(u, eps)


def linear_cross_entropy(hidden, weight, targets, bias=None, softcap=None, logit_scale=None,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None):
    """Cross-entropy of the head ``hidden @ weight.T (+ bias)``, scaled and soft-capped if asked.

    Chunked over tokens on every backend (``chunk_size`` tokens at a time; by default so that a
    chunk holds at most 2^25 logits); the per-chunk softmax step runs in Triton on CUDA. Gradients
    go to ``hidden`` and to ``weight``/``bias`` only when they require grad.
    """
    chunk_fn = None
    if use_triton(hidden) and _triton_dtype_ok(hidden, weight):
        from .cross_entropy_triton import chunk_loss_grad_triton
        chunk_fn = chunk_loss_grad_triton
    kwargs = {} if chunk_fn is None else {"chunk_fn": chunk_fn}
    return linear_cross_entropy_chunked(hidden, weight, targets, bias, softcap, logit_scale,
                                        ignore_index, reduction, chunk_size, **kwargs)
