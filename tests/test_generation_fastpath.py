"""The token field's fast evaluation (t-only parts cached, t=0 shortcut) equals the plain path."""
import pytest
import torch

from l2d import get_l2d_model
from l2d.generation import ConditioningCache, TokenField
from tiny import batch, randomize_path, tiny_base, tiny_config


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "granite"])
@pytest.mark.parametrize("w", [None, 2.5])
@pytest.mark.parametrize("stream_init,merge_init", [("main", "ramp"), ("encoder", "zero")])
def test_fast_evaluation_is_bitwise_the_plain_path(family, w, stream_init, merge_init):
    model = get_l2d_model(tiny_base(family), tiny_config(stream_init=stream_init, merge_init=merge_init)).eval()
    randomize_path(model)
    ids, _ = batch(B=2, T=6)
    main = model.run_main_path(ids)
    ctx = model.stream_context(main, torch.tensor([[5], [5]]))
    cls = model.class_tensor(["math", None], 2)
    h_main, Z = main.hidden[:, -1:], model.latent_table().float()
    h_start = None if main.stream_input is None else main.stream_input[:, -1:]
    null = torch.full_like(cls, model.config.num_classes)
    both = cls if w is None else torch.cat([cls, null])
    cache = ConditioningCache(model, both)
    both_ctx = ctx if w is None else ctx.doubled()  # (the field doubles its context itself)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in (0.0, 0.37, 1.0, 0.37):  # 0.37 twice: the second one comes from the cache
            x = 64 * torch.randn(2, 1, Z.shape[-1], generator=g)
            z_hat = torch.randn(2, 1, Z.shape[-1], generator=g)
            fld = TokenField(model, ctx, h_main, cls, Z, "expected", w, 1.0, None, None, None, cond_cache=cache,
                             h_start=h_start)
            fld.z_hat = z_hat
            got = fld.evaluate(t, x)
            r = 1 if w is None else 2
            tt = torch.full((2 * r, 1), t)
            h = model.path(model.arch, both_ctx, h_main.repeat(r, 1, 1), x.repeat(r, 1, 1), tt, z_hat.repeat(r, 1, 1), both,
                           h_start=None if h_start is None else h_start.repeat(r, 1, 1))
            both_logits = model.head_logits(h)
            # guidance mixes velocities, not logits: the field keeps the conditional half's logits,
            # and each half's own estimate feeds the next evaluation
            ref = both_logits if w is None else both_logits.chunk(2)[0]
            assert torch.equal(got, ref), (family, w, t)
            assert torch.equal(fld.z_hat, torch.softmax(both_logits, -1) @ Z)
