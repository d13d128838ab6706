"""Token choice and per-row randomness for the token loop (``l2d/generation.py``).

Each row of a batch may carry its own ``torch.Generator`` (``seed + i``), so that a row's noise,
estimate samples and token do not depend on what it is batched with.
"""
from __future__ import annotations

import torch


def pick_token(logits, do_sample, temperature, top_k, top_p, generator):
    """Greedy or sampled next token from [B, V] logits (temperature, then top-k, then top-p)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return multinomial(torch.softmax(logits, -1), generator)[:, 0]


def row_generators(seed, generator, batch: int, device):
    """Per-row random streams, so a row's result does not depend on what it is batched with.

    ``seed`` may be an int (row ``i`` gets ``seed + i``) or one int per row; a single
    ``generator`` drives the whole batch; neither means torch's global RNG.
    """
    if generator is not None:
        return generator
    if seed is None:
        return None
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(batch)]
    if len(seeds) != batch:
        raise ValueError(f"seed has {len(seeds)} entries for a batch of {batch}.")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def randn(rngs, shape, device):
    if isinstance(rngs, list):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in rngs])
    return torch.randn(shape, generator=rngs, device=device)


def multinomial(probs, rngs):
    """One draw per row of ``probs`` [B, V] -> [B, 1]."""
    if isinstance(rngs, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, rngs)])
    return torch.multinomial(probs, 1, generator=rngs)
