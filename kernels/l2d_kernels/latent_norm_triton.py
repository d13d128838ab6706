"""Fused latent normalisation and noising (Triton).

Latent normalisation, per row of ``u`` (``d`` columns), with ``rho = max(||u||, eps)``::

    z = sqrt(d) u / rho
    du = sqrt(d) / rho (dz - u_hat (u_hat . dz)),   u_hat = u / ||u||     (||u|| >= eps)
    du = sqrt(d) / eps dz                                                  (||u|| <  eps: the clamp
                                                                            holds rho constant)

Noising (rectified flow), one time ``t`` per row, ``s(t) = sqrt((1 - t)^2 sigma^2 + t^2)``::

    x_t = a z + b eps,   a = t / s(t),  b = (1 - t) sigma / s(t)    (s(t) = 1 without scaling)
    dz = a dx_t,         d(eps) = b dx_t

One program per row; the backward of the noising is two scalings done by torch.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .modulated_norm_triton import _launch_config, _rows
from .reference import _time_per_row


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


@triton.jit
def _noise_latent_kernel(X, Z, N, T, stride_x, stride_z, stride_n, n_cols, sigma,
                         SCALE_BY_STD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    t = tl.load(T + row).to(tl.float32)
    a = t
    b = (1.0 - t) * sigma
    if SCALE_BY_STD:
        s = tl.sqrt(a * a + b * b)
        a = a / s
        b = b / s
    z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(N + row * stride_n + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(X + row * stride_x + cols, (a * z + b * noise).to(X.dtype.element_ty), mask=mask)


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


class NoiseLatentFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, t, noise, sigma: float, scale_by_std: bool):
        shape = z.shape
        block, num_warps = _launch_config(shape[-1])
        z2, n2 = _rows(z, shape), _rows(noise, shape)
        t1 = _time_per_row(t, z).reshape(-1).contiguous()
        x = torch.empty(z2.shape, dtype=torch.float32, device=z.device)
        if z2.shape[0]:
            _noise_latent_kernel[(z2.shape[0],)](
                x, z2, n2, t1, x.stride(0), z2.stride(0), n2.stride(0), shape[-1], float(sigma),
                SCALE_BY_STD=scale_by_std, BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(t1)
        ctx.meta = (shape, z.dtype, noise.dtype, noise.shape, float(sigma), scale_by_std)
        return x.view(shape)

    @staticmethod
    def backward(ctx, dx):
        (t1,) = ctx.saved_tensors
        shape, z_dtype, noise_dtype, noise_shape, sigma, scale_by_std = ctx.meta
        a, b = t1, (1 - t1) * sigma
        if scale_by_std:
            s = torch.sqrt(a * a + b * b)
            a, b = a / s, b / s
        dz = (dx * a.view(*shape[:-1], 1)).to(z_dtype) if ctx.needs_input_grad[0] else None
        dn = None
        if ctx.needs_input_grad[2]:
            dn = (dx * b.view(*shape[:-1], 1)).to(noise_dtype).sum_to_size(noise_shape)
        return dz, None, dn, None, None


def latent_normalize_triton(u, eps: float = 1e-12):
    return LatentNormalizeFunction.apply(u, float(eps))


def noise_latent_triton(z, t, noise, sigma: float, scale_by_std: bool = True):
    return NoiseLatentFunction.apply(z, t, noise, float(sigma), bool(scale_by_std))
