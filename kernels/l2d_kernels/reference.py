"""Plain torch references: the meaning every kernel must reproduce."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORM_KINDS = ("rms", "rms_offset", "layer", "none")


def _acc(t):
    """At least float32: half inputs compute in float32, float64 stays float64 (test references)."""
    return t if t.dtype == torch.float64 else t.float()


def modulated_norm_ref(x, weight, bias, dw, shift, eps: float, kind: str):
    """``y = Norm(x) * (g + dw) + b + shift``, computed and returned in float32 (float64 stays).

    ``kind``: ``rms`` (g = w), ``rms_offset`` (Gemma, g = 1 + w), ``layer`` (LayerNorm with
    bias b), ``none`` (no normalisation, g = 1). ``dw`` and ``shift`` are per token.
    """
    xf = _acc(x)
    if kind == "rms" or kind == "rms_offset":
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    elif kind == "layer":
        n = F.layer_norm(xf, (xf.shape[-1],), eps=eps)
    elif kind == "none":
        n = xf
    else:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")
    if kind == "none" or weight is None:
        g = 1.0
    else:
        g = _acc(weight) + (1.0 if kind == "rms_offset" else 0.0)
    y = n * (g + _acc(dw)) + _acc(shift)
    if bias is not None and kind == "layer":
        y = y + _acc(bias)
    return y


def latent_normalize_ref(u, eps: float = 1e-12):
    """``z = sqrt(d) * u / ||u||`` per row: every latent has norm sqrt(d)."""
    uf = _acc(u)
    return math.sqrt(u.shape[-1]) * uf / uf.norm(dim=-1, keepdim=True).clamp_min(eps)


def head_logits_ref(hidden, weight, bias=None, softcap=None, logit_scale=None):
    logits = _acc(F.linear(hidden, weight, bias))
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def linear_cross_entropy_ref(hidden, weight, targets, bias=None, softcap=None, logit_scale=None,
                             ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy of ``hidden @ weight.T`` (+ bias, scale, soft-cap) against ``targets``."""
    logits = head_logits_ref(hidden, weight, bias, softcap, logit_scale)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
