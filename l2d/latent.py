"""Latent token space, rectified-flow noising and timestep schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

import l2d_kernels

# Where the field of an open-gate path (``merge_init="open"``) is evaluated for t = 0: the gate jumps
# from 0 at t = 0 (the base, by construction) to about 1 just after; its right limit is the path.
OPEN_GATE_T0 = 1e-3


class LatentMap(nn.Module):
    r"""The trainable map ``phi`` from frozen token embeddings to latents.

    .. math::  z(y) = \sqrt{d}\, \frac{\phi(E_y)}{\lVert \phi(E_y) \rVert}

    Every latent has norm ``sqrt(d)``, so its coordinates are about unit scale.
    """

    def __init__(self, hidden_size: int, latent_dim: int, bias: bool = False):
        super().__init__()
        self.latent_dim = latent_dim
        self.phi = nn.Linear(hidden_size, latent_dim, bias=bias)  # bias: the reference's (config.latent_bias)
        if bias:
            nn.init.zeros_(self.phi.bias)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        u = self.phi(embeddings.to(self.phi.weight.dtype))
        return l2d_kernels.latent_normalize(u)

    def table(self, embedding_weight: torch.Tensor) -> torch.Tensor:
        """The ``V x d`` table of all latents (build once per step or per generate call)."""
        return self(embedding_weight)

    def lookup(self, embedding_weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Latents of ``token_ids`` only: training needs the full table only for self-conditioning."""
        return self(embedding_weight[token_ids])


def marginal_std(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """``s(t) = sqrt((1 - t)^2 sigma^2 + t^2)``, the std of ``x_t`` when ``z`` has unit-scale coordinates."""
    return torch.sqrt((1 - t) ** 2 * sigma**2 + t**2)


def add_noise(z: torch.Tensor, t: torch.Tensor, sigma: float, noise: torch.Tensor | None = None):
    """Rectified-flow path ``x_t = t z + (1 - t) sigma eps`` with ``t`` broadcast over the last dim."""
    if noise is None:
        noise = torch.randn_like(z)
    tt = t.unsqueeze(-1).to(z.dtype)
    return tt * z + (1 - tt) * sigma * noise


def cosmap(u: torch.Tensor) -> torch.Tensor:
    """The cosmap warp of ``u`` in [0, 1]: ``t = 1 - 1 / (tan(pi u / 2) + 1)`` (mass at both ends)."""
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)


def sample_timesteps(shape, schedule: str, device=None, generator=None, mean: float = 0.0, std: float = 1.0):
    """Draw one ``t`` in [0, 1) per entry of ``shape``.

    - ``cosmap``: ``t = 1 - 1 / (tan(pi u / 2) + 1)``, ``u ~ U(0, 1)``, mass at both ends.
    - ``uniform``: ``t ~ U(0, 1)``.
    - ``logit_normal``: ``t = sigmoid(n)``, ``n ~ N(mean, std^2)``.
    """
    if schedule == "cosmap":
        return cosmap(torch.rand(shape, device=device, generator=generator))
    if schedule == "uniform":
        return torch.rand(shape, device=device, generator=generator)
    if schedule == "logit_normal":
        n = torch.randn(shape, device=device, generator=generator) * std + mean
        return torch.sigmoid(n)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'cosmap', 'uniform' or 'logit_normal'")


def time_grid(steps: int, spacing: str = "uniform", device=None) -> torch.Tensor:
    """``steps + 1`` times from 0 to 1 for a fixed-step solver, uniform or cosmap-spaced."""
    u = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    if spacing == "uniform":
        return u
    if spacing == "cosmap":
        g = cosmap(u)
        g[-1] = 1.0  # tan(pi/2) is finite in floating point; pin the end exactly
        return g
    raise ValueError(f"unknown grid spacing {spacing!r}; expected 'uniform' or 'cosmap'")
