"""Triton step of the chunked head: one chunk of logits -> loss per row and gradient, in place.

The matmuls stay with cuBLAS (``cross_entropy.py``); this kernel replaces the half-dozen torch
passes over the ``[chunk, vocab]`` float32 logits between them. One program per row, two passes
over the row in blocks of ``BLOCK`` columns:

1. online logsumexp: ``m`` = running max, ``d`` = running ``sum exp(l - m)``, rescaled as ``m``
   grows; ``lse = m + log d``; ``loss = lse - l_y``.
2. gradient (math in ``cross_entropy.py``), written over the logits in their own dtype, so the
   chunk needs no second buffer.

``tanh`` is written with ``exp`` (``1 - 2 / (exp(2a) + 1)``, exact at both tails) because
``tl`` has none that runs in the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _transform(a, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    if HAS_SCALE:
        a = a * logit_scale
    if HAS_SOFTCAP:
        a = softcap * (1.0 - 2.0 / (tl.exp(2.0 * a / softcap) + 1.0))
    return a


@triton.jit
def _chunk_loss_grad_kernel(
    Logits, stride_l, Targets, Loss, RowWeight,
    n_cols, ignore_index, logit_scale, softcap,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_l
    target = tl.load(Targets + row).to(tl.int64)
    valid = target != ignore_index

    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        a = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        l = tl.where(mask, _transform(a, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(l, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(l - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    safe = tl.where(valid, target, 0)
    l_y = _transform(tl.load(base + safe).to(tl.float32), logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    tl.store(Loss + row, tl.where(valid, lse - l_y, 0.0))

    if NEED_GRAD:
        r = tl.where(valid, tl.load(RowWeight + row).to(tl.float32), 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            a = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            l = _transform(a, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            g = tl.exp(l - lse) - tl.where(cols == safe, 1.0, 0.0)
            g = g * r
            if HAS_SOFTCAP:
                c = l / softcap
                g = g * (1.0 - c * c)
            if HAS_SCALE:
                g = g * logit_scale
            tl.store(base + cols, g.to(Logits.dtype.element_ty), mask=mask)


def chunk_loss_grad_triton(logits, targets, row_weight, softcap, logit_scale, ignore_index, need_grad):
    """Same contract as ``cross_entropy._chunk_loss_grad_torch``; the gradient overwrites ``logits``."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    targets = targets.contiguous()
    rw = row_weight.float().contiguous() if need_grad else loss
    block = min(triton.next_power_of_2(n_cols), 8192 if logits.is_cuda else 1024)
    if n_rows:
        _chunk_loss_grad_kernel[(n_rows,)](
            logits, logits.stride(0), targets, loss, rw,
            n_cols, ignore_index, float(logit_scale or 1.0), float(softcap or 1.0),
            HAS_SCALE=logit_scale is not None, HAS_SOFTCAP=softcap is not None, NEED_GRAD=need_grad,
            BLOCK=block, num_warps=32 if block >= 8192 else 8,
        )
    return loss, (logits if need_grad else None)
