"""context="adapted": the queries read the keys/values of a second pass of the frozen layers with
the path's q/o/MLP deltas on; the main path, t = 0 and steps=0 stay the base."""
import pytest
import torch
import torch.nn.functional as F

from l2d import L2DConfig, L2DModel, get_l2d_model
from l2d.main_path import positions_from_mask
from l2d.train import freeze_parts
from tiny import batch, randomize_path, tiny_base, tiny_config as _tiny_config


def tiny_config(**kw):
    """The recipe's path (the stream starts as the main path, open merge gate): what the adapted
    context pass and stream_layers are built for (stream_layers needs it)."""
    return _tiny_config(**{"stream_init": "main", "merge_init": "open", **kw})


FAMILIES = ["llama", "mistral", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "olmo2", "granite"]


def _deltas_only(model, seed=1, scale=0.5):
    """Random q/o/MLP deltas; the encoder, heads and merge keep their init, so at every t > 0 the
    diffusion stream is the frozen layers plus the deltas (and the merge passes it through)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.path.named_parameters():
            if "delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5)


def _adapted_base_logits(model, ids, mask=None):
    """The base with the deltas switched on at every position (what a q/o/MLP LoRA computes)."""
    pos = None if mask is None else positions_from_mask(mask)  # as the main path numbers left-padded rows
    with model.path.switch.context_pass():
        return model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_t0_is_the_base_and_the_path_starts_as_the_base(family):
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(context="adapted")).eval()
    ids, _ = batch(seed=2)
    with torch.no_grad():
        ref = base(input_ids=ids).logits.float()
        for t in (0.0, 0.6):
            assert (model(ids, t=t).logits - ref).abs().max() < 1e-5
        randomize_path(model)
        assert (model(ids, t=0.0).logits - ref).abs().max() < 1e-5
        assert (model(ids, t=0.6).logits - ref).abs().max() > 1e-3
        # the hooks act only inside the context pass: the base used alone is untouched
        assert (base(input_ids=ids).logits.float() - ref).abs().max() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stream_at_every_position_is_the_adapted_context_pass(family):
    """With only the deltas trained, the stream at position i is layer by layer the context pass
    at position i (same deltas, and it reads that pass's keys/values), so the two give the same
    logits everywhere. This pins the q hooks on fused q/k/v layouts, the o and MLP hooks and the
    key/value plumbing; with frozen context the same weights give other logits (two layers)."""
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(context="adapted")).eval()
    _deltas_only(model)
    ids, _ = batch(seed=3, T=9)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        want = _adapted_base_logits(model, ids, mask)
        got = model(ids, mask, t=0.7).logits
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
        frozen = get_l2d_model(tiny_base(family), tiny_config())
        frozen.path.load_state_dict(model.path.state_dict())
        assert (frozen.eval()(ids, mask, t=0.7).logits - got)[keep].abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])
def test_the_deltas_learn_through_the_context_keys_and_values(family):
    """The training gradient of the deltas is that of the adapted base's loss: every position's
    deltas get it through the keys/values the supervised position reads."""
    model = get_l2d_model(tiny_base(family), tiny_config(context="adapted")).train()
    _deltas_only(model)
    ids, labels = batch(seed=4, T=10, prompt=8)
    params = [p for n, p in model.path.named_parameters() if "delta" in n]
    loss = model(ids, labels=labels, t=0.5, self_conditioning=False).loss
    got = torch.autograd.grad(loss, params)
    logits = _adapted_base_logits(model, ids)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    want = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.base_model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_generation_extends_the_context_cache_token_by_token(family):
    """Greedy generation at any steps (the stream is the adapted pass here) equals the adapted base's
    own generate: the second cache grows correctly, with left padding; steps=0 is the base."""
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(context="adapted")).eval()
    _deltas_only(model, scale=1.0)
    ids, _ = batch(seed=5, B=2, T=7)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    ref = base.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(model.generate(ids, mask, steps=0, max_new_tokens=6, pad_token_id=0, eos_token_id=2), ref)
    with model.path.switch.context_pass():
        adapted = base.generate(ids, attention_mask=mask, **kw)
    assert not torch.equal(adapted, ref)  # the deltas change what the base would say
    for steps in (1, 3):
        got = model.generate(ids, mask, steps=steps, max_new_tokens=6, pad_token_id=0, eos_token_id=2, seed=0)
        assert torch.equal(got, adapted)


def test_save_load_and_unload(tmp_path):
    base = tiny_base("llama")
    model = get_l2d_model(base, tiny_config(context="adapted")).eval()
    randomize_path(model)
    ids, _ = batch(seed=6)
    noise = torch.randn(*ids.shape, model.config.latent_dim)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        out = model(ids, t=0.4, noise=noise).logits
    model.save_pretrained(tmp_path)
    model.unload()  # removes the hooks, so a fresh adapter can attach to the same base
    assert torch.equal(base(input_ids=ids).logits, ref)
    loaded = L2DModel.from_pretrained(base, str(tmp_path))
    assert loaded.config.context == "adapted"
    with torch.no_grad():
        assert torch.equal(loaded(ids, t=0.4, noise=noise).logits, out)


def test_bad_context_settings_are_refused():
    with pytest.raises(ValueError, match="context must be one of"):
        L2DConfig(context="lora")


def test_with_a_frozen_zero_merge_head_training_skips_the_main_path_and_loses_nothing(monkeypatch):
    """Heads frozen (the SmolLM2 recipe): the open merge gate is exactly 1 at t > 0, so the merge
    returns the stream and the frozen main pass is not run; loss and gradients are unchanged."""
    model = get_l2d_model(tiny_base("llama"), tiny_config(context="adapted")).train()
    _deltas_only(model)
    freeze_parts(model, ["heads"])
    ids, labels = batch(seed=8, T=10, prompt=6)
    noise = torch.randn(*ids.shape, model.config.latent_dim, generator=torch.Generator().manual_seed(0))
    calls = []
    run_main_path = model.run_main_path
    monkeypatch.setattr(model, "run_main_path", lambda *a, **k: calls.append(1) or run_main_path(*a, **k))
    params = [p for p in model.path.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = model(ids, labels=labels, t=0.3, noise=noise, self_conditioning=True).loss
        return loss, torch.autograd.grad(loss, params)

    skipped, skipped_grads = loss_and_grads()
    assert calls == []
    model.path.merge[1].weight.requires_grad_(True)  # a trainable gate needs the main path again
    full, full_grads = loss_and_grads()
    assert calls == [1]
    torch.testing.assert_close(skipped, full, atol=1e-6, rtol=1e-6)
    for a, b in zip(skipped_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # t = 0 somewhere: the base's own prediction there needs the main path
        model(ids, labels=labels, t=0.0)
    assert calls == [1, 1]


class _ExpertsMLP(torch.nn.Module):
    """An MLP whose weights are bare parameters (as mixture-of-experts weights are): the path
    gives it one parallel adapter instead of per-linear deltas."""

    def __init__(self, hidden: int, inner: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_in = torch.nn.Parameter(torch.randn(inner, hidden, generator=g) * 0.2)
        self.w_out = torch.nn.Parameter(torch.randn(hidden, inner, generator=g) * 0.2)

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.w_in)), self.w_out)


def test_a_parallel_mlp_adapter_also_acts_in_the_context_pass():
    base = tiny_base("llama")
    for i, layer in enumerate(base.model.layers):
        layer.mlp = _ExpertsMLP(32, 48, seed=i)
    base.requires_grad_(False)
    model = get_l2d_model(base, tiny_config(context="adapted")).eval()
    assert all(block.mlp_deltas.parallel is not None for block in model.path.blocks)
    _deltas_only(model)
    ids, _ = batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, t=0.7).logits, _adapted_base_logits(model, ids), atol=1e-4, rtol=1e-4)
        assert (_adapted_base_logits(model, ids) - base(input_ids=ids).logits).abs().max() > 1e-3


def _zero_deltas_below(model, first: int):
    """The q/o/MLP deltas of layers below ``first`` set to zero (the path's other parts as they are)."""
    with torch.no_grad():
        for block in [b for b in model.path.blocks if b.index < first]:
            for name, p in block.named_parameters():
                if "delta" in name:
                    p.zero_()


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gemma3_text"])
def test_context_pass_stops_once_the_last_keys_are_cached(family):
    """The context pass is read only through its keys/values: it ends when the last layer has cached
    them (its MLP never runs), with the same keys/values as the whole forward, when appending too,
    and the base used alone afterwards is untouched."""
    from l2d.arch import KVOnlyCache

    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(context="adapted")).eval()
    _deltas_only(model)
    ids, _ = batch(seed=7, T=8)
    mask = torch.ones_like(ids)
    pos = positions_from_mask(mask)
    calls = []
    hook = model.arch.mlp(model.arch.num_layers - 1).register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ref = base(input_ids=ids, output_hidden_states=True)
        with model.path.switch.context_pass():
            full = model.arch.run_backbone(ids, mask, pos)  # the whole forward, deltas on
        assert len(calls) == 2  # (the base's forward and this one)
        calls.clear()
        cache = model.context_pass(ids[:, :5], mask[:, :5], pos[:, :5])[0]
        assert isinstance(cache, KVOnlyCache) and not calls  # the last MLP did not run
        cache = model.context_pass(ids[:, 5:], mask, pos[:, 5:], cache=cache)[0]  # appending, as generate does
        assert not calls
        for got, want in zip(cache.layers, full.layers):
            torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
        after = base(input_ids=ids, output_hidden_states=True)
    hook.remove()
    assert torch.equal(after.logits, ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(after.hidden_states, ref.hidden_states))
