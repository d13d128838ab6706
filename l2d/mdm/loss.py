"""The masked-diffusion loss: corrupt the response, predict the masked tokens, weigh by 1/t.

    t ~ U(eps, 1) per sequence;  each response token masked with probability t
    loss = sum_b sum_{i masked} CE(logits_{b, i-1}, y_{b, i}) / t_b   /   N

``N`` is the number of response tokens (``labels[:, 1:] != -100``), so the loss is the negative
ELBO of the absorbing-state diffusion per response token, and ``l2d train`` can sum micro-batches
and divide by the global batch's supervised count as for every other method. (The authors'
trainer divides the same weighted sum by the number of *masked* tokens instead.) The output at
``i-1`` predicts token ``i``: the pretrained head keeps its alignment. Prompt tokens are never
masked; they are context only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX


def corrupt(input_ids: torch.Tensor, labels: torch.Tensor, mask_token_id: int, eps: float,
            t: torch.Tensor | None = None, masked: torch.Tensor | None = None):
    """``(x_t, masked, t)``: the noisy input, which positions were masked, and each row's rate.

    Draws (when not given) in this order from the global generator: ``t = eps + (1 - eps) u`` with
    ``u ~ U(0, 1)^B``, then ``masked = (U(0, 1)^{B x T} < t) & maskable``. Maskable positions are
    response tokens past the first column (position 0 has no output before it to predict it).
    """
    B, T = input_ids.shape
    maskable = labels != IGNORE_INDEX
    maskable[:, 0] = False
    if t is None:
        t = eps + (1 - eps) * torch.rand(B, device=input_ids.device)
    t = t.to(device=input_ids.device, dtype=torch.float32)
    if masked is None:
        masked = torch.rand((B, T), device=input_ids.device) < t[:, None]
    masked = masked.bool() & maskable
    x_t = torch.where(masked, torch.as_tensor(mask_token_id, device=input_ids.device), input_ids)
    return x_t, masked, t


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_j weights_j CE(logits_j, targets_j)`` in float32 (rows already gathered)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * weights).sum()


def response_tokens(labels: torch.Tensor) -> int:
    """The loss normaliser ``N``: supervised targets of the shifted prediction."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
