r"""Training on the solver's own trajectories: the latents that generation actually visits.

Plain training noises the gold latent, ``x_t = t z(y) + (1 - t) sigma eps``. In ``generate`` the
path sees something else: after ``k`` solver steps the state carries its own earlier estimates,
right or wrong, and a path trained only on gold latents learns to trust them (a perfect denoiser
of gold latents just samples from its own first guess, so greedy steps cannot beat one step).

A training step drawn with probability ``config.trajectory_training`` instead draws a uniform grid
of ``N`` steps (``N`` a power of two up to ``config.trajectory_steps``) and a stop ``k`` in
``1..N``, runs ``k`` Euler steps from pure noise without gradient, as ``generate`` does with the
expected-latent estimate,

.. math::  x \leftarrow x + h \, \frac{\hat z(x, t) - x}{1 - t}, \qquad \hat z = \mathrm{softmax}(\ell) Z,

and takes the loss at the state reached, ``(x_{k/N}, t = k/N)``, against the gold token (``k = N``
is the read-out at ``t = 1`` on the integrated latent). Later evaluations thereby learn to correct
earlier ones. With self-conditioning on, the last estimate is fed as ``z_hat`` as at inference.
"""
from __future__ import annotations

import torch

from .latent import OPEN_GATE_T0


def draw_trajectory(max_steps: int, generator=None) -> tuple[int, int]:
    """``(N, k)``: a grid of ``N`` steps, ``N`` a power of two in ``[1, max_steps]``, and a stop
    ``1 <= k <= N``, both uniform."""
    sizes = [2 ** i for i in range(max_steps.bit_length()) if 2 ** i <= max_steps]
    n = sizes[int(torch.randint(len(sizes), (), generator=generator))]
    k = 1 + int(torch.randint(n, (), generator=generator))
    return n, k


@torch.no_grad()
def solver_state(evaluate, x0: torch.Tensor, steps: int, stop: int, open_gate: bool,
                 feed_estimate: bool) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Run ``stop`` Euler steps of a ``steps``-step uniform grid from ``x0`` at ``t = 0``.

    ``evaluate(t, x, z_hat)`` returns the expected latent ``softmax(logits) @ Z`` at ``(t, x)``.
    Returns ``(x, t, z_hat)``: the state at ``t = stop / steps``, and the last estimate (zeros
    unless ``feed_estimate``: an adapter without self-conditioning only ever sees zeros there).
    """
    x = x0.float()
    z_hat = torch.zeros_like(x)
    h = 1.0 / steps
    for j in range(stop):
        t = j * h
        estimate = evaluate(max(t, OPEN_GATE_T0) if open_gate else t, x, z_hat)
        x = x + h * (estimate - x) / (1.0 - t)
        if feed_estimate:
            z_hat = estimate
    return x, stop * h, z_hat
