"""L2DModel: wrap, invariants, training signal, save/load, bad input."""
import json
import os

import pytest
import torch

from l2d import L2DConfig, L2DModel, get_l2d_model
from tiny import FAMILIES, VOCAB, batch, randomize_path, tiny_base, tiny_config


def _base_logits(base, ids, mask=None):
    with torch.no_grad():
        return base(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wrap_forward_backward_save_load(family, tmp_path):
    base = tiny_base(family)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_l2d_model(base, tiny_config(stream_init="main" if family in ("qwen3", "phi3", "gpt2") else "encoder"))
    ids, labels = batch()
    model.train()
    out = model(ids, labels=labels, class_labels=["math", "code"])
    assert torch.isfinite(out.loss) and out.num_tokens == (labels[:, 1:] != -100).sum()
    out.loss.backward()
    assert all(not p.requires_grad for p in base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.path.parameters())
    torch.optim.AdamW(model.path.parameters(), lr=1e-2).step()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"base parameter {k} changed"

    randomize_path(model)
    model.eval()
    t = torch.rand(2, 12)
    noise = torch.randn(2, 12, 16)
    ref = model(ids, t=t, noise=noise, class_labels=[0, 1]).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["l2d_config.json", "l2d_model.safetensors"]
    cfg = json.load(open(tmp_path / "l2d_config.json"))
    assert cfg["_l2d"]["base_fingerprint"]["model_type"] == base.config.model_type
    assert cfg["_l2d"]["l2d_version"]
    loaded = L2DModel.from_pretrained(tiny_base(family), str(tmp_path))
    got = loaded(ids, t=t, noise=noise, class_labels=[0, 1]).logits
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("stream_init,merge_init", [
    ("encoder", "zero"), ("main", "zero"), ("encoder", "ramp"), ("main", "ramp"), ("main", "open")])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox", "granite", "olmo2"])
def test_t0_equals_the_base_before_and_after_training(family, stream_init, merge_init):
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(stream_init=stream_init, merge_init=merge_init)).eval()
    ids, _ = batch(seed=3)
    ref = _base_logits(base, ids)
    for t in (0.0, 0.3, 0.99):  # at init the path is the identity at every t
        assert (model(ids, t=t).logits - ref).abs().max() < 1e-5
    randomize_path(model)
    assert (model(ids, t=0.0).logits - ref).abs().max() < 1e-5
    assert (model(ids, t=0.7).logits - ref).abs().max() > 1e-3  # the path does something off t=0


def test_the_encoder_reads_x_t_over_its_marginal_std():
    """x_t / s(t): unit variance at every t, and z itself at t = 1."""
    model = get_l2d_model(tiny_base("llama"), tiny_config(sigma=4.0)).eval()
    seen = {}
    model.path.encoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    ids = torch.randint(3, VOCAB, (64, 12), generator=torch.Generator().manual_seed(0))
    emb = model.base_model.get_input_embeddings().weight
    d = model.config.latent_dim
    for t in (0.3, 0.7, 1.0):
        torch.manual_seed(1)
        with torch.no_grad():
            model(ids, t=t)
        x = seen["x"][:, :-1]  # the last position has no target (pure noise)
        z = model.path.latent.lookup(emb, ids[:, 1:])
        s2 = (1 - t) ** 2 * model.config.sigma ** 2 + t ** 2
        if t == 1.0:
            torch.testing.assert_close(x, z)
        else:
            assert abs(x.pow(2).mean().item() - 1.0) < 0.05
    assert seen["x"].shape[-1] == d


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "olmo2"])
def test_a_main_initialised_stream_starts_as_the_main_path(family):
    """stream_init='main': with the encoded latent removed, the stream at init recomputes h_main exactly."""
    model = get_l2d_model(tiny_base(family), tiny_config(stream_init="main")).eval()
    torch.nn.init.zeros_(model.path.encoder.net[-1].weight)
    torch.nn.init.zeros_(model.path.encoder.net[-1].bias)
    ids, _ = batch(seed=5)
    main = model.run_main_path(ids)
    T = ids.shape[1]
    query_index = torch.arange(T).expand_as(ids)
    ctx = model.stream_context(main, query_index)
    seen = {}
    model.path.merged = lambda h_main, h_f, *a: seen.setdefault("h_f", h_f)
    t = torch.full(ids.shape, 0.6)
    model.path(model.arch, ctx, main.hidden, torch.randn(2, T, 16), t, torch.zeros(2, T, 16),
               model.class_tensor(None, 2), h_start=main.stream_input)
    torch.testing.assert_close(seen["h_f"], main.hidden.float(), atol=2e-5, rtol=1e-4)


def test_loss_is_the_same_at_supervised_positions_only_and_at_all_positions():
    model = get_l2d_model(tiny_base("qwen3"), tiny_config(self_conditioning=0.0)).eval()
    randomize_path(model)
    ids, labels = batch(T=14)
    labels[1, :9] = -100  # rows supervise different numbers of tokens
    t, noise = torch.rand(2, 14), torch.randn(2, 14, 16)
    packed = model(ids, labels=labels, t=t, noise=noise).loss
    everywhere = model(ids, labels=labels, t=t, noise=noise, output_logits=True)
    torch.testing.assert_close(packed, everywhere.loss, atol=1e-5, rtol=1e-5)
    assert everywhere.logits.shape == (2, 14, VOCAB)


@pytest.mark.parametrize("context", ["frozen", "adapted"])
def test_gradient_checkpointing_recomputes_the_same_loss_and_gradients(context):
    model = get_l2d_model(tiny_base("llama"), tiny_config(context=context)).train()
    randomize_path(model)
    ids, labels = batch(T=14)
    labels[1, :9] = -100
    t, noise = torch.rand(2, 14), torch.randn(2, 14, 16)

    def loss_and_grads():
        torch.manual_seed(0)  # the same class dropout
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels, t=t, noise=noise, self_conditioning=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        model(ids, labels=labels, t=t, noise=noise, self_conditioning=True).loss.backward()
    checkpointed, grads_ckpt = loss_and_grads()
    model.gradient_checkpointing_disable()
    full = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: full.append(x.numel()) or x, lambda x: x):
        model(ids, labels=labels, t=t, noise=noise, self_conditioning=True).loss.backward()
    torch.testing.assert_close(checkpointed, plain)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    assert sum(saved) < sum(full)  # the blocks' activations are not kept for backward


def test_self_conditioning_changes_the_input_and_keeps_gradients_on_the_second_pass():
    model = get_l2d_model(tiny_base("llama"), tiny_config()).eval()
    randomize_path(model)
    ids, labels = batch()
    t, noise = torch.full((2, 12), 0.8), torch.randn(2, 12, 16)
    off = model(ids, labels=labels, t=t, noise=noise, self_conditioning=False).loss
    on = model(ids, labels=labels, t=t, noise=noise, self_conditioning=True)
    assert not torch.allclose(off, on.loss)
    on.loss.backward()
    assert model.path.encoder.net[0].weight.grad is not None


def test_latents_have_norm_sqrt_d():
    model = get_l2d_model(tiny_base("llama"), tiny_config(latent_dim=16))
    z = model.latent_table()
    assert z.shape == (VOCAB, 16)
    nonzero = model.base_model.get_input_embeddings().weight.abs().sum(-1) > 0  # the pad row is all zeros
    torch.testing.assert_close(z[nonzero].norm(dim=-1), torch.full((int(nonzero.sum()),), 4.0), atol=1e-5, rtol=0)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("stream_init", ["encoder", "main"])
@pytest.mark.parametrize("merge_init", ["ramp", "open"])
def test_an_open_merge_gives_the_path_gradients_from_the_first_step(stream_init, merge_init):
    """merge_init='zero' leaves every delta without gradient at init (the merge gate is zero);
    'ramp' and 'open' open the gate, so the deltas (with stream_init='main' every one) learn at once."""
    ids, labels = batch(seed=4)
    grads = {}
    for init in ("zero", merge_init):
        model = get_l2d_model(tiny_base("llama"), tiny_config(stream_init=stream_init, merge_init=init,
                                                              self_conditioning=0.0))
        model(ids, labels=labels, t=0.5).loss.backward()
        grads[init] = {n: p.grad.abs().sum().item() if p.grad is not None else 0.0
                       for n, p in model.path.named_parameters()}
    zero_deltas = [v for n, v in grads["zero"].items() if n.endswith(".B")]
    opened = grads[merge_init]
    assert zero_deltas and all(v == 0.0 for v in zero_deltas)
    assert opened["encoder.net.2.weight"] > 0
    # h_f equals what it is merged against at init (up to rounding): nothing for m to gate yet
    assert opened["merge.1.weight"] < 1e-4 * opened["encoder.net.2.weight"]
    if stream_init == "main":
        q_b = [v for n, v in opened.items() if "q_delta.B" in n]
        assert q_b and all(v > 0 for v in q_b)


@pytest.mark.parametrize("variant,stream_init,merge_init", [("lora", "encoder", "zero"), ("full", "encoder", "zero"),
                                                            ("lora", "main", "zero"), ("lora", "main", "ramp"),
                                                            ("lora", "encoder", "ramp"), ("lora", "main", "open")])
def test_a_tiny_model_learns(variant, stream_init, merge_init):
    torch.manual_seed(0)
    # A wider init than the default 0.02: with hidden 32 a 0.02 head cannot make confident logits.
    base = tiny_base("llama", initializer_range=0.2)
    model = get_l2d_model(base, tiny_config(path_variant=variant, stream_init=stream_init, self_conditioning=0.0,
                                            class_dropout=0.0, merge_init=merge_init))
    # Fixed data the random base cannot know: after a prompt, the answer is a fixed function of it.
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, VOCAB, (16, 6), generator=g)
    answers = (prompts[:, :3] * 7 + 5) % (VOCAB - 3) + 3
    ids = torch.cat([prompts, answers], 1)
    labels = ids.clone()
    labels[:, :6] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model.eval()
    with torch.no_grad():
        logits = model(ids, t=0.98).logits[:, 5:-1]
        base_logits = _base_logits(base, ids)[:, 5:-1]
    target = ids[:, 6:]
    acc = (logits.argmax(-1) == target).float().mean()
    base_acc = (base_logits.argmax(-1) == target).float().mean()
    assert acc > base_acc + 0.2
    assert (model(ids, t=0.0).logits - _base_logits(base, ids)).abs().max() < 1e-5


@pytest.mark.parametrize("context", ["frozen", "adapted"])
def test_bfloat16_runs_and_keeps_t0_exact(context):
    base = tiny_base("llama", dtype=torch.bfloat16)
    model = get_l2d_model(base, tiny_config(context=context))
    ids, labels = batch()
    out = model(ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.dtype == torch.float32 for p in model.path.parameters())
    assert model.path.blocks[0].q_delta.A.grad is not None
    randomize_path(model)
    ref = _base_logits(base, ids).float()
    assert (model(ids, t=0.0).logits - ref).abs().max() < 1e-2  # bf16 head in a different GEMM shape


def test_disable_adapter_is_the_base_and_training_mode_keeps_base_in_eval():
    base = tiny_base("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    model = get_l2d_model(base, tiny_config())
    randomize_path(model)
    model.train()
    assert not base.training
    ids, _ = batch()
    with model.disable_adapter():
        torch.testing.assert_close(model(ids, t=0.9).logits, _base_logits(base, ids))


def test_save_pretrained_takes_a_gathered_state_dict(tmp_path):
    """What `l2d train` does under FSDP/DeepSpeed: the whole model's (gathered) state dict is passed
    in and only the path's weights are written, under the path's own names."""
    from safetensors.torch import load_file

    model = get_l2d_model(tiny_base("llama"), tiny_config())
    randomize_path(model)
    model.save_pretrained(tmp_path / "live")
    model.save_pretrained(tmp_path / "whole", state_dict=model.state_dict())
    model.save_pretrained(tmp_path / "path", state_dict=model.path.state_dict())
    live = load_file(tmp_path / "live" / "l2d_model.safetensors")
    for name in ("whole", "path"):
        got = load_file(tmp_path / name / "l2d_model.safetensors")
        assert got.keys() == live.keys() and all(torch.equal(got[k], live[k]) for k in live)
    partial = {k: v for k, v in model.state_dict().items() if ".blocks.0." not in k}
    with pytest.raises(ValueError, match="lacks path weights"):
        model.save_pretrained(tmp_path / "bad", state_dict=partial)


# --- bad input --------------------------------------------------------------------------------
def test_adapter_for_another_base_is_refused(tmp_path):
    get_l2d_model(tiny_base("llama"), tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_size: adapter 32 vs base 64"):
        L2DModel.from_pretrained(tiny_base("llama", hidden_size=64), str(tmp_path))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        L2DModel.from_pretrained(tiny_base("llama", num_hidden_layers=3), str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size"):
        L2DModel.from_pretrained(tiny_base("llama", vocab_size=100), str(tmp_path))


def test_missing_and_corrupt_adapter_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="l2d_config.json"):
        L2DModel.from_pretrained(tiny_base("llama"), str(tmp_path))
    get_l2d_model(tiny_base("llama"), tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "l2d_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        L2DModel.from_pretrained(tiny_base("llama"), str(tmp_path))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="l2d_model.safetensors"):
        L2DModel.from_pretrained(tiny_base("llama"), str(tmp_path))
    (tmp_path / "l2d_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        L2DModel.from_pretrained(tiny_base("llama"), str(tmp_path))


def test_bad_batches_fail_before_any_work():
    model = get_l2d_model(tiny_base("llama"), tiny_config())
    ids, labels = batch()
    with pytest.raises(ValueError, match="supervise no token"):
        model(ids, labels=torch.full_like(labels, -100))
    bad = ids.clone()
    bad[0, 0] = VOCAB
    with pytest.raises(ValueError, match="outside"):
        model(bad, labels=labels)
    with pytest.raises(ValueError, match="not one this adapter knows"):
        model(ids, labels=labels, class_labels=["poetry", "math"])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        model(ids, t=1.5)
    with pytest.raises(ValueError, match="unknown keys"):
        L2DConfig.from_dict({"sigmaa": 3})
    with pytest.raises(ValueError, match="schedule"):
        L2DConfig(schedule="linear")


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
