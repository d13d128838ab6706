"""The stream runs on the supervised rows of a batch alone: a sequence's losses and gradients do
not depend on the other sequences (and their response lengths) in its batch, and no work goes to
the padding slots of the packed [B, Tq] query layout; what the backward keeps is not duplicated."""
import pytest
import torch

from l2d import get_l2d_model
from tiny import VOCAB, randomize_path, tiny_base, tiny_config


def _batch(even: bool = False):
    """Three right-padded sequences with 3, 8 and 5 supervised tokens (``even``: 5 each, so the
    packed layout has no padding slots)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    mask[2, 12:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 7:10] = ids[0, 7:10]
    labels[1, 6:14] = ids[1, 6:14]
    labels[2, 7:12] = ids[2, 7:12]
    if even:
        labels[0, 5:7] = ids[0, 5:7]
        labels[1, :9] = -100
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, labels


def _model(family, **config):
    model = get_l2d_model(tiny_base(family), tiny_config(**config))
    randomize_path(model)
    return model.eval()


def _losses_and_grads(model, ids, mask, labels, t, noise, classes, sc):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, t=t, noise=noise, class_labels=classes,
                reduction="none", self_conditioning=sc)
    out.loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("family, sc, even", [
    ("llama", False, False), ("llama", True, False), ("gemma2", False, False), ("gemma2", True, False),
    ("gpt2", False, False), ("gpt2", True, False), ("qwen3", False, False), ("qwen3", True, False),
    ("llama", True, True), ("qwen3", False, True)])
def test_a_sequences_losses_and_gradients_do_not_depend_on_its_batch(family, sc, even):
    model = _model(family)
    ids, mask, labels = _batch(even)
    assert even == (len(set((labels[:, 1:] != -100).sum(1).tolist())) == 1)
    g = torch.Generator().manual_seed(4)
    t = torch.rand(ids.shape, generator=g)
    noise = torch.randn(*ids.shape, model.config.latent_dim, generator=g)
    classes = torch.tensor([0, 2, 1])

    losses, grads = _losses_and_grads(model, ids, mask, labels, t, noise, classes, sc)
    alone_losses, alone_grads = [], {}
    for i in range(ids.shape[0]):
        one = slice(i, i + 1)
        loss_i, grads_i = _losses_and_grads(model, ids[one], mask[one], labels[one], t[one], noise[one],
                                            classes[one], sc)
        alone_losses.append(loss_i)
        for name, grad in grads_i.items():
            alone_grads[name] = alone_grads.get(name, 0) + grad
    # per-token losses come in row-major order of the supervised positions, batch or not
    torch.testing.assert_close(losses, torch.cat(alone_losses), atol=1e-5, rtol=1e-5)
    assert grads.keys() == alone_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, alone_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("context", ["frozen", "adapted"])
def test_the_stream_runs_on_the_supervised_rows_only(context):
    model = _model("llama", context=context)
    ids, mask, labels = _batch()
    per_row = (labels[:, 1:] != -100).sum(1)
    supervised, slots = int(per_row.sum()), int(per_row.max())  # 16 rows, where [B, Tq] has 3 x 8 slots
    seen = []
    handles = [model.path.encoder.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape[:-1]))),
               model.arch.mlp(1).down_proj.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape[:-1])))]
    try:
        model(input_ids=ids, attention_mask=mask, labels=labels, self_conditioning=True)
    finally:
        for h in handles:
            h.remove()
    # both passes (self-conditioning and the trained one): the encoder and the last layer's MLP at N rows
    # (the down projection: the stream runs the MLP's parts, not the module, l2d/stream_mlp.py)
    assert seen.count((1, supervised)) == 4, seen
    assert (ids.shape[0], slots) not in seen, f"a pass ran on the padded [B, Tq] layout: {seen}"


def _saved_tensors(loss, attr: str) -> list:
    """Every tensor saved for backward under ``attr`` in the graph of ``loss``."""
    found, stack, seen = [], [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, attr):
            found.append(getattr(fn, attr))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return [t for t in found if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_every_layer_keeps_the_same_attention_mask_for_backward(family):
    model = _model(family, context="frozen").train()  # mistral: a sliding-window mask as well
    ids, mask, labels = _batch()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, self_conditioning=False).loss
    masks = _saved_tensors(loss, "_saved_attn_mask")
    assert len(masks) == model.arch.num_layers  # one attention per layer, each with a mask
    windows = {model.arch.sliding_window(i) for i in range(model.arch.num_layers)}
    assert len({m.untyped_storage().data_ptr() for m in masks}) == len(windows)
