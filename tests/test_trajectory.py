"""Training on the solver's own trajectory (l2d/trajectory.py)."""
import pytest
import torch

from l2d import get_l2d_model
from l2d.trajectory import draw_trajectory, solver_state
from tiny import batch, tiny_base, tiny_config


def test_draws_cover_powers_of_two_grids_and_every_stop():
    g = torch.Generator().manual_seed(0)
    draws = {draw_trajectory(8, g) for _ in range(400)}
    assert {n for n, _ in draws} == {1, 2, 4, 8}
    assert all(1 <= k <= n for n, k in draws)
    assert {k for n, k in draws if n == 8} == set(range(1, 9))


@pytest.mark.parametrize("steps,stop", [(4, 1), (4, 3), (8, 8), (1, 1)])
def test_a_constant_estimate_gives_the_straight_line_from_noise(steps, stop):
    """With x1_hat = z fixed, Euler on v = (z - x) / (1 - t) is exact: x_t = t z + (1 - t) x0,
    and the last step of a full solve lands on z."""
    g = torch.Generator().manual_seed(1)
    z, x0 = torch.randn(2, 3, 5, generator=g), 64 * torch.randn(2, 3, 5, generator=g)
    seen = []

    def evaluate(t, x, z_hat):
        seen.append((t, z_hat.clone()))
        return z

    x, t, z_hat = solver_state(evaluate, x0, steps, stop, open_gate=False, feed_estimate=True)
    assert t == pytest.approx(stop / steps)
    torch.testing.assert_close(x, t * z + (1 - t) * x0, atol=1e-4, rtol=1e-5)
    assert len(seen) == stop and seen[0][0] == 0.0 and torch.equal(seen[0][1], torch.zeros_like(z))
    torch.testing.assert_close(z_hat, z)  # the last estimate is fed on, as at inference


def test_open_gate_is_evaluated_at_its_right_limit_and_no_estimate_without_self_conditioning():
    times = []
    _, _, z_hat = solver_state(lambda t, x, zh: times.append(t) or torch.ones_like(x), torch.zeros(1, 1, 2),
                               2, 2, open_gate=True, feed_estimate=False)
    assert times[0] == pytest.approx(1e-3) and times[1] == pytest.approx(0.5)
    assert torch.equal(z_hat, torch.zeros(1, 1, 2))


def test_trajectory_training_reaches_the_path_and_is_off_in_eval():
    model = get_l2d_model(tiny_base("llama"), tiny_config(trajectory_training=1.0, trajectory_steps=4))
    ids, labels = batch()
    model.train()
    out = model(ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.path.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.base_model.parameters())
    model.eval()
    torch.manual_seed(0)
    a = model(ids, labels=labels, t=0.5).loss
    torch.manual_seed(0)
    b = model(ids, labels=labels, t=0.5, trajectory=False).loss
    assert torch.equal(a, b)  # eval: the given t, no trajectory
