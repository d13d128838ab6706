"""``reduction="none"``: one loss per supervised token, the same with the adapter on (at t = 0) or off."""
import torch

from l2d import get_l2d_model
from tiny import batch, randomize_path, tiny_base, tiny_config


def test_per_token_losses_are_the_supervised_tokens_with_the_adapter_on_or_off():
    model = get_l2d_model(tiny_base("llama"), tiny_config())
    randomize_path(model)
    model.eval()
    ids, labels = batch(seed=4)
    at_t0 = model(ids, labels=labels, t=0.0, reduction="none").loss  # t = 0 is the base
    with model.disable_adapter():
        off = model(ids, labels=labels, reduction="none").loss
    assert at_t0.shape == off.shape == ((labels[:, 1:] != -100).sum(),)
    torch.testing.assert_close(at_t0, off)
