"""Dispatch: Triton on CUDA tensors, torch reference elsewhere (provisional: reference only)."""
from __future__ import annotations

from .reference import latent_normalize_ref, linear_cross_entropy_ref, modulated_norm_ref


def modulated_norm(x, weight, bias, dw, shift, eps: float, kind: str):
    return modulated_norm_ref(x, weight, bias, dw, shift, eps, kind)


def latent_normalize(u, eps: float = 1e-12):
    return latent_normalize_ref(u, eps)


def linear_cross_entropy(hidden, weight, targets, bias=None, softcap=None, logit_scale=None,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 1024):
    return linear_cross_entropy_ref(hidden, weight, targets, bias, softcap, logit_scale,
                                    ignore_index, reduction)
