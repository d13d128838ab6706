"""Diffusion time: the timestep schedules sample the distributions they name."""
import torch


def test_timestep_schedules_follow_their_distributions():
    from l2d.latent import sample_timesteps

    for schedule in ("cosmap", "uniform", "logit_normal"):
        t = sample_timesteps((20000,), schedule, generator=torch.Generator().manual_seed(0))
        assert t.min() >= 0 and t.max() <= 1
        assert abs(float(t.mean()) - 0.5) < 0.02  # all three are symmetric about 1/2
    # cosmap inverts t = 1 - 1 / (tan(pi u / 2) + 1): P(t <= x) = (2 / pi) atan(x / (1 - x)).
    cos = sample_timesteps((20000,), "cosmap", generator=torch.Generator().manual_seed(0))
    for x in (0.1, 0.3, 0.5, 0.8):
        expected = 2 / torch.pi * torch.atan(torch.tensor(x / (1 - x)))
        assert abs(float((cos <= x).float().mean()) - float(expected)) < 0.015
