"""``modulated_norm`` in plain torch with a hand-written backward, for CPU tensors (and GPUs
without Triton).

Op by op (``reference.modulated_norm_ref``), autograd keeps ``x``, the statistics, ``n = Norm(x)``
and the gain ``G = g + dw``: three [rows, H] tensors per call. This keeps ``x``, ``G`` and the
per-row statistics and recomputes ``n`` in the backward (the math is in the package README):

    dn = dy G
    rms:   dx = r (dn - n mean(dn n))
    layer: dx = r (dn - mean(dn) - n mean(dn n))
    none:  dx = dn
    d(dw) = dy n,  d(shift) = dy,  d(w) = sum_rows dy n,  d(b) = sum_rows dy

``G`` is kept rather than ``dw``: ``dw`` is usually a slice of the adaLN output, and keeping a
slice would keep the whole [rows, 6H] tensor it belongs to.
"""
from __future__ import annotations

import torch

from .reference import NORM_KINDS


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalize(xf: torch.Tensor, kind: str, eps: float):
    """(n, mean or None, rstd or None) in the accumulation dtype."""
    if kind in ("rms", "rms_offset"):
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return xf * rstd, None, rstd
    if kind == "layer":
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
        return (xf - mean) * rstd, mean, rstd
    return xf, None, None


class ModulatedNormTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dw, shift, eps: float, kind: str):
        acc = _acc_dtype(x)
        with torch.no_grad():
            xf = x.to(acc)
            n, mean, rstd = _normalize(xf, kind, eps)
            has_w = weight is not None and kind != "none"
            gain = weight.to(acc) + (1.0 if kind == "rms_offset" else 0.0) if has_w else 1.0
            G = dw.to(acc) + gain
            y = n * G + shift.to(acc)
            if bias is not None and kind == "layer":
                y = y + bias.to(acc)
        ctx.save_for_backward(x, G, mean, rstd)
        ctx.kind, ctx.has_w, ctx.has_b = kind, has_w, bias is not None and kind == "layer"
        ctx.shapes = (dw.shape, shift.shape)
        ctx.dtypes = (weight.dtype if has_w else None, bias.dtype if bias is not None else None, dw.dtype,
                      shift.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, G, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, need_dw, need_shift = ctx.needs_input_grad[:5]
        w_dtype, b_dtype, dw_dtype, shift_dtype = ctx.dtypes
        dw_shape, shift_shape = ctx.shapes
        acc = _acc_dtype(x)
        dy = dy.to(acc)
        xf = x.to(acc)
        if ctx.kind in ("rms", "rms_offset"):
            n = xf * rstd
        elif ctx.kind == "layer":
            n = (xf - mean) * rstd
        else:
            n = xf
        dx = d_weight = d_bias = d_dw = d_shift = None
        if need_x:
            dn = dy * G
            if ctx.kind in ("rms", "rms_offset"):
                dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
            elif ctx.kind == "layer":
                dx = rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))
            else:
                dx = dn
            dx = dx.to(x.dtype)
        if need_dw or (need_w and ctx.has_w):
            dyn = dy * n
            if need_dw:
                d_dw = dyn.sum_to_size(dw_shape).to(dw_dtype)
            if need_w and ctx.has_w:
                d_weight = dyn.reshape(-1, dyn.shape[-1]).sum(0).to(w_dtype)
        if need_b and ctx.has_b:
            d_bias = dy.reshape(-1, dy.shape[-1]).sum(0).to(b_dtype)
        if need_shift:
            d_shift = dy.sum_to_size(shift_shape).to(shift_dtype)
        return dx, d_weight, d_bias, d_dw, d_shift, None, None


def modulated_norm_torch(x, weight, bias, dw, shift, eps: float, kind: str):
    """``Norm(x) * (g + dw) + b + shift`` in float32 (float64 stays), keeping ``x``, ``g + dw`` and
    the row statistics for backward."""
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")
    return ModulatedNormTorch.apply(x, weight, bias, dw, shift, float(eps), kind)
