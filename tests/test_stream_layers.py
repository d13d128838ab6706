"""stream_layers=k: the diffusion stream runs through the top k decoder layers only, taking up what
layer L-k receives in the main path (or in the adapted context pass) at the query position."""
import pytest
import torch

from l2d import L2DConfig, L2DModel, get_l2d_model
from l2d.train import freeze_parts
from tiny import batch, randomize_path, tiny_base, tiny_config as _tiny_config


def tiny_config(**kw):
    """The recipe's path (the stream starts as the main path, open merge gate): what the adapted
    context pass and stream_layers are built for (stream_layers needs it)."""
    return _tiny_config(**{"stream_init": "main", "merge_init": "open", **kw})


LAYERS = 4
FAMILIES = ["llama", "gemma2", "gpt2", "phi3", "gemma3_text"]  # plain, post-norms, Conv1D, fused qkv, sliding


def deep_base(family: str = "llama", seed: int = 0):
    return tiny_base(family, seed=seed, **({"n_layer": LAYERS} if family == "gpt2" else {"num_hidden_layers": LAYERS}))


def test_blocks_cover_the_stream_and_the_layers_the_context_pass_adapts():
    frozen = get_l2d_model(deep_base(), tiny_config(stream_layers=2))
    assert frozen.path.stream_start == 2
    assert [b.index for b in frozen.path.blocks] == [2, 3]
    assert all(b.in_stream for b in frozen.path.blocks)
    assert [k.split(".")[1] for k in frozen.path.state_dict() if k.startswith("blocks.")][0] == "2"  # keyed by layer
    with pytest.raises(IndexError, match="layer 0 has no diffusion block"):
        frozen.path.blocks[0]

    adapted = get_l2d_model(deep_base(), tiny_config(context="adapted", stream_layers=1))
    assert [b.index for b in adapted.path.blocks] == [0, 1, 2, 3]  # every layer's deltas act in the context pass
    assert [b.in_stream for b in adapted.path.blocks] == [False, False, False, True]
    assert [hasattr(b, "adaln") for b in adapted.path.blocks] == [False, False, False, True]

    full = get_l2d_model(deep_base(), tiny_config())
    assert frozen.get_nb_trainable_parameters()[0] < full.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("context", ["frozen", "adapted"])
@pytest.mark.parametrize("family", FAMILIES)
def test_starts_as_the_base_and_t0_stays_the_base(family, context):
    base = deep_base(family)
    model = get_l2d_model(base, tiny_config(context=context, stream_layers=2)).eval()
    ids, _ = batch(seed=2)
    with torch.no_grad():
        ref = base(input_ids=ids).logits.float()
        for t in (0.0, 0.3, 1.0):
            assert (model(ids, t=t).logits - ref).abs().max() < 1e-5
        randomize_path(model)
        assert (model(ids, t=0.0).logits - ref).abs().max() < 1e-5
        assert (model(ids, t=0.6).logits - ref).abs().max() > 1e-3


def _quiet_below(model, start: int, keep_deltas: bool):
    """A full-depth path that, below layer ``start``, computes what the base (or, ``keep_deltas``,
    the adapted context pass) computes: its latent never enters there (encoder output zero) and
    those blocks are unmodulated; their deltas zeroed unless kept."""
    with torch.no_grad():
        model.path.encoder.net[-1].weight.zero_()
        model.path.encoder.net[-1].bias.zero_()
        for block in model.path.blocks:
            if block.index < start:
                block.adaln[1].weight.zero_()
                block.adaln[1].bias.zero_()
                if not keep_deltas:
                    for name, p in block.named_parameters():
                        if "delta" in name:
                            p.zero_()


@pytest.mark.parametrize("context", ["frozen", "adapted"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_top_stream_takes_up_what_the_full_stream_computes_below(family, context):
    """The top-k stream starts from layer L-k's input at the query position. A full-depth stream with
    the same weights, whose latent has no effect below L-k, computes exactly that input there (the
    main path's, or with an adapted context the context pass's, deltas included), so the two agree
    at every t, with left padding; the top-k model's own latent then enters at layer L-k."""
    start = 2
    full = get_l2d_model(deep_base(family), tiny_config(context=context)).eval()
    randomize_path(full)
    _quiet_below(full, start, keep_deltas=context == "adapted")
    top = get_l2d_model(deep_base(family), tiny_config(context=context, stream_layers=LAYERS - start)).eval()
    missing, unexpected = top.path.load_state_dict(full.path.state_dict(), strict=False)
    assert not missing
    assert all(int(k.split(".")[1]) < start for k in unexpected)  # the lower blocks' heads (and deltas)
    ids, _ = batch(seed=3, T=9)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    noise = torch.randn(*ids.shape, full.config.latent_dim)
    keep = mask.bool()
    with torch.no_grad():
        for t in (0.2, 0.9):
            want = full(ids, mask, t=t, noise=noise).logits
            got = top(ids, mask, t=t, noise=noise).logits
            torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
        randomize_path(top, seed=5)  # now the latent enters at layer L-k: a different function
        assert (top(ids, mask, t=0.9, noise=noise).logits - want)[keep].abs().max() > 1e-3


@pytest.mark.parametrize("context", ["frozen", "adapted"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_generation_token_by_token_matches_the_teacher_forced_stream(family, context):
    """One Euler step reads the field once at t=0+ (pure noise) and once at t=1: greedy generation
    with left padding picks what a teacher-forced forward over the generated text predicts at the
    same times and noise, position by position; steps=0 is the base."""
    base = deep_base(family)
    model = get_l2d_model(base, tiny_config(context=context, stream_layers=2)).eval()
    randomize_path(model, scale=1.0)
    with torch.no_grad():
        model.path.encoder.net[-1].weight.zero_()  # the t=1 read-out then ignores the latent: a
        model.path.encoder.net[-1].bias.zero_()    # deterministic function of the context alone
    ids, _ = batch(seed=5, B=2, T=7)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kw = dict(max_new_tokens=5, pad_token_id=0, eos_token_id=-1)
    ref = base.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(model.generate(ids, mask, steps=0, **kw), ref)
    got = model.generate(ids, mask, steps=1, seed=0, **kw)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(got, full_mask, t=1.0).logits
    want = logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(got[:, ids.shape[1]:], want)
    assert not torch.equal(got, ref)


def test_training_reaches_the_right_parameters():
    """Adapted context, stream in the top layer: the lower layers' deltas learn through the context
    pass; the heads exist only where the stream runs; the base stays frozen."""
    model = get_l2d_model(deep_base(), tiny_config(context="adapted", stream_layers=1)).train()
    randomize_path(model)
    ids, labels = batch(seed=4, T=10, prompt=6)
    model(ids, labels=labels).loss.backward()
    for block in model.path.blocks:
        assert block.q_delta.A.grad is not None and block.q_delta.A.grad.abs().sum() > 0
    assert model.path.blocks[3].adaln[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.base_model.parameters())
    freeze_parts(model, ["heads"])  # the recipe's setting works with head-less lower blocks
    assert not model.path.blocks[3].adaln[1].weight.requires_grad


def test_save_load_round_trip_and_mismatched_base(tmp_path):
    base = deep_base()
    model = get_l2d_model(base, tiny_config(context="adapted", stream_layers=2)).eval()
    randomize_path(model)
    ids, _ = batch(seed=6)
    noise = torch.randn(*ids.shape, model.config.latent_dim)
    with torch.no_grad():
        out = model(ids, t=0.4, noise=noise).logits
    model.save_pretrained(tmp_path)
    model.unload()
    loaded = L2DModel.from_pretrained(base, str(tmp_path)).eval()
    assert loaded.config.stream_layers == 2 and loaded.path.stream_start == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids, t=0.4, noise=noise).logits, out)
    with pytest.raises(ValueError, match="stream_layers=5 but the base has 4 decoder layers"):
        get_l2d_model(deep_base(), tiny_config(stream_layers=5))


@pytest.mark.parametrize("kw, message", [
    (dict(stream_layers=0), "stream_layers must be a positive number"),
    (dict(stream_layers=2, stream_init="encoder"), "stream_layers needs stream_init='main'"),
])
def test_bad_stream_layers_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        L2DConfig(**kw)
