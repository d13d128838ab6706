"""context="adapted" and stream_layers on the derived families (tests/tiny.py ``DERIVED``).

Neither option is refused on any derived family: both build on the same spec pieces as the frozen
path (the q/o modules the context hooks attach to, the MLP's parts or its parallel delta, the
per-layer rotary and sliding windows), so each family is held to what the hand-written families are
held to in tests/test_context_adapted.py and tests/test_stream_layers.py, with their helpers: t=0 is
the base, a training step gives finite loss and gradients to the path, steps=0 generation is
base.generate with left padding, the stream over an adapted context is the adapted base position by
position (and generation grows the context cache token by token), and a top-k stream takes up what
the full stream computes below it.
"""
import pytest
import torch

from l2d import get_l2d_model
from test_context_adapted import _adapted_base_logits, _deltas_only, tiny_config
from test_stream_layers import _quiet_below
from tiny import DERIVED, batch, randomize_path, tiny_base

FAMILIES = sorted(DERIVED)
OPTIONS = {"adapted": dict(context="adapted"), "top1": dict(stream_layers=1),
           "adapted-top1": dict(context="adapted", stream_layers=1)}


def _left_padded(seed: int, T: int, pad: int):
    ids, _ = batch(seed=seed, B=2, T=T)
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_t0_training_and_steps0_hold_with_the_option(family, option):
    base = tiny_base(family)
    kw = OPTIONS[option]
    model = get_l2d_model(base, tiny_config(**kw)).eval()
    assert model.arch.spec.derived
    L = model.arch.num_layers
    assert model.path.stream_start == L - kw.get("stream_layers", L)
    ids, labels = batch(seed=2)
    with torch.no_grad():
        ref = base(input_ids=ids).logits.float()
        for t in (0.0, 0.6):  # the path starts as the base at every t
            assert (model(ids, t=t).logits - ref).abs().max() <= 1e-5
        randomize_path(model)  # as after training
        assert (model(ids, t=0.0).logits - ref).abs().max() <= 1e-5
        assert (model(ids, t=0.6).logits - ref).abs().max() > 1e-3
        # the context hooks act only inside the context pass: the base used alone is untouched
        assert (base(input_ids=ids).logits.float() - ref).abs().max() == 0

    model.train()
    loss = model(ids, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    adapted = kw.get("context") == "adapted"
    # every layer's deltas learn with an adapted context (lower ones through the context pass);
    # with a frozen context only the stream's layers have blocks
    assert [b.index for b in model.path.blocks] == list(range(0 if adapted else model.path.stream_start, L))
    for block in model.path.blocks:
        assert block.q_delta.A.grad is not None and block.q_delta.A.grad.abs().sum() > 0, block.index
        assert hasattr(block, "adaln") == (block.index >= model.path.stream_start)
    assert model.path.blocks[L - 1].adaln[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())

    model.eval()
    ids, mask = _left_padded(seed=5, T=7, pad=3)
    kw = dict(max_new_tokens=5, pad_token_id=0, eos_token_id=2)
    want = base.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(model.generate(ids, mask, steps=0, **kw), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stream_over_an_adapted_context_is_the_adapted_base(family):
    """Only the deltas trained: the stream at position i is layer by layer the context pass at i, so
    the logits are the adapted base's everywhere (left padding included), and greedy generation at
    any steps is the adapted base's own generate (the context cache grows token by token)."""
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(context="adapted")).eval()
    _deltas_only(model, scale=1.0)
    ids, mask = _left_padded(seed=3, T=9, pad=2)
    keep = mask.bool()
    with torch.no_grad():
        want = _adapted_base_logits(model, ids, mask)
        got = model(ids, mask, t=0.7).logits
        torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
        assert (want - base(input_ids=ids, attention_mask=mask).logits)[keep].abs().max() > 1e-3

    ids, mask = _left_padded(seed=5, T=7, pad=3)
    kw = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=2)
    with model.path.switch.context_pass():
        adapted = base.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = model.generate(ids, mask, steps=2, seed=0, **kw)
    assert torch.equal(got, adapted)


@pytest.mark.parametrize("context", ["frozen", "adapted"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_top_stream_takes_up_what_the_full_stream_computes_below(family, context):
    """stream_layers=1: a full-depth stream with the same weights whose latent has no effect below
    the top layer computes there what the top-1 stream starts from (the main path's input, or the
    adapted context pass's), so the two agree at every t, with left padding."""
    full = get_l2d_model(tiny_base(family), tiny_config(context=context)).eval()
    start = full.arch.num_layers - 1
    randomize_path(full)
    _quiet_below(full, start, keep_deltas=context == "adapted")
    top = get_l2d_model(tiny_base(family), tiny_config(context=context, stream_layers=1)).eval()
    missing, unexpected = top.path.load_state_dict(full.path.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(int(k.split(".")[1]) < start for k in unexpected)
    ids, mask = _left_padded(seed=3, T=9, pad=2)
    keep = mask.bool()
    noise = torch.randn(*ids.shape, full.config.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (0.2, 0.9):
            want = full(ids, mask, t=t, noise=noise).logits
            got = top(ids, mask, t=t, noise=noise).logits
            torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
