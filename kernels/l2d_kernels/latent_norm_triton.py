"""Fused latent normalisation (Triton).

Latent normalisation, per row of ``u`` (``d`` columns), with ``rho = max(||u||, eps)``::

    z = sqrt(d) u / rho
    du = sqrt(d) / rho (dz - u_hat (u_hat . dz)),   u_hat = u / ||u||     (||u|| >= eps)
    du = sqrt(d) / eps dz                                                  (||u|| <  eps: the clamp
                                                                            holds rho constant)

One program per row.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .modulated_norm_triton import _launch_config, _rows


@triton.jit
def _latent_norm_fwd_kernel(Z, U, stride_z, stride_u, n_cols, eps, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    rho = tl.maximum(tl.sqrt(tl.sum(u * u, axis=0)), eps)
    tl.store(Z + row * stride_z + cols, (u * (scale / rho)).to(Z.dtype.element_ty), mask=mask)


@triton.jit
def _latent_norm_bwd_kernel(DU, DZ, U, stride_du, stride_dz, stride_u, n_cols, eps, scale,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DZ + row * stride_dz + cols, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(u * u, axis=0))
    rho = tl.maximum(norm, eps)
    u_hat = u / rho
    proj = tl.where(norm >= eps, tl.sum(u_hat * dz, axis=0), 0.0)
    du = (scale / rho) * (dz - u_hat * proj)
    tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


class LatentNormalizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, eps: float):
        shape = u.shape
        block, num_warps = _launch_config(shape[-1])
        u2 = _rows(u, shape)
        z = torch.empty(u2.shape, dtype=torch.float32, device=u.device)
        scale = math.sqrt(shape[-1])
        if u2.shape[0]:
            _latent_norm_fwd_kernel[(u2.shape[0],)](
                z, u2, z.stride(0), u2.stride(0), shape[-1], eps, scale, BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(u2)
        ctx.meta = (shape, eps, scale, block, num_warps)
        return z.view(shape)

    @staticmethod
    def backward(ctx, dz):
        (u2,) = ctx.saved_tensors
        shape, eps, scale, block, num_warps = ctx.meta
        dz2 = _rows(dz, shape)
        du = torch.empty(u2.shape, dtype=u2.dtype, device=u2.device)
        if u2.shape[0]:
            _latent_norm_bwd_kernel[(u2.shape[0],)](
                du, dz2, u2, du.stride(0), dz2.stride(0), u2.stride(0), shape[-1], eps, scale,
                BLOCK=block, num_warps=num_warps)
        return du.view(shape), None


def latent_normalize_triton(u, eps: float = 1e-12):
    return LatentNormalizeFunction.apply(u, float(eps))
