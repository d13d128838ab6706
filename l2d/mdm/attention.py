"""Attention of the adapted model: causal, annealed towards bidirectional, as a 4-D mask.

    padding mask [B, T] + opening ratio r -> allowed[b, q, k] = key k real and (k <= q or open[b, q, k])
    -> additive float mask [B, 1, T, T] (0 allowed, dtype min elsewhere) -> transformers' attention

transformers passes a 4-D mask through to the attention function as it is (eager adds it, sdpa
takes it as ``attn_mask``), so no modelling file is forked. Positions come from the padding mask
(``cumsum - 1``), so left-padded prompts keep the positions they have without padding.
"""
from __future__ import annotations

import torch

from .config import MaskedDiffusionConfig

# Backends that ignore an arbitrary dense mask; the adaptation needs one.
UNSUPPORTED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def opening_ratio(step: int | None, config: MaskedDiffusionConfig) -> float:
    """Probability that a future (query, key) pair is open at training step ``step`` (0-based).

    ``min(1, (step + 1) / anneal_steps)``, as the authors' trainer counts it; 1 when ``anneal_steps``
    is 0 or ``step`` is None (evaluation and generation are fully bidirectional).
    """
    if config.anneal_steps == 0 or step is None:
        return 1.0
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0, (step + 1) / config.anneal_steps)


def allowed_pairs(attention_mask: torch.Tensor, ratio: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean [B, T, T]: whether query ``q`` may attend to key ``k``.

    Causal pairs are always open; each future pair independently with probability ``ratio`` (one
    draw per sequence, query and key); padding keys never. A query at a padding position still sees
    the real keys (its output is never used), so no row is empty.
    """
    B, T = attention_mask.shape
    device = attention_mask.device
    keys = attention_mask.bool()[:, None, :]                               # [B, 1, T]
    if ratio >= 1.0:
        return keys.expand(B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if ratio <= 0.0:
        return causal[None] & keys
    opened = torch.rand((B, T, T), device=device, generator=generator) < ratio
    return (causal[None] | opened) & keys


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, T] booleans -> [B, 1, T, T] additive mask (0 where allowed, the dtype's minimum elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] from a padding mask: real tokens count 0, 1, ... ; padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_attention_backend(model) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in UNSUPPORTED_ATTENTION:
        raise ValueError(f"attention implementation {impl!r} cannot take the 4-D mask that masked diffusion "
                         "needs (bidirectional, annealed); load the base with attn_implementation='sdpa' "
                         "or 'eager'.")
