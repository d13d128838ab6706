"""Vocabulary head + cross-entropy, chunked over tokens so ``[tokens, vocab]`` never exists at once.

Per token with hidden state ``h`` and target ``y`` (rows with ``y == ignore_index`` count zero)::

    a = h W^T + bias                          (matmul in the input dtype, like ``F.linear``)
    l = a * scale                             (optional logit scale)
    l = c tanh(l / c)                         (optional soft-cap c)
    loss = logsumexp(l) - l_y                 (float32)

Gradient of the loss with respect to the raw logits ``a`` of one token, with row weight ``r``
(``1 / n_valid`` for the mean, ``1`` for the sum, the incoming gradient for ``reduction="none"``)::

    da = r (softmax(l) - onehot(y)) * (1 - (l / c)^2) * scale
    dh = da W        dW = sum_tokens da^T h        d(bias) = sum_tokens da

For ``mean`` and ``sum`` the gradients are computed chunk by chunk *in the forward* (each chunk's
logits are freed right away) and only scaled in the backward: one matmul for the logits and one
for ``dh`` per chunk, no recomputation. ``dW`` and ``d(bias)`` are skipped unless they require
grad (the head is frozen in L2D). With ``reduction="none"`` the backward recomputes each chunk,
because the row weights are only known then.

The per-chunk "logits -> loss, gradient" step is either plain torch (``_chunk_loss_grad_torch``)
or the Triton kernel of ``cross_entropy_triton`` (on CUDA), which does it in two passes over the
logits and writes the gradient in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MiB in float32


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    return max(1, min(n_tokens, MAX_CHUNK_ELEMENTS // max(vocab, 1)))


def _chunk_loss_grad_torch(logits, targets, row_weight, softcap, logit_scale, ignore_index, need_grad):
    """Loss per row (float32) and, if ``need_grad``, the gradient w.r.t. ``logits`` (float32).

    Works in place on ``logits`` when it is already float32 (it is a temporary of the caller).
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    if logit_scale is not None:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_()
        dcap = (1 - z * z) if need_grad else None
        z.mul_(softcap)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    target_logit = z.gather(1, safe[:, None]).squeeze(1)
    # logsumexp in place (torch.logsumexp would allocate a second [chunk, vocab] buffer, which
    # sits on top of every activation the step keeps): e = exp(z - max), lse = max + log(sum e)
    top = z.amax(dim=-1, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)  # a row of -inf stays -inf below
    e = z.sub_(top).exp_()
    total = e.sum(dim=-1, keepdim=True)
    lse = (total.log() + top).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0)
    if not need_grad:
        return loss, None
    g = e.div_(total)  # softmax, in place
    rows = torch.arange(g.shape[0], device=g.device)
    g[rows, safe] -= 1.0
    g.mul_(torch.where(valid, row_weight, 0.0)[:, None])
    if softcap is not None:
        g.mul_(dcap)
    if logit_scale is not None:
        g.mul_(logit_scale)
    return loss, g


def _run_chunks(h, weight, bias, targets, row_weight, opts, need_h, need_w, need_b):
    """Loss per token and the requested gradients, ``chunk`` tokens at a time."""
    softcap, logit_scale, ignore_index, chunk, chunk_fn = opts
    n = h.shape[0]
    need_grad = need_h or need_w or need_b
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=acc, device=h.device)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h_c = h[start:end]
        logits = F.linear(h_c, weight, bias)
        rw = row_weight[start:end] if need_grad else None
        loss[start:end], g = chunk_fn(logits, targets[start:end], rw, softcap, logit_scale,
                                      ignore_index, need_grad)
        if not need_grad:
            continue
        g = g.to(h.dtype)
        if need_h:
            torch.matmul(g, weight.to(h.dtype), out=dh[start:end])
        if need_w:
            dw.add_(g.t().matmul(h_c))
        if need_b:
            db.add_(g.sum(0, dtype=acc))
    return loss, dh, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, logit_scale, ignore_index, reduction,
                chunk_size, chunk_fn, grad_enabled):
        h = hidden.reshape(-1, hidden.shape[-1])
        tg = targets.reshape(-1)
        chunk = chunk_size or default_chunk_size(h.shape[0], weight.shape[0])
        opts = (softcap, logit_scale, ignore_index, chunk, chunk_fn)
        need = ctx.needs_input_grad
        need_h, need_w, need_b = (grad_enabled and need[0], grad_enabled and need[1],
                                  grad_enabled and bias is not None and need[2])
        ctx.meta = (hidden.shape, weight.dtype, None if bias is None else bias.dtype, reduction, opts)
        if reduction == "none":
            # Row weights are the incoming gradient: recompute chunk by chunk in the backward.
            loss, _, _, _ = _run_chunks(h, weight, bias, tg, None, opts, False, False, False)
            ctx.save_for_backward(h, weight, bias, tg)
            ctx.flags = (need_h, need_w, need_b)
            return loss.view(targets.shape)
        n_valid = (tg != ignore_index).sum()
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        scale = (1.0 / n_valid.clamp_min(1).to(acc) if reduction == "mean"
                 else torch.ones((), dtype=acc, device=h.device))
        row_weight = scale.expand(h.shape[0])
        loss, dh, dw, db = _run_chunks(h, weight, bias, tg, row_weight, opts, need_h, need_w, need_b)
        total = loss.sum()
        if reduction == "mean":
            total = total / n_valid  # nan when every target is ignored, like F.cross_entropy
        ctx.save_for_backward(dh, dw, db)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden_shape, w_dtype, b_dtype, reduction, opts = ctx.meta
        if reduction == "none":
            h, weight, bias, tg = ctx.saved_tensors
            need_h, need_w, need_b = ctx.flags
            row_weight = grad_out.reshape(-1).to(torch.float64 if h.dtype == torch.float64 else torch.float32)
            _, dh, dw, db = _run_chunks(h, weight, bias, tg, row_weight, opts, need_h, need_w, need_b)
        else:
            dh, dw, db = ctx.saved_tensors
            dh, dw, db = (None if g is None else g * grad_out.to(g.dtype) for g in (dh, dw, db))
        return (None if dh is None else dh.view(hidden_shape),
                None if dw is None else dw.to(w_dtype),
                None if db is None else db.to(b_dtype),
                None, None, None, None, None, None, None, None)


def linear_cross_entropy_chunked(hidden, weight, targets, bias=None, softcap=None, logit_scale=None,
                                 ignore_index: int = -100, reduction: str = "mean", chunk_size=None,
                                 chunk_fn=_chunk_loss_grad_torch):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return LinearCrossEntropyFunction.apply(
        hidden, weight, bias, targets, softcap, logit_scale, ignore_index, reduction, chunk_size,
        chunk_fn, torch.is_grad_enabled())
