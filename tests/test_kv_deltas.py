"""kv_rank > 0: the path reads K + rot(dK x), V + dV x; the main path and t = 0 stay the base."""
import copy

import pytest
import torch

from l2d import get_l2d_model
from l2d.model import positions_from_mask
from tiny import batch, randomize_path, tiny_base, tiny_config

FAMILIES = ["llama", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox"]


def _base_logits(base, ids):
    with torch.no_grad():
        return base(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_deltas_keep_the_base_at_t0_and_start_at_zero(family):
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(kv_rank=4)).eval()
    ids, labels = batch(seed=2)
    ref = _base_logits(base, ids)
    for t in (0.0, 0.6):
        assert (model(ids, t=t).logits - ref).abs().max() < 1e-5
    randomize_path(model)
    assert (model(ids, t=0.0).logits - ref).abs().max() < 1e-5
    moved = (model(ids, t=0.6).logits - ref).abs().max()
    for block in model.path.blocks:  # the same path without its k/v deltas reads the context otherwise
        block.k_delta.B.data.zero_()
        block.v_delta.B.data.zero_()
    assert (model(ids, t=0.6).logits - ref).abs().max() != moved
    model.train()
    model.zero_grad()
    model(ids, labels=labels, t=0.5).loss.backward()
    # B was zeroed above, so B is where the gradient lands first, as in a LoRA
    assert model.path.blocks[0].k_delta.B.grad.abs().sum() > 0
    assert model.path.blocks[0].v_delta.B.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_the_path_keys_are_those_of_a_base_with_the_deltas_folded_in(family):
    """K + rot(dK x) must equal the cache of a base whose k (and v) projection carries the delta:
    same heads, rotary positions (partial for phi3) and left padding."""
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config(kv_rank=4)).eval()
    randomize_path(model, scale=2.0)
    ids, _ = batch(seed=7, T=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    with torch.no_grad():
        main = model.run_main_path(ids, mask)
        ctx = model.stream_context(main, torch.arange(ids.shape[1]).expand_as(ids))
    for i, block in enumerate(model.path.blocks):  # fold one layer at a time: a folded v changes what follows
        folded = copy.deepcopy(base)
        dk = block.k_delta.B @ block.k_delta.A * block.k_delta.scale
        dv = block.v_delta.B @ block.v_delta.A * block.v_delta.scale
        attn = folded.model.layers[i].self_attn
        with torch.no_grad():
            if family == "phi3":  # fused rows [q | k | v]
                q = attn.qkv_proj.weight.shape[0] - 2 * dk.shape[0]
                attn.qkv_proj.weight[q:q + dk.shape[0]] += dk
                attn.qkv_proj.weight[q + dk.shape[0]:] += dv
            else:
                attn.k_proj.weight += dk
                attn.v_proj.weight += dv
            want = get_l2d_model(folded, tiny_config()).run_main_path(ids, mask).cache.layers[i]
        keep = mask.bool()[:, None, :, None].expand_as(want.keys)  # padded slots are never attended
        torch.testing.assert_close(ctx.keys[i][keep], want.keys[keep], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ctx.values[i][keep], want.values[keep], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2"])
def test_token_by_token_deltas_equal_the_whole_sequence_ones(family):
    model = get_l2d_model(tiny_base(family), tiny_config(kv_rank=4)).eval()
    randomize_path(model)
    ids, _ = batch(seed=3, T=8)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        whole = model.kv_deltas(model.run_main_path(ids, mask))
        main = model.run_main_path(ids[:, :6], mask[:, :6])
        kv = model.kv_deltas(main)
        for j in (6, 7):
            pos = positions_from_mask(mask[:, :j + 1])[:, -1:]
            main = model.run_main_path(ids[:, j:j + 1], mask[:, :j + 1], position_ids=pos, cache=main.cache)
            kv = model.kv_deltas(main, previous=kv)
    for (wk, wv), (k, v) in zip(whole, kv):
        keep = mask.bool()[:, None, :, None].expand_as(wk)
        torch.testing.assert_close(k[keep], wk[keep], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v[keep], wv[keep], atol=1e-5, rtol=1e-4)


def test_generation_with_kv_deltas_keeps_steps_0_exact_and_batching_agrees():
    base = tiny_base("llama")
    model = get_l2d_model(base, tiny_config(kv_rank=4)).eval()
    randomize_path(model)
    ids, _ = batch(seed=5, B=2, T=7)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=6, steps=0, eos_token_id=2, pad_token_id=0), ref)
    kw = dict(max_new_tokens=5, steps=3, eos_token_id=2, pad_token_id=0)
    together = model.generate(ids, mask, seed=[10, 11], **kw)
    for row in range(2):
        keep = mask[row].bool()
        alone = model.generate(ids[row:row + 1, keep], seed=[10 + row], **kw)
        n = alone.shape[1] - int(keep.sum())
        assert torch.equal(together[row, ids.shape[1]:ids.shape[1] + n], alone[0, int(keep.sum()):])
