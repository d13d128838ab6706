"""The baselines' head where FSDP2 / ZeRO-3 gather it in its own forward: chunked over rows, with the
same loss and gradients as one [rows, vocab] cross-entropy."""
import pytest
import torch

import l2d.baseline_loss as baseline_loss
from l2d.baseline_loss import chunked_head_loss, response_loss
from tiny import batch, tiny_base


@pytest.mark.parametrize("transforms", [{"logit_scale": None, "softcap": None}, {"logit_scale": 0.5, "softcap": 3.0}])
def test_chunked_head_loss_matches_the_whole_head(transforms):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    rows = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    logits = head(rows).float()
    if transforms["logit_scale"]:
        logits = logits * transforms["logit_scale"]
    if transforms["softcap"]:
        logits = transforms["softcap"] * torch.tanh(logits / transforms["softcap"])
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    want_grads = torch.autograd.grad(want, [rows, head.weight])
    calls = []
    hook = head.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    got = chunked_head_loss(head, rows, targets, transforms, chunk_rows=5)
    assert calls == [5, 5, 5, 5, 3]  # one [5, vocab] block at a time
    got_grads = torch.autograd.grad(got, [rows, head.weight])
    hook.remove()
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_response_loss_with_a_gathered_head_equals_the_fused_one(monkeypatch):
    lm = tiny_base()
    ids, labels = batch(B=3, T=10)
    mask = torch.ones_like(ids)
    want = response_loss(lm, ids, mask, labels)
    monkeypatch.setattr(baseline_loss, "gathered_in_forward", lambda module: True)
    monkeypatch.setattr(baseline_loss, "CHUNK_LOGITS", 96 * 4)  # 4 rows per chunk at this vocabulary
    torch.testing.assert_close(response_loss(lm, ids, mask, labels), want)
