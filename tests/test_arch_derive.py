"""Derived specs (l2d/arch_derive.py) and the wrap-time check (l2d/arch_check.py).

A family without a hand-written spec is wrapped from a spec derived from the model itself and
accepted only when its rebuilt decoder layers (the first, the last and one of each kind) match the
real ones; everything the hand-written families promise then holds for it too: t=0 is the base,
training reaches the path, steps=0 generation is base.generate token for token (left padding
included), save/load round-trips.
"""
import dataclasses

import pytest
import torch

import l2d.arch
from l2d import L2DModel, get_l2d_model
from l2d.arch import ArchAdapter, ArchRefused, get_spec
from l2d.arch_check import check, checked_layers
from tiny import COMMON, DERIVED, FAMILIES, batch, randomize_path, tiny_base, tiny_config


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


# --- which layers the check rebuilds -------------------------------------------------------
def _smollm3(**kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("smollm3", **{**COMMON, "num_key_value_heads": 2, **kw})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("make,checked", [
    (lambda: tiny_base("llama", num_hidden_layers=6), [0, 5]),  # all alike: the first and the last
    (lambda: tiny_base("gemma3_text", num_hidden_layers=6), [0, 1, 5]),  # sliding and full layers
    (lambda: tiny_base("cohere2", num_hidden_layers=6, layer_types=["sliding_attention"] * 3 + [
        "full_attention", "full_attention", "sliding_attention"]), [0, 3, 5]),  # full layers without rotary
    (lambda: tiny_base("qwen2_moe", num_hidden_layers=6, mlp_only_layers=[2, 3]), [0, 2, 5]),  # dense layers
    (lambda: _smollm3(num_hidden_layers=6, no_rope_layer_interval=2), [0, 1, 5]),  # NoPE layers
])
def test_the_check_rebuilds_the_first_the_last_and_one_layer_of_each_kind(make, checked):
    base = make()
    assert checked_layers(base.model.layers, base.config) == checked


def test_a_layer_with_a_patched_forward_or_its_own_hook_is_a_kind_of_its_own():
    base = tiny_base("llama", num_hidden_layers=6)
    base.model.layers[2].mlp.forward = _adds_constant(base.model.layers[2].mlp.forward)
    base.model.layers[3].self_attn.register_forward_hook(lambda m, a, out: None)
    assert checked_layers(base.model.layers, base.config) == [0, 2, 3, 5]


def test_the_check_runs_only_the_layers_it_rebuilds_and_restores_the_model():
    base = tiny_base("llama", num_hidden_layers=6, vocab_size=1000)  # a head of more than HEAD_ROWS rows
    ran = []
    for i, layer in enumerate(base.model.layers):
        layer.mlp.register_forward_hook(lambda m, a, out, i=i: ran.append(i))  # the same hook on each
    assert check(ArchAdapter(base, verify=False)) < 1e-5
    assert ran == [0, 5]
    assert all("forward" not in vars(m) for m in base.modules())  # no pass-through or cut head left
    ids, _ = batch()
    ran.clear()
    with torch.no_grad():
        assert base(input_ids=ids).logits.shape[-1] == 1000
    assert ran == list(range(6))


def test_the_logits_check_sees_a_wrong_post_process_on_the_head_rows_it_computes():
    base = tiny_base("granite", vocab_size=1000)
    arch = ArchAdapter(base, verify=False)
    real = arch.logits_postprocess
    arch.logits_postprocess = lambda logits: real(logits) * 1.01
    with pytest.raises(ArchRefused, match=r"logits \(final norm and head\) does not match"):
        check(arch)


def test_a_broken_middle_layer_of_a_deep_model_is_refused():
    base = tiny_base("helium", num_hidden_layers=5)
    base.model.layers[2].forward = _adds_constant(base.model.layers[2].forward)
    with pytest.raises(ArchRefused, match=r"layer output \(norms and residuals\) does not match the rebuilt "
                                          r"layer at layer 2"):
        get_l2d_model(base, tiny_config())


def test_a_layer_kind_the_spec_gets_wrong_is_refused_and_the_derivation_finds_every_layer_of_it():
    base = tiny_base("cohere2", num_hidden_layers=6, layer_types=["sliding_attention"] * 3 + [
        "full_attention", "full_attention", "sliding_attention"])
    spec = ArchAdapter(base).spec
    assert spec.derived and spec.nope_layers == (3, 4)  # layer 4 not run by the trace: its kind's
    with pytest.raises(ArchRefused, match="attention output does not match the rebuilt layer at layer 3"):
        check(ArchAdapter(base, dataclasses.replace(spec, nope_layers=()), verify=False))
    nope = _smollm3(num_hidden_layers=6, no_rope_layer_interval=2)
    assert ArchAdapter(nope).spec.nope_layers == (1, 3, 5)


def test_a_stack_that_needs_every_layer_is_traced_and_checked_with_all_of_them(monkeypatch):
    """Where passing a layer through breaks the forward, the trace and the check run every layer."""
    base = tiny_base("llama", num_hidden_layers=4)
    ran = []
    cls = type(base.model.layers[0])
    real = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **kw: ran.append(1) or real(self, *a, **kw))
    base.model.embed_tokens.register_forward_hook(lambda *a: ran.clear())

    def needs_all(module, args):
        if len(ran) < 4:
            raise RuntimeError("a layer was passed through")
    base.model.norm.register_forward_pre_hook(needs_all)
    monkeypatch.delitem(l2d.arch.SPECS, "llama")
    assert get_l2d_model(base, tiny_config()).arch.spec.derived


def test_a_hand_written_family_is_wrapped_without_the_check(monkeypatch):
    """The fast path: tests/test_arch.py checks the hand-written specs once, not every wrap."""
    import l2d.arch_check as arch_check

    monkeypatch.setattr(arch_check, "check", lambda *a, **kw: pytest.fail("checked a hand-written spec"))
    get_l2d_model(tiny_base("llama"), tiny_config())
