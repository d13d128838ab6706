"""A base dispatched by accelerate (device map, decoder layers offloaded to disk): the path's loss,
gradients and generations equal those on the undispatched base."""
import pytest
import torch
from accelerate import dispatch_model

from l2d import get_l2d_model
from tiny import batch, randomize_path, tiny_base, tiny_config

RESIDENT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


def _run(base):
    torch.manual_seed(0)
    model = get_l2d_model(base, tiny_config())
    randomize_path(model)
    model.train()
    ids, labels = batch(B=2, T=12)
    out = model(ids, labels=labels, t=0.5, noise=torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(3)),
                self_conditioning=True)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.path.named_parameters() if p.grad is not None}
    model.eval()
    gen = model.generate(ids[:, :6], max_new_tokens=4, steps=3, solver="midpoint")
    return out.loss.detach(), grads, gen


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_dispatched_base_gives_the_same_loss_gradients_and_tokens(where, tmp_path):
    loss, grads, gen = _run(tiny_base())
    layers = {f"model.layers.{i}": where for i in range(2)}
    base = dispatch_model(tiny_base(), device_map={**RESIDENT, **layers}, main_device="cpu",
                          offload_dir=str(tmp_path))
    if where == "disk":
        assert base.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    d_loss, d_grads, d_gen = _run(base)
    torch.testing.assert_close(d_loss, loss)
    assert d_grads.keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(d_grads[k], grads[k], msg=k)
    assert torch.equal(d_gen, gen)
    if where == "disk":  # the weights went back to the offload after each block
        assert base.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
