"""The optimizer of a training run: AdamW groups (each part of the path at its own rate, LoRA+) and
the learning-rate schedule (linear warmup, then cosine or linear decay to ``min_lr``)."""
from __future__ import annotations

import math

from .recipe import Recipe


def lr_at(step: int, total: int, t) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr + (t.lr - t.min_lr) * shape


# Groups of path parameters that train at their own rate (names as in L2DModel.named_parameters).
PARTS = {
    "heads": (".adaln.", "path.merge.", "path.conditioning."),  # see only t and the class
    "encoder": ("path.encoder.", "path.latent."),                # read the noisy latent x_t and z_hat
}


def part_of(name: str) -> str:
    """``heads``, ``encoder`` or ``deltas`` (everything else: low-rank or full deltas, k/v deltas)."""
    for part, keys in PARTS.items():
        if any(k in name for k in keys):
            return part
    return "deltas"


def lr_scales(recipe: Recipe) -> dict:
    """Learning-rate multiplier per part (all 1 for the baselines)."""
    t = recipe.train
    if recipe.method != "l2d":
        return {"deltas": 1.0}
    return {"heads": t.head_lr_scale, "encoder": t.encoder_lr_scale, "deltas": 1.0}


def freeze_parts(model, parts) -> None:
    """Stop training the named parts (a part whose lr scale is 0)."""
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)


def is_up_projection(name: str) -> bool:
    """The ``B`` of a low-rank delta ``B A x``: l2d's (``...B``) or peft's (``...lora_B...``)."""
    return name.endswith(".B") or ".lora_B." in name


def optimizer_groups(model, recipe: Recipe) -> list[dict]:
    """AdamW groups: no weight decay on vectors; for l2d, each part at its own rate (:func:`lr_scales`);
    the ``B`` of every low-rank delta at ``train.loraplus_lr_ratio`` times its part's rate.

    The heads (per-block adaLN, merge, time MLP, class embedding) see only ``t`` and the class.
    AdamW moves every weight by about ``lr`` per step whatever the gradient's size, so a head's
    output (fan-in ``cond_dim``, inputs of order one) can move by about ``lr * cond_dim`` per
    step, for every token alike: the heads learn a bias towards frequent answers long before the
    deltas learn to read the context (benchmarks/README.md, "Sample efficiency"). A smaller rate,
    or 0 (frozen, see ``build_model``), keeps them from doing so.

    LoRA+: with ``B = 0`` at init a delta ``B A x`` grows only as fast as ``B`` learns, while ``A``
    (random, wide) barely needs to move; a higher rate for ``B`` learns features faster.
    """
    t = recipe.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = lr_scales(recipe)
    split_up = t.loraplus_lr_ratio != 1  # (one rate: the groups of earlier checkpoints, which still resume)
    buckets = {}  # (part, is B, decayed) -> params
    for n, p in named:
        part = part_of(n) if recipe.method == "l2d" else "deltas"
        buckets.setdefault((part, split_up and is_up_projection(n), p.dim() >= 2), []).append(p)
    order = list(scales)  # groups in a fixed order: part, then A before B, then decayed first
    return [{"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
             "lr_scale": scales[part] * (t.loraplus_lr_ratio if up else 1.0)}
            for (part, up, decay), ps in sorted(buckets.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1],
                                                                                   not kv[0][2]))]
