"""A peft LoRA that acts only where the diffusion path acts: at the positions that predict a response
token (and, in generation, at the last prompt token and every new one). The prompt's hidden states,
and so the keys/values every later position reads, stay the frozen base's, as they are for L2D.

An ablation for issue 7 (`benchmarks/ablate.py lora-qo-mlp-answer-only`): the same LoRA with and
without the prompt positions separates "what the path can compute at a position" from "what it
cannot change about the context".
"""
from __future__ import annotations

import contextlib

import torch

IGNORE_INDEX = -100


class PositionGate:
    """Multiplies every LoRA update by a [B, T, 1] mask of the positions where it may act."""

    def __init__(self):
        self.mask = None        # [B, T, 1], or None: every position
        self._explicit = False  # a training mask is set: generation's default must not replace it
        self.handles = []

    def attach(self, peft_model) -> "PositionGate":
        for module in peft_model.modules():
            lora_b = getattr(module, "lora_B", None)
            if isinstance(lora_b, torch.nn.ModuleDict):
                for b in lora_b.values():
                    self.handles.append(b.register_forward_hook(self._gate))
        decoder = peft_model.get_base_model().model
        self.handles.append(decoder.register_forward_pre_hook(self._default_mask, with_kwargs=True))
        return self

    def _default_mask(self, module, args, kwargs):
        """Generation (left padding, KV cache): the prompt pass acts at its last token only, every
        later single-token pass everywhere."""
        if self._explicit:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        B, T = ids.shape
        mask = torch.zeros(B, T, 1)
        mask[:, -1] = 1.0
        self.mask = mask

    @contextlib.contextmanager
    def positions(self, labels: torch.Tensor):
        """Training: act at position i when token i+1 is supervised (as the path's queries)."""
        nxt = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        self.mask, self._explicit = (nxt != IGNORE_INDEX).unsqueeze(-1).float(), True
        try:
            yield
        finally:
            self.mask, self._explicit = None, False

    def _gate(self, module, inputs, output):
        if self.mask is None:
            return None
        return output * self.mask.to(output.dtype)


@contextlib.contextmanager
def answer_only_training():
    """Patch ``l2d.train`` so that LoRA models it builds act only at supervised positions."""
    import l2d.train as train_mod
    from l2d.baseline_loss import inner

    build, loss = train_mod.build_model, train_mod.batch_loss
    gates = {}

    def build_model(recipe, base):
        model = build(recipe, base)
        gates[id(model)] = PositionGate().attach(model)
        return model

    def batch_loss(model, method, batch):  # l2d train hands over the LoRA inside a ResponseLoss
        with gates[id(inner(model))].positions(batch["labels"]):
            return loss(model, method, batch)

    train_mod.build_model, train_mod.batch_loss = build_model, batch_loss
    try:
        yield
    finally:
        train_mod.build_model, train_mod.batch_loss = build, loss
