"""ODE solvers for one token's latent, ``dx/dt = v(t, x)`` from ``t = 0`` to ``t = 1``.

Fixed grids take ``steps`` steps over ``steps + 1`` grid times (uniform or cosmap-spaced) and
spend a fixed number of velocity evaluations (NFE) per step:

=========  ==============  ====================================================
solver     NFE per step    update over ``[t, t + h]``
=========  ==============  ====================================================
euler      1               ``x + h k1``
midpoint   2               ``x + h v(t + h/2, x + h/2 k1)``
heun       2               ``x + h/2 (k1 + v(t + h, x + h k1))``
rk4        4               classical Runge-Kutta
=========  ==============  ====================================================

Adaptive solvers (``dopri5``, ``bosh3``, ``adaptive_heun``) go through ``torchdiffeq.odeint``
with ``rtol``/``atol``; their NFE depends on the field and is capped by ``max_nfe``.
The vector field may raise :class:`StopIntegration` to end a solve early (NFE cap, or a token
whose prediction has settled); the caller then reads out its last evaluation.
"""
from __future__ import annotations

import torch

from .latent import time_grid

FIXED_SOLVERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun")
SOLVERS = tuple(FIXED_SOLVERS) + ADAPTIVE_SOLVERS


class StopIntegration(Exception):
    """Raised by a vector field to end the current token's solve (the reason is the message)."""


def check_solver(solver: str, steps, rtol: float, atol: float, max_nfe) -> None:
    """Clear errors for bad solver arguments, before any work."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be a non-negative integer (0 = the base model), got {steps!r}.")
    if solver in FIXED_SOLVERS and steps is None:
        raise ValueError(f"solver {solver!r} takes a fixed number of steps; pass steps=N "
                         f"(or an adaptive solver: {', '.join(ADAPTIVE_SOLVERS)}).")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not (0.0 < float(tol) < 1.0):
            raise ValueError(f"{name} must lie in (0, 1), got {tol!r}.")
    if max_nfe is not None and (isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1):
        raise ValueError(f"max_nfe must be a positive integer or None, got {max_nfe!r}.")


def nfe_per_token(solver: str, steps: int, readout: bool = True) -> int:
    """Evaluations a fixed-grid solve of one token costs (plus one read-out at t=1 by default)."""
    return FIXED_SOLVERS[solver] * steps + int(readout)


def integrate_fixed(field, x0: torch.Tensor, steps: int, solver: str = "euler", spacing: str = "uniform"):
    """Integrate ``field(t, x)`` over a fixed grid; returns ``x(1)``."""
    grid = time_grid(steps, spacing).tolist()
    x = x0
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        if solver == "euler":
            x = x + h * field(t0, x)
        elif solver == "midpoint":
            k1 = field(t0, x)
            x = x + h * field(t0 + h / 2, x + h / 2 * k1)
        elif solver == "heun":
            k1 = field(t0, x)
            k2 = field(t1, x + h * k1)
            x = x + h / 2 * (k1 + k2)
        elif solver == "rk4":
            k1 = field(t0, x)
            k2 = field(t0 + h / 2, x + h / 2 * k1)
            k3 = field(t0 + h / 2, x + h / 2 * k2)
            k4 = field(t1, x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        else:
            raise ValueError(f"{solver!r} is not a fixed-grid solver")
    return x


def integrate_adaptive(field, x0: torch.Tensor, solver: str, rtol: float, atol: float):
    """Integrate with torchdiffeq's adaptive ``solver``; returns ``x(1)``."""
    from torchdiffeq import odeint

    t = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
    return odeint(lambda s, x: field(float(s), x), x0, t, rtol=rtol, atol=atol, method=solver)[-1]
