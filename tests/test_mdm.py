"""Masked-diffusion adaptation (l2d.mdm): attention, loss, annealing, [MASK] token, LoRA, save/load."""
import json

import pytest
import torch
import torch.nn.functional as F

from l2d import MaskedDiffusionConfig, MaskedDiffusionModel, get_mdm_model
from l2d.mdm.attention import allowed_pairs, opening_ratio
from tiny import VOCAB, batch, tiny_base

FAMILIES = ["llama", "gpt2", "qwen2"]
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def tiny_mdm(family="llama", **config):
    return get_mdm_model(tiny_base(family, **NO_DROPOUT.get(family, {})), MaskedDiffusionConfig(**config))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_bidirectional_after_annealing(family):
    """Changing the last token changes the logits at the first position once annealing is over
    (eval, or training past anneal_steps), and not while attention is still causal (step 0 of 10^9)."""
    model = tiny_mdm(family, anneal_steps=10 ** 9)
    ids, _ = batch()
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 1 - 3) % (VOCAB - 3) + 3

    def first_logits(x, step=None):
        return model(x, step=step).logits[:, 0]

    model.eval()
    assert (first_logits(ids) - first_logits(other)).abs().max() > 1e-4
    model.train()
    assert torch.equal(first_logits(ids, step=0), first_logits(other, step=0))  # causal at the start
    assert (first_logits(ids, step=10 ** 9) - first_logits(other, step=10 ** 9)).abs().max() > 1e-4


def test_annealing_schedule_opens_future_pairs_at_the_planned_rate():
    config = MaskedDiffusionConfig(anneal_steps=100)
    assert [opening_ratio(s, config) for s in (0, 9, 49, 99, 500)] == [0.01, 0.1, 0.5, 1.0, 1.0]
    assert opening_ratio(0, MaskedDiffusionConfig(anneal_steps=0)) == 1.0   # bidirectional from the start
    assert opening_ratio(None, config) == 1.0                                # evaluation
    T = 64
    mask = torch.ones(4, T, dtype=torch.long)
    torch.manual_seed(0)
    allowed = allowed_pairs(mask, 0.3)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert allowed[:, causal].all()                                          # the causal part always open
    future = allowed[:, ~causal].float().mean().item()
    assert abs(future - 0.3) < 0.02
    assert not allowed_pairs(mask, 0.0)[:, ~causal].any()
    padded = mask.clone()
    padded[:, -3:] = 0
    assert not allowed_pairs(padded, 1.0)[:, :, -3:].any()                   # padding keys never seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_equals_a_hand_computed_one(family):
    """sum over masked response tokens of CE(logits at i-1, token i) / t_row, over the response count;
    the logits from the bidirectional model fed the corrupted input."""
    model = tiny_mdm(family).eval()
    ids, labels = batch(B=3, T=10, prompt=4)
    labels[2, -2:] = -100                                                    # a row with padding-like tail
    t = torch.tensor([0.2, 0.5, 0.9])
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, [4, 7]] = True
    masked[1, [5, 6, 9]] = True
    masked[2, [4, 8, 9, 2]] = True                                           # 8, 9 unsupervised, 2 prompt: not masked
    out = model(ids, labels=labels, t=t, masked=masked)
    mask_id = model.mask_token_id
    total = 0.0
    for b in range(3):
        x = ids[b].clone()
        kept = [i for i in masked[b].nonzero().flatten().tolist() if labels[b, i] != -100]
        x[kept] = mask_id
        logits = model(x[None]).logits[0]
        for i in kept:
            total += F.cross_entropy(logits[i - 1], ids[b, i]).item() / t[b].item()
    n = int((labels[:, 1:] != -100).sum())
    assert out.num_tokens == n and out.masked_tokens == 2 + 3 + 1
    assert out.loss.item() == pytest.approx(total / n, rel=1e-5)
    assert model(ids, labels=labels, t=t, masked=masked, reduction="sum").loss.item() == pytest.approx(total, rel=1e-5)


def test_corruption_masks_response_tokens_at_rate_t_and_never_the_prompt():
    from l2d.mdm.loss import corrupt

    ids = torch.randint(3, 50, (2000, 100))
    labels = ids.clone()
    labels[:, :5] = -100
    torch.manual_seed(0)
    x_t, masked, t = corrupt(ids, labels, 99, eps=1e-3)
    assert not masked[:, :5].any() and torch.equal(x_t[~masked], ids[~masked]) and (x_t[masked] == 99).all()
    assert t.min() >= 1e-3 and t.max() <= 1
    rate = masked[:, 5:].float().mean(1)
    assert torch.corrcoef(torch.stack([rate, t]))[0, 1] > 0.9
    assert abs(rate.mean().item() - t.mean().item()) < 0.02


def test_mask_token_is_picked_or_added():
    from test_train import tiny_tokenizer

    base = tiny_base("llama", tie_word_embeddings=True)
    model = get_mdm_model(base)                                              # no tokenizer: a new row
    assert model.mask_token_id == VOCAB and model.vocab_size == VOCAB + 1
    emb, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()                                 # still tied
    tok = tiny_tokenizer()
    n = len(tok)
    model = get_mdm_model(tiny_base("llama"), tokenizer=tok)                 # added to the tokenizer
    assert tok.mask_token_id == n == model.mask_token_id                     # a spare row: no resize
    assert model.vocab_size == VOCAB
    model = get_mdm_model(tiny_base("llama"), tokenizer=tok)                 # the tokenizer's own
    assert model.mask_token_id == n
    assert get_mdm_model(tiny_base("llama"), MaskedDiffusionConfig(mask_token_id=7)).mask_token_id == 7
    with pytest.raises(ValueError, match="not a row of the embedding table"):
        get_mdm_model(tiny_base("llama"), MaskedDiffusionConfig(mask_token_id=VOCAB + 5))
    with pytest.raises(ValueError, match="no mask token"):
        MaskedDiffusionModel(tiny_base("llama"), MaskedDiffusionConfig())


def test_bad_config_values_are_refused():
    for kw, match in [(dict(anneal_steps=-1), "anneal_steps"), (dict(eps=0.0), "eps"),
                      (dict(finetuning="qlora"), "finetuning"), (dict(lora_r=0), "lora_r")]:
        with pytest.raises(ValueError, match=match):
            MaskedDiffusionConfig(**kw)
    with pytest.raises(ValueError, match="flash_attention_2"):
        base = tiny_base("llama")
        base.config._attn_implementation = "flash_attention_2"
        get_mdm_model(base)


def test_lora_trains_adapters_and_the_mask_row_only():
    model = tiny_mdm("llama", finetuning="lora", lora_r=4, mask_token_id=None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    delta = [p for n, p in model.named_parameters() if "trainable_tokens" in n][0]
    assert delta.shape[0] == 1 and delta.grad is not None                   # the [MASK] row only


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_save_and_load_round_trip(tmp_path, finetuning):
    from test_train import tiny_tokenizer

    tok = tiny_tokenizer()
    model = get_mdm_model(tiny_base("llama"), MaskedDiffusionConfig(finetuning=finetuning, lora_r=4), tokenizer=tok)
    with torch.no_grad():                                                    # as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids, _ = batch()
    expected = model(ids).logits
    model.save_pretrained(str(tmp_path), tokenizer=tok)
    saved = json.loads((tmp_path / "mdm_config.json").read_text())
    assert saved["config"]["mask_token_id"] == model.mask_token_id and saved["finetuning"] == finetuning
    if finetuning == "full":
        assert (tmp_path / "model.safetensors").is_file()                  # an ordinary transformers folder
        loaded = MaskedDiffusionModel.from_pretrained(str(tmp_path))
    else:
        assert (tmp_path / "adapter_config.json").is_file()                # a peft adapter
        loaded = MaskedDiffusionModel.from_pretrained(str(tmp_path), base_model=tiny_base("llama"))
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)
    assert loaded.mask_token_id == model.mask_token_id and not loaded.training
