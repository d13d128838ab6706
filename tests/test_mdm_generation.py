"""Masked-diffusion decoding (l2d.mdm.generation) and the DiffuGPT-layout loader."""
import json

import pytest
import torch

from l2d import MaskedDiffusionConfig, get_mdm_model
from l2d.mdm import commit_schedule, load_diffugpt
from tiny import batch, tiny_base


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    extra = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if request.param == "gpt2" else {}
    return get_mdm_model(tiny_base(request.param, **extra), MaskedDiffusionConfig()).eval()


def masks_seen(model, monkeypatch) -> list:
    """Record how many [MASK] tokens each forward pass of ``model`` sees, per row."""
    seen, real = [], model.hidden_states

    def spy(x, attention_mask, ratio=1.0):
        seen.append((x == model.mask_token_id).sum(1).tolist())
        return real(x, attention_mask, ratio)

    monkeypatch.setattr(model, "hidden_states", spy)
    return seen


def test_commit_schedule_sums_to_n_in_near_equal_steps():
    for n in range(1, 30):
        for steps in range(1, n + 1):
            plan = commit_schedule(n, steps)
            assert sum(plan) == n and len(plan) == steps and max(plan) - min(plan) <= 1 and min(plan) >= 1
    assert commit_schedule(7, 7) == [1] * 7 and commit_schedule(7, 1) == [7]


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_generate_commits_the_planned_number_of_tokens_per_step(model, monkeypatch, steps):
    ids, _ = batch(B=2, T=6)
    n = 7
    seen = masks_seen(model, monkeypatch)
    out = model.generate(ids, max_new_tokens=n, steps=steps, return_dict_in_generate=True)
    plan = commit_schedule(n, steps)
    assert out.forward_passes == steps == len(seen)
    assert [row[0] for row in seen] == [n - sum(plan[:s]) for s in range(steps)]  # masks left before each pass
    assert out.committed[:, 0].tolist() == plan and out.committed[:, 1].tolist() == plan
    assert out.sequences.shape == (2, 6 + n) and torch.equal(out.sequences[:, :6], ids)
    assert not (out.sequences == model.mask_token_id).any()


def test_steps_equal_to_positions_commits_one_per_step(model, monkeypatch):
    ids, _ = batch(B=1, T=5)
    seen = masks_seen(model, monkeypatch)
    out = model.generate(ids, max_new_tokens=6, steps=6, return_dict_in_generate=True)
    assert [row[0] for row in seen] == [6, 5, 4, 3, 2, 1]
    assert out.committed[:, 0].tolist() == [1] * 6


def test_one_step_greedy_is_the_argmax_of_one_pass(model):
    ids, _ = batch(B=2, T=5)
    n = 4
    x = torch.cat([ids, torch.full((2, n), model.mask_token_id)], 1)
    logits = model(x).logits[:, 4:-1]
    logits[..., model.mask_token_id] = float("-inf")
    out = model.generate(ids, max_new_tokens=n, steps=1)
    assert torch.equal(out[:, 5:], logits.argmax(-1))


def test_sampling_is_reproducible_per_row_and_respects_top_k(model):
    ids, _ = batch(B=2, T=5)
    kw = dict(max_new_tokens=5, steps=2, do_sample=True, temperature=1.5)
    a = model.generate(ids, seed=[3, 4], **kw)
    b = model.generate(ids, seed=[3, 4], **kw)
    alone = model.generate(ids[1:], seed=[4], **kw)
    assert torch.equal(a, b) and torch.equal(a[1:], alone)                    # a row's draws are its own
    greedy = model.generate(ids, max_new_tokens=5, steps=1)
    top1 = model.generate(ids, max_new_tokens=5, steps=1, do_sample=True, top_k=1, seed=0)
    assert torch.equal(greedy, top1)


def test_left_padded_rows_generate_as_they_do_alone(model):
    ids, _ = batch(B=2, T=6)
    short = ids[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    together = model.generate(padded, mask, max_new_tokens=4, steps=2)
    alone = model.generate(short, max_new_tokens=4, steps=2)
    assert torch.equal(together[:, 2:], alone)


def test_eos_ends_a_row(model):
    ids, _ = batch(B=1, T=5)
    out = model.generate(ids, max_new_tokens=6, steps=3)
    eos = int(out[0, 7])                                                      # pretend the 3rd new token ends it
    ended = model.generate(ids, max_new_tokens=6, steps=3, eos_token_id=eos, pad_token_id=0)
    first = (out[0, 5:] == eos).nonzero()[0].item()
    assert torch.equal(ended[0, :5 + first + 1], out[0, :5 + first + 1]) and (ended[0, 5 + first + 1:] == 0).all()


def test_infill_keeps_given_tokens_and_fills_every_mask(model, monkeypatch):
    ids, _ = batch(B=2, T=12)
    holes = torch.zeros_like(ids, dtype=torch.bool)
    holes[:, [2, 5, 6, 10]] = True
    x = ids.masked_fill(holes, model.mask_token_id)
    seen = masks_seen(model, monkeypatch)
    out = model.infill(x, steps=2, return_dict_in_generate=True)
    assert torch.equal(out.sequences[~holes], ids[~holes])
    assert not (out.sequences == model.mask_token_id).any() and [r[0] for r in seen] == [4, 2]


def test_infill_of_text():
    from tiny_tokenizer import VOCAB, tiny_tokenizer

    tok = tiny_tokenizer()
    model = get_mdm_model(tiny_base("llama", vocab_size=VOCAB), tokenizer=tok).eval()
    m = tok.mask_token
    text = model.infill(f"12 + {m}{m} = 46", tokenizer=tok, steps=2)
    assert text.startswith("12 + ") and text.endswith(" = 46") and len(text) == len("12 + 34 = 46")


def test_bad_arguments_get_clear_errors(model):
    ids, _ = batch(B=1, T=5)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.generate(ids, max_new_tokens=4, steps=0)
    with pytest.raises(ValueError, match="steps=5 is more than the 4 positions"):
        model.generate(ids, max_new_tokens=4, steps=5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, max_new_tokens=4, steps=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="nothing to fill"):
        model.infill(ids)
    with pytest.raises(ValueError, match="position 0 cannot be filled"):
        model.infill(ids.masked_fill(torch.arange(5) == 0, model.mask_token_id))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_diffugpt_layout_loads(tmp_path, family):
    """A tiny model saved the way the authors' DiscreteDiffusionModel is (embed_tokens.*, denoise_model.*,
    lm_head.*; GPT-2 with its stale attention buffers) loads with the same weights and logits."""
    from safetensors.torch import save_file

    src = tiny_base(family, **({"tie_word_embeddings": True} if family == "gpt2" else {}))
    src.config.save_pretrained(tmp_path)
    backbone = "transformer." if family == "gpt2" else "model."
    embed = "transformer.wte." if family == "gpt2" else "model.embed_tokens."
    state = {}
    for k, v in src.state_dict().items():
        if k.startswith(embed):
            state["embed_tokens." + k[len(embed):]] = v.clone()
        elif k.startswith(backbone):
            state["denoise_model." + k[len(backbone):]] = v.clone()
        elif not (family == "gpt2" and k == "lm_head.weight"):               # tied: saved once
            state[k] = v.clone()
    if family == "gpt2":
        state["denoise_model.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    model = load_diffugpt(str(tmp_path), mask_token_id=7)
    assert model.mask_token_id == 7 and not model.training
    for k, v in src.state_dict().items():
        assert torch.equal(model.causal_lm.state_dict()[k], v), k
    out = model.generate(batch(B=1, T=4)[0], max_new_tokens=3, steps=3, return_dict_in_generate=True)
    assert out.forward_passes == 3
    # the authors' [MASK] ids when none is given: DiffuGPT-small 10541 (GPT-2's 50257 rows), DiffuLLaMA 811
    from l2d.mdm.diffugpt import default_mask_token_id

    assert default_mask_token_id("gpt2", 50257, str(tmp_path)) == 10541
    assert default_mask_token_id("gpt2", 50258, str(tmp_path)) == 50257
    assert default_mask_token_id("llama", 32000, str(tmp_path)) == 811


def test_diffugpt_loader_refuses_pickles(tmp_path):
    tiny_base("gpt2").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(FileNotFoundError, match="does not unpickle"):
        load_diffugpt(str(tmp_path))
