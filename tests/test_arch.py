"""The diffusion stream rebuilds each family's decoder layer from its own submodules.

With the modulation neutral (dw = shift = 0, gates = 1) and zero deltas, a diffusion block fed
the main path's input to layer l at every position must return the main path's output of layer l:
same norms, query projection, rotary, q/k norms, GQA, sliding window, scales, residual shape.
"""
import pytest
import torch

from l2d import get_l2d_model
from l2d.arch import get_spec
from l2d.main_path import positions_from_mask
from tiny import FAMILIES, tiny_base, tiny_config


def _layer_io(base, ids, mask):
    ins, outs = {}, {}
    hooks = []
    for i, layer in enumerate(base.base_model.get_submodule(get_spec(base.config).layers)):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: ins.__setitem__(i, (a[0] if a else kw["hidden_states"])), with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        base(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    for h in hooks:
        h.remove()
    return ins, outs


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("left_pad", [False, True])
def test_neutral_block_reproduces_the_decoder_layer(family, left_pad):
    base = tiny_base(family)
    model = get_l2d_model(base, tiny_config())
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :3] = 0
    ins, outs = _layer_io(base, ids, mask)
    main = model.run_main_path(ids, mask)
    query_index = torch.arange(ids.shape[1]).expand_as(ids)
    ctx = model.stream_context(main, query_index)
    H = base.config.hidden_size
    neutral = (torch.zeros(2, 11, H), torch.zeros(2, 11, H), torch.ones(2, 11, H)) * 2
    for i, block in enumerate(model.path.blocks):
        with torch.no_grad():
            got = block(model.arch, ins[i].float(), None, ctx, modulation=neutral)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], outs[i][keep].float(), atol=2e-5, rtol=1e-4,
                                   msg=f"{family} layer {i}")


def test_main_path_hidden_is_the_last_layer_output_before_the_final_norm():
    base = tiny_base("llama")
    model = get_l2d_model(base, tiny_config())
    ids = torch.randint(3, 96, (1, 7))
    with torch.no_grad():
        ref = base(ids).logits
    main = model.run_main_path(ids)
    torch.testing.assert_close(model.head_logits(main.hidden), ref, atol=1e-5, rtol=0)


def test_unsupported_family_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    base = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(NotImplementedError, match="bloom.*Supported families: .*llama"):
        get_l2d_model(base, tiny_config())
