"""Derived specs (l2d/arch_derive.py) and the wrap-time check (l2d/arch_check.py).

A family without a hand-written spec is wrapped from a spec derived from the model itself and
accepted only when every rebuilt decoder layer matches the real one; everything the hand-written
families promise then holds for it too: t=0 is the base, training reaches the path, steps=0
generation is base.generate token for token (left padding included), save/load round-trips.
"""
import dataclasses

import pytest
import torch

import l2d.arch
from l2d import L2DModel, get_l2d_model
from l2d.arch import ArchAdapter, ArchRefused, get_spec
from l2d.arch_check import check
from tiny import DERIVED, FAMILIES, batch, randomize_path, tiny_base, tiny_config


def _left_padded():
    ids, _ = batch(seed=0, B=3, T=7)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", sorted(DERIVED))
def test_a_derived_family_wraps_trains_generates_and_round_trips(family, tmp_path):
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config())
    assert model.arch.spec.derived and family not in l2d.arch.SPECS
    ids, labels = batch()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    assert (model.eval()(ids, t=0.0).logits - ref).abs().max() <= 1e-5  # at init: the base

    model.train()
    out = model(ids, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.path.parameters())
    assert all(not p.requires_grad for p in base.parameters())

    randomize_path(model)  # as after training
    model.eval()
    assert (model(ids, t=0.0).logits - ref).abs().max() <= 1e-5
    t, noise = torch.rand(2, 12), torch.randn(2, 12, 16)
    moved = model(ids, t=t, noise=noise).logits
    assert (moved - ref).abs().max() > 1e-4  # the path acts off t=0

    pids, mask = _left_padded()
    want = base.generate(pids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         eos_token_id=2)
    got = model.generate(pids, mask, max_new_tokens=6, steps=0, eos_token_id=2, pad_token_id=0)
    assert torch.equal(got, want)

    model.save_pretrained(tmp_path)
    loaded = L2DModel.from_pretrained(tiny_base(family), str(tmp_path))
    assert loaded.arch.spec == model.arch.spec
    torch.testing.assert_close(loaded(ids, t=t, noise=noise).logits, moved, atol=0, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_hand_written_families_derive_their_own_spec(family, monkeypatch):
    """With its hand-written spec hidden, each original family derives one that passes the check
    and reproduces every decoder layer (the same property tests/test_arch.py checks by hand)."""
    base = tiny_base(family)
    monkeypatch.delitem(l2d.arch.SPECS, family)
    model = get_l2d_model(base, tiny_config(stream_init="main"))
    spec = model.arch.spec
    assert spec.derived
    hand = FAMILIES_SPEC[family]
    for field in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "parallel", "rotary", "q_norm"):
        assert getattr(spec, field) == getattr(hand, field), field
    ids, _ = batch(seed=3)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    randomize_path(model)
    assert (model.eval()(ids, t=0.0).logits - ref).abs().max() <= 1e-5


FAMILIES_SPEC = {family: spec for family, spec in l2d.arch.SPECS.items()}


def test_a_family_with_a_broken_piece_is_refused_before_any_training():
    """A decoder layer whose forward adds a constant: no spec rebuilds it, so the base is refused."""
    base = tiny_base("helium")
    base.model.layers[1].forward = _adds_constant(base.model.layers[1].forward)
    with pytest.raises(ArchRefused, match=r"'helium': layer output \(norms and residuals\) does not match the "
                                          r"rebuilt layer at layer 1: max error .*Supported families: .*llama"):
        get_l2d_model(base, tiny_config())


def test_a_broken_attention_is_named_with_its_layer():
    base = tiny_base("helium")
    base.model.layers[0].self_attn.forward = _adds_constant(base.model.layers[0].self_attn.forward)
    with pytest.raises(ArchRefused, match="attention output does not match the rebuilt layer at layer 0"):
        get_l2d_model(base, tiny_config())


def _adds_constant(forward):
    def broken(*args, **kwargs):
        out = forward(*args, **kwargs)
        return (out[0] + 0.05, *out[1:]) if isinstance(out, tuple) else out + 0.05
    return broken


def test_a_hand_written_family_is_checked_on_request_and_a_wrong_spec_refused():
    base = tiny_base("gemma2")
    assert check(ArchAdapter(base, verify=False)) < 1e-5  # the fast path passes the check too
    wrong = dataclasses.replace(get_spec(base.config), post_attn_norm=None)
    with pytest.raises(ArchRefused, match="gemma2.*does not match the rebuilt layer at layer 0"):
        ArchAdapter(base, wrong, verify=True)


@pytest.mark.parametrize("family,broken", [("olmo", dict(q_clip=None)), ("cohere2", dict(nope_layers=()))])
def test_the_check_sees_the_quirks_the_derivation_finds(family, broken):
    """Query clipping (olmo's clip_qkv) and NoPE layers (cohere2's global layers) matter: a spec
    without them is refused."""
    base = tiny_base(family)
    spec = ArchAdapter(base).spec
    with pytest.raises(ArchRefused, match="attention output does not match"):
        check(ArchAdapter(base, dataclasses.replace(spec, **broken), verify=False))


@pytest.mark.parametrize("overrides,layout", [
    (dict(new_decoder_architecture=True, num_kv_heads=2), "grouped"),
    (dict(multi_query=False), "neox"),
    (dict(parallel_attn=False, multi_query=False), "neox")])
def test_falcon_layouts_are_told_apart_by_the_check(overrides, layout):
    base = tiny_base("falcon", **overrides)
    model = get_l2d_model(base, tiny_config())
    assert model.arch.spec.q_layout == layout
    assert model.arch.spec.parallel == overrides.get("parallel_attn", True)


def test_the_check_runs_once_per_model():
    import l2d.arch_check as arch_check

    base = tiny_base("arcee")
    calls = []
    real = arch_check.check
    arch_check.check = lambda arch, **kw: calls.append(1) or real(arch, **kw)
    try:
        get_l2d_model(base, tiny_config())
        ArchAdapter(base)
    finally:
        arch_check.check = real
    assert len(calls) <= 1


@pytest.mark.parametrize("family,kw,match", [
    ("mamba", dict(vocab_size=64, hidden_size=16, num_hidden_layers=1), "no attention module"),
    ("bloom", dict(vocab_size=64, hidden_size=16, n_layer=1, n_head=2), "ALiBi")])
def test_recurrent_and_alibi_families_are_refused_with_the_reason(family, kw, match):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw))
    with pytest.raises(ArchRefused, match=f"'{family}': .*{match}.*Supported families: .*llama"):
        get_l2d_model(base, tiny_config())
