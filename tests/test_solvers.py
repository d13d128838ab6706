"""The fixed-step and adaptive solvers on an analytic ODE (dx/dt = -x): each converges at its order
or meets its tolerance."""
import math

import pytest
import torch

from l2d.solvers import integrate_adaptive, integrate_fixed


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fixed_solvers_converge_at_their_order_on_an_analytic_ode(solver, order):
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x0 * math.exp(-1.0)  # dx/dt = -x
    errs = [float((integrate_fixed(lambda t, x: -x, x0, n, solver) - exact).abs().max()) for n in (8, 16)]
    assert errs[1] < errs[0]
    assert errs[0] / errs[1] == pytest.approx(2 ** order, rel=0.25)


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_solvers_meet_their_tolerance(solver):
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    got = integrate_adaptive(lambda t, x: -x, x0, solver, rtol=1e-6, atol=1e-8)
    assert (got - x0 * math.exp(-1.0)).abs().max() < 1e-4
