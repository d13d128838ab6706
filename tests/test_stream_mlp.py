"""The stream's MLP through l2d/stream_mlp.py: the frozen module plus its deltas, same values and
gradients as calling the module with the delta hooks on, and less kept for backward."""
import pytest
import torch

from l2d import get_l2d_model
from l2d.arch import FUSED_GATE_UP, SPECS
from l2d.stream_mlp import ActivationProject
from tests.tiny import FAMILIES, batch, randomize_path, tiny_base, tiny_config


def _block_mlp(model, layer=0):
    block = model.path.blocks[layer]
    return block.mlp_deltas, model.arch.mlp(layer)


def _grads(model, out, x):
    params = [p for p in model.path.blocks[0].mlp_deltas.parameters()]
    return torch.autograd.grad(out.square().sum(), [x, *params])


@pytest.mark.parametrize("variant", ["lora", "full"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if SPECS.get(f, SPECS["llama"]).mlp_parts])
def test_fused_mlp_matches_the_module_with_hooks(family, variant):
    model = get_l2d_model(tiny_base(family), tiny_config(path_variant=variant)).train()
    randomize_path(model)
    deltas, mlp = _block_mlp(model)
    assert deltas.parts is not None, f"{family}: the stream should run the fused MLP"
    x = torch.randn(3, 5, model.arch.hidden_size, requires_grad=True)

    fused = deltas(mlp, x)
    parts, deltas.parts = deltas.parts, None  # the plain path: the module, deltas through hooks
    try:
        plain = deltas(mlp, x)
    finally:
        deltas.parts = parts
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(model, fused, x), _grads(model, plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_mlp_keeps_two_intermediates_not_four():
    model = get_l2d_model(tiny_base("llama"), tiny_config()).train()
    deltas, mlp = _block_mlp(model)
    x = torch.randn(4, 7, model.arch.hidden_size, requires_grad=True)
    inter = model.base_model.config.intermediate_size

    def kept(run):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            run()
        storages = {t.untyped_storage().data_ptr(): t for t in saved}
        return sum(1 for t in storages.values() if t.shape[-1] == inter and t.numel() == 28 * inter)

    fused = kept(lambda: deltas(mlp, x))
    parts, deltas.parts = deltas.parts, None
    try:
        plain = kept(lambda: deltas(mlp, x))
    finally:
        deltas.parts = parts
    assert plain == 4, plain  # act's input, act(g), u, p
    assert fused == 2, fused  # g and u


def test_activation_project_bfloat16_under_autocast_matches_unfused():
    torch.manual_seed(0)
    g = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(3, 16, requires_grad=True)
    act = torch.nn.SiLU()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p, r = ActivationProject.apply(g, u, A, act)
        p_ref = act(g) * u
        r_ref = torch.nn.functional.linear(p_ref, A)
    assert r.dtype == r_ref.dtype == torch.bfloat16
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(r, r_ref)
    grads = torch.autograd.grad(p.float().sum() + r.float().square().sum(), [g, u, A])
    grads_ref = torch.autograd.grad(p_ref.float().sum() + r_ref.float().square().sum(), [g, u, A])
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_whole_model_loss_and_grads_unchanged_by_fusion():
    model = get_l2d_model(tiny_base("qwen3"), tiny_config()).train()
    randomize_path(model)
    ids, labels = batch(seed=3)
    mask = torch.ones_like(ids)
    t = torch.full(ids.shape, 0.6)

    def loss_and_grads():
        torch.manual_seed(0)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, t=t, self_conditioning=False).loss
        params = [p for p in model.path.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params)

    fused_loss, fused_grads = loss_and_grads()
    saved = [b.mlp_deltas.parts for b in model.path.blocks]
    for b in model.path.blocks:
        b.mlp_deltas.parts = None
    plain_loss, plain_grads = loss_and_grads()
    for b, parts in zip(model.path.blocks, saved):
        b.mlp_deltas.parts = parts
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _set_parts(model, parts_list):
    for block, parts in zip(model.path.blocks, parts_list):
        block.mlp_deltas.parts = parts


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_adapted_context_pass_runs_the_lean_mlp_with_the_same_result(family):
    """context='adapted': the frozen layers run over every position with the deltas on; their MLPs
    go through the lean forward there, with the same loss and gradients as the module with hooks,
    and keep two intermediates per layer instead of four."""
    model = get_l2d_model(tiny_base(family), tiny_config(stream_init="main", merge_init="open", context="adapted")).train()
    randomize_path(model)
    ids, labels = batch(seed=4)
    mask = torch.ones_like(ids)
    t = torch.full(ids.shape, 0.7)
    inter = model.base_model.config.intermediate_size if family != "gpt2" else 4 * 32
    params = [p for p in model.path.parameters() if p.requires_grad]

    def run():
        torch.manual_seed(0)  # the same noise for both
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, t=t, self_conditioning=False).loss
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        wide = {x.untyped_storage().data_ptr() for x in saved if x.dim() and x.shape[-1] == inter} - weights
        return loss, torch.autograd.grad(loss, params), len(wide)

    lean_loss, lean_grads, lean_kept = run()
    parts = [b.mlp_deltas.parts for b in model.path.blocks]
    _set_parts(model, [None] * len(parts))
    try:
        plain_loss, plain_grads, plain_kept = run()
    finally:
        _set_parts(model, parts)
    torch.testing.assert_close(lean_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(lean_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # every MLP run, the stream's and the context pass's, keeps g (and u) only: one per run of the
    # down projection, twice that for gated MLPs (the op-by-op path also keeps act(g) and p, and
    # gpt2's tanh-approximated GELU its own intermediates)
    runs = []
    down = SPECS[family].mlp_parts[2]
    handles = [getattr(model.arch.mlp(i), down).register_forward_hook(
        lambda *a: runs.append(1) if torch.is_grad_enabled() else None)  # not the no-grad main path
               for i in range(model.arch.num_layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    # (phi3: g and u are the halves of one gate_up output, one storage of twice the width)
    per_run = 1 if SPECS[family].mlp_parts[1] in (None, FUSED_GATE_UP) else 2
    assert len(runs) > model.arch.num_layers  # the context pass ran MLPs too, not only the stream
    assert lean_kept == per_run * len(runs) < plain_kept, (lean_kept, len(runs), plain_kept)


def test_the_base_mlp_is_its_own_again_after_unload():
    base = tiny_base("llama")
    x = torch.randn(2, 3, 32)
    before = base.model.layers[0].mlp(x)
    model = get_l2d_model(base, tiny_config(stream_init="main", merge_init="open", context="adapted"))
    randomize_path(model)
    mlp = base.model.layers[0].mlp
    assert "forward" in mlp.__dict__  # the lean forward is lent for the context pass
    torch.testing.assert_close(mlp(x), before)  # outside the context pass: the module's own result
    model.unload()
    assert "forward" not in mlp.__dict__ and not mlp._forward_hooks
    torch.testing.assert_close(mlp(x), before)
