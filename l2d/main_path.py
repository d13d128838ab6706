"""The main path: the frozen base run once (no grad), and what it leaves for the diffusion path.

    input_ids -> frozen decoder layers (KV cache) -> per-layer keys/values [B, kv_heads, T, head_dim]
                                                  -> last hidden state before the final norm [B, T, H]
    (context="adapted": a second pass of the frozen layers with the path's deltas on, whose
    keys/values the queries read instead) -> :class:`~l2d.stream.StreamContext` for the queries.

Rotary positions follow the attention mask (left padding ignored), as transformers' ``generate``.
:class:`MainPathMixin` gives :class:`~l2d.model.L2DModel` these steps as methods, so that the token
loop (``l2d/generation.py``) drives the model through them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .stream import StreamContext


@dataclass
class MainPathState:
    """What the frozen main path leaves for the diffusion path."""

    cache: DynamicCache          # per layer keys/values [B, kv_heads, T, head_dim], post-rotary
    hidden: torch.Tensor         # [B, T, H] last decoder layer output, before the final norm
    position_ids: torch.Tensor   # [B, T] rotary positions (cumsum of the mask, as generate does)
    attention_mask: torch.Tensor  # [B, T]
    # [B, T, H] what the stream's first layer (path.stream_start; 0 by default, where it is the token
    # embeddings as the layers see them) receives: from the main path, or from the adapted context pass
    stream_input: torch.Tensor | None = None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that ignore left padding, the same rule transformers' ``generate`` uses."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def keep_input(module: nn.Module, store, key):
    """A forward pre-hook that keeps what ``module`` receives (its hidden states) in ``store[key]``."""
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: store.__setitem__(key, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)


class MainPathMixin:
    """The main pass, the adapted context pass and the stream's view of their keys/values.

    Reads ``self.arch``, ``self.config``, ``self.path``, ``self.device`` and ``self.dtype`` of the model.
    """

    @torch.no_grad()
    def run_main_path(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> MainPathState:
        """Run the frozen base once (no grad) and keep its cache and pre-norm last hidden state.

        The cache is a fresh ``DynamicCache()`` without a config: one built from the config drops
        old keys in sliding-window layers, which the diffusion stream masks itself.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        captured = {}
        hooks = [self.arch.final_norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))]
        if self.config.stream_init == "main" and self.config.context == "frozen":  # (adapted: the context pass's)
            hooks.append(keep_input(self.arch.layers[self.path.stream_start], captured, "e"))
        try:
            cache = self.arch.run_backbone(input_ids, attention_mask, position_ids, cache)
        finally:
            for hook in hooks:
                hook.remove()
        start = captured.get("e")  # (moved home: with a device map the layers may sit elsewhere)
        return MainPathState(cache, captured["h"].to(self.device), position_ids, attention_mask,
                             None if start is None else start.to(self.device))

    def context_pass(self, input_ids, attention_mask, position_ids, cache=None):
        """``context="adapted"``: the frozen layers with the path's q/o/MLP deltas on, over every
        position of ``input_ids`` (appended to ``cache`` when decoding). Returns the cache whose
        keys/values the queries read, and what the stream's first layer receives in this pass
        [B, T, H] (``stream_init="main"``; else None): the stream then takes up the pass there.
        Runs under the caller's grad mode: in training the deltas get gradients through these
        keys/values."""
        captured = {}
        keep = self.config.stream_init == "main"
        hook = keep_input(self.arch.layers[self.path.stream_start], captured, "e") if keep else None
        try:
            with self.path.switch.context_pass():
                # only its keys/values are read: the forward ends once the last layer has cached them
                cache = self.arch.run_backbone(input_ids, attention_mask, position_ids, cache, kv_only=True)
        finally:
            if hook is not None:
                hook.remove()
        return cache, captured.get("e")

    def merge_passes_stream(self, t_q: torch.Tensor) -> bool:
        """True when the merge returns the stream itself at every query: ``stream_init="main"``
        (``h = h_main + g (h_f - h_main)``), ``merge_init="open"`` with a frozen all-zero merge head
        (as when the conditioning heads are frozen) and ``t > 0``, so that ``g = 1`` exactly and
        ``h = h_f``: the main path's hidden states are then not needed."""
        merge = self.path.merge[-1]
        return (self.config.stream_init == "main" and self.config.merge_init == "open"
                and not merge.weight.requires_grad and not bool(merge.weight.any()) and bool((t_q > 0).all()))

    def stream_context(self, main: MainPathState, query_index: torch.Tensor,
                       context: DynamicCache | None = None, rows: torch.Tensor | None = None) -> StreamContext:
        """What the blocks read for ``query_index``: the keys/values of ``main``'s cache, or of
        ``context`` (the adapted context pass's cache) when given."""
        cache = main.cache if context is None else context
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        pos = main.position_ids
        if pos.shape[1] != main.attention_mask.shape[1]:  # incremental decoding: positions of the new tokens only
            pos = positions_from_mask(main.attention_mask)
        return StreamContext(keys, values, query_index, pos.gather(1, query_index), main.attention_mask, self.dtype,
                             rows)
