"""Fused modulated normalisation (Triton): ``y = Norm(x) * (g + dw) + b + shift``.

This is the adaLN step of every diffusion block: the layer's own frozen norm (gain ``w``, bias
``b``) with a per-token gain offset ``dw`` and shift, both ``[tokens, hidden]``. One program
normalises one row, so ``x`` is read once forward and once backward.

Forward, per row (statistics in float32 whatever the input dtype)::

    rms, rms_offset:  r = (mean(x^2) + eps)^-1/2          n = x r
    layer:            mu = mean(x), r = (var(x) + eps)^-1/2   n = (x - mu) r
    none:             n = x
    G = g + dw        with g = w (rms, layer), 1 + w (rms_offset, Gemma), 1 (none or no weight)
    y = n G + shift (+ b for layer)

Backward, with ``dy`` the incoming gradient and means taken over the hidden dimension::

    d(shift) = dy                      d(dw) = dy n
    d(w)     = sum_rows dy n           d(b)  = sum_rows dy        (only when they require grad)
    dn = dy G
    rms:    dx = r (dn - n mean(dn n))
    layer:  dx = r (dn - mean(dn) - n mean(dn n))
    none:   dx = dn

``d(shift)`` is ``dy`` itself and ``d(w)``, ``d(b)`` are column sums of tensors the kernel writes
anyway, so the backward kernel only writes ``dx``, ``d(dw)`` and, when ``shift`` is not float32,
``dy`` cast to its dtype. Traffic per element (bf16 inputs, float32 ``y``): forward reads 6 and
writes 4 bytes, backward reads 8 and writes 6: the minimum for this op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import NORM_KINDS

_NORM_ID = {"rms": 1, "rms_offset": 1, "layer": 2, "none": 0}
MAX_HIDDEN = 65536  # one row per program: the whole row lives in registers


@triton.jit
def _modulated_norm_fwd_kernel(
    Y, X, W, B, DW, S, Mean, Rstd,
    stride_y, stride_x, stride_dw, stride_s,
    n_cols, eps,
    NORM: tl.constexpr, HAS_W: tl.constexpr, GAIN_OFFSET: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM == 1:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        n = x * rstd
        tl.store(Rstd + row, rstd)
    elif NORM == 2:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        n = xc * rstd
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)
    else:
        n = x
    gain = tl.load(DW + row * stride_dw + cols, mask=mask, other=0.0).to(tl.float32) + GAIN_OFFSET
    if HAS_W:
        gain += tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = n * gain + tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _modulated_norm_bwd_kernel(
    DX, DDW, DS, DY, X, W, DW, Mean, Rstd,
    stride_dx, stride_ddw, stride_ds, stride_dy, stride_x, stride_dw,
    n_cols,
    NORM: tl.constexpr, HAS_W: tl.constexpr, GAIN_OFFSET: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DDW: tl.constexpr, STORE_DS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_DS:
        tl.store(DS + row * stride_ds + cols, dy.to(DS.dtype.element_ty), mask=mask)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM == 1:
        rstd = tl.load(Rstd + row)
        n = x * rstd
    elif NORM == 2:
        rstd = tl.load(Rstd + row)
        n = tl.where(mask, x - tl.load(Mean + row), 0.0) * rstd
    else:
        n = x
    if STORE_DDW:
        tl.store(DDW + row * stride_ddw + cols, (dy * n).to(DDW.dtype.element_ty), mask=mask)
    if STORE_DX:
        gain = tl.load(DW + row * stride_dw + cols, mask=mask, other=0.0).to(tl.float32) + GAIN_OFFSET
        if HAS_W:
            gain += tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dn = dy * gain
        if NORM == 1:
            dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        elif NORM == 2:
            dx = rstd * (dn - tl.sum(dn, axis=0) / n_cols - n * (tl.sum(dn * n, axis=0) / n_cols))
        else:
            dx = dn
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int):
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"modulated_norm: hidden size {n_cols} > {MAX_HIDDEN}; use the torch backend")
    block = triton.next_power_of_2(n_cols)
    num_warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, num_warps


def _rows(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` broadcast to ``shape`` as a 2-D ``[rows, hidden]`` view with unit column stride."""
    t2 = t.expand(shape).reshape(-1, shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class ModulatedNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dw, shift, eps: float, kind: str, out_dtype):
        shape = x.shape
        n_cols = shape[-1]
        block, num_warps = _launch_config(n_cols)
        x2, dw2, s2 = _rows(x, shape), _rows(dw, shape), _rows(shift, shape)
        n_rows = x2.shape[0]
        norm = _NORM_ID[kind]
        has_w = weight is not None and kind != "none"
        has_b = bias is not None and kind == "layer"
        gain_offset = 1.0 if (kind in ("rms_offset", "none") or weight is None) else 0.0
        w = weight.contiguous() if has_w else x2  # dummy pointer when absent
        b = bias.contiguous() if has_b else x2
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _modulated_norm_fwd_kernel[(n_rows,)](
                y, x2, w, b, dw2, s2, mean, rstd,
                y.stride(0), x2.stride(0), dw2.stride(0), s2.stride(0),
                n_cols, eps,
                NORM=norm, HAS_W=has_w, GAIN_OFFSET=gain_offset, HAS_B=has_b,
                BLOCK=block, num_warps=num_warps,
            )
        # dw is usually a slice of the [rows, 6H] adaLN output: keep a compact copy of it, not
        # the whole output (3x the memory of the two copies the block's norms keep)
        dw_kept = dw2.clone() if dw2.untyped_storage().nbytes() > dw2.numel() * dw2.element_size() else dw2
        ctx.save_for_backward(x2, w, dw_kept, mean, rstd)
        ctx.meta = (shape, norm, has_w, has_b, gain_offset, block, num_warps)
        ctx.shapes = (dw.shape, shift.shape)
        ctx.dtypes = (x.dtype, dw.dtype, shift.dtype, bias.dtype if has_b else None)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, dw2, mean, rstd = ctx.saved_tensors
        shape, norm, has_w, has_b, gain_offset, block, num_warps = ctx.meta
        dw_shape, shift_shape = ctx.shapes
        x_dtype, dw_dtype, shift_dtype, bias_dtype = ctx.dtypes
        need_x, need_w, need_b, need_dw, need_shift = ctx.needs_input_grad[:5]
        need_w = need_w and has_w
        need_b = need_b and has_b
        dy2 = _rows(dy, shape)
        n_rows, n_cols = dy2.shape
        store_ddw = need_dw or need_w
        dx = torch.empty((n_rows, n_cols), dtype=x_dtype, device=dy.device) if need_x else None
        # d(w) is a column sum of d(dw): keep d(dw) in float32 then, so the sum does not round.
        ddw_dtype = torch.float32 if need_w else dw_dtype
        ddw = torch.empty((n_rows, n_cols), dtype=ddw_dtype, device=dy.device) if store_ddw else None
        # d(shift) is dy: free when the dtypes agree, else cast inside the kernel (no extra pass).
        store_ds = need_shift and shift_dtype != dy.dtype and shift_shape == shape
        ds = torch.empty((n_rows, n_cols), dtype=shift_dtype, device=dy.device) if store_ds else None
        if n_rows and (need_x or store_ddw or store_ds):
            _modulated_norm_bwd_kernel[(n_rows,)](
                dx if need_x else dy2, ddw if store_ddw else dy2, ds if store_ds else dy2,
                dy2, x2, w, dw2, mean, rstd,
                dx.stride(0) if need_x else 0, ddw.stride(0) if store_ddw else 0,
                ds.stride(0) if store_ds else 0, dy2.stride(0), x2.stride(0), dw2.stride(0),
                n_cols,
                NORM=norm, HAS_W=has_w, GAIN_OFFSET=gain_offset,
                STORE_DX=need_x, STORE_DDW=store_ddw, STORE_DS=store_ds, BLOCK=block, num_warps=num_warps,
            )
        d_weight = ddw.sum(0).to(w.dtype) if need_w else None
        d_bias = dy2.sum(0, dtype=torch.float32).to(bias_dtype) if need_b else None
        d_dw = ddw.view(shape).to(dw_dtype).sum_to_size(dw_shape) if need_dw else None
        if store_ds:
            d_shift = ds.view(shape)
        else:
            d_shift = dy.to(shift_dtype).sum_to_size(shift_shape) if need_shift else None
        if dx is not None:
            dx = dx.view(shape)
        return dx, d_weight, d_bias, d_dw, d_shift, None, None, None


def modulated_norm_triton(x, weight, bias, dw, shift, eps: float, kind: str, out_dtype=torch.float32):
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")
    return ModulatedNormFunction.apply(x, weight, bias, dw, shift, float(eps), kind, out_dtype)
