"""The baselines' training loss (``method: lora`` and ``method: full``), economical and wrappable.

The backbone runs over the whole sequence, but the vocabulary head and the cross-entropy only at
supervised positions, chunked, so a baseline pays for no ``[tokens, vocab]`` logits it does not use
(the same economy as L2D's loss):

    loss = sum_{i : y_{i+1} supervised} CE(head(h_i), y_{i+1})

Under DDP, FSDP or DeepSpeed this has to run inside the distributed wrapper's forward: DDP arms its
gradient all-reduce there, FSDP gathers the sharded weights there, DeepSpeed casts and gathers
there. :class:`ResponseLoss` is the module they wrap.
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import head_kwargs
from .data import IGNORE_INDEX


def response_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over supervised tokens of a causal LM or a peft model of one."""
    import l2d_kernels

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    head = causal_lm.get_output_embeddings()
    transforms = head_kwargs(causal_lm.config)
    rows, targets = hidden[:, :-1][supervised], targets[supervised]
    if gathered_in_forward(head):
        return chunked_head_loss(head, rows, targets, transforms)
    return l2d_kernels.linear_cross_entropy(rows, head.weight, targets, bias=getattr(head, "bias", None),
                                            reduction="sum", **transforms)


# Logits per chunk, as l2d_kernels.linear_cross_entropy takes them: at most one [chunk, vocab] float32
# block is alive at a time, in forward and in backward.
CHUNK_LOGITS = 2 ** 25


def chunked_head_loss(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, transforms: dict,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``head(rows)`` when the head's whole weight exists only inside its own
    forward (FSDP2, ZeRO-3): the head is called per chunk of rows, and each chunk is recomputed in
    backward (activation checkpointing), so no [rows, vocab] logits are ever kept; each call gathers
    the weight as the wrapper does for any forward."""
    from torch.utils.checkpoint import checkpoint

    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    chunk_rows = chunk_rows or max(1, CHUNK_LOGITS // max(1, vocab))
    total = rows.new_zeros((), dtype=torch.float32)
    for part, tgt in zip(rows.split(chunk_rows), targets.split(chunk_rows)):
        total = total + checkpoint(_head_loss, head, part, tgt, transforms["logit_scale"], transforms["softcap"],
                                   use_reentrant=False)
    return total


def _head_loss(head, rows, targets, logit_scale, softcap):
    logits = head(rows).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def gathered_in_forward(module: nn.Module) -> bool:
    """Whether ``module``'s weight is sharded outside its own forward: DeepSpeed ZeRO-3 partitions
    it (``ds_id``), and FSDP2 keeps it sharded in a module it wrapped (accelerate gives the
    embeddings and the final norm plus ``lm_head`` units of their own)."""
    if hasattr(module.weight, "ds_id"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


class ResponseLoss(nn.Module):
    """``forward(input_ids, attention_mask, labels)`` = :func:`response_loss` of ``self.lm``.

    Its parameters are the baseline's own under the prefix ``lm.``; :func:`inner` gets the model back
    for naming and saving. Other attributes are the baseline's, as peft's wrapper does it: accelerate
    reads ``_no_split_modules`` (FSDP's per-layer wrapping), ``config`` and the tied weights off the
    model it prepares.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (`lm` itself)
        except AttributeError:
            if name == "lm":
                raise
            return getattr(self.lm, name)

    def forward(self, input_ids, attention_mask, labels):
        return response_loss(self.lm, input_ids, attention_mask, labels)


def is_response_loss(model) -> bool:
    """Also through a DDP or DeepSpeed wrapper (``.module``); FSDP2 keeps the class itself."""
    return isinstance(model, ResponseLoss) or isinstance(getattr(model, "module", None), ResponseLoss)


def inner(model: nn.Module) -> nn.Module:
    """The baseline inside a :class:`ResponseLoss` (an unwrapped one), else ``model`` itself."""
    return model.lm if isinstance(model, ResponseLoss) else model


def inner_state_dict(state: dict | None) -> dict | None:
    """A gathered :class:`ResponseLoss` state dict under the baseline's own names (None, as DeepSpeed
    ZeRO-3 gives to every process but the main one, stays None)."""
    return None if state is None else {k.removeprefix("lm."): v for k, v in state.items()}
