"""The stream's view of the main path's keys/values: which keys each query may read, and attention.

Query ``i`` of the diffusion stream attends to the main path's keys/values ``0..i`` of the same
layer (causal mask, the main path's padding mask, sliding windows), at the main path's rotary
positions; diffusion queries never see each other. :class:`StreamContext` holds those keys/values
for one set of queries (built by ``L2DModel.stream_context``, ``l2d/main_path.py``) and caches the
masks and rotary tables every block shares; :func:`attend` is the attention itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import ArchAdapter


def attend(q, k, v, mask, scale: float, softcap=None):
    """Causal attention of queries [B, h, Tq, d] over keys/values [B, kv_h, T, d] (GQA by grouping).

    ``mask`` is boolean [B, 1, Tq, T] (True = may attend), or for unsoftcapped attention the same
    as an additive float mask (:meth:`StreamContext.attn_bias`). Soft-capped scores (gemma2) take
    the explicit path, with a boolean mask; everything else goes through
    ``scaled_dot_product_attention``.
    """
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class StreamContext:
    """What every block needs from the main path for one set of query positions.

    keys/values: per layer [B, kv_heads, T, head_dim], post-rotary, from the main path's cache.
    query_index: [B, Tq] index of each query in the sequence; query_position: its rotary position.
    key_mask: [B, T] bool, the main path's attention mask.
    rows: optional [N] indices into the flattened [B * Tq] query slots. With it the stream runs on
        those N rows alone, as one [1, N, ...] batch (the supervised queries of a batch whose rows
        hold different numbers of them: no work on padding slots); only attention regroups them
        by sequence (:meth:`to_sequences`, :meth:`to_rows`). ``query_position`` is then [1, N].
    """

    def __init__(self, keys, values, query_index, query_position, key_mask, dtype, rows=None):
        self.keys, self.values = keys, values
        self.query_index = query_index
        self.rows = rows
        self.query_position = query_position if rows is None else self.select_rows(query_position)
        if rows is not None:
            B, Tq = query_index.shape
            self._dense = rows.numel() == B * Tq  # no padding: regrouping is a reshape
            if not self._dense:
                # where each [B * Tq] slot reads its query from: its row, or N (a zero row) for padding
                slots = torch.full((B * Tq,), rows.numel(), dtype=torch.long, device=rows.device)
                self._slot_rows = slots.index_copy(0, rows, torch.arange(rows.numel(), device=rows.device))
        self.key_mask = key_mask
        self.dtype = dtype
        self._masks, self._rotary, self._biases = {}, {}, {}

    def doubled(self) -> "StreamContext":
        """The same context for a batch stacked twice (classifier-free guidance runs the conditional
        and the unconditional pass as one batch; both halves read the same keys/values)."""
        if self.rows is not None:
            raise ValueError("doubled() takes a context without packed rows.")
        return StreamContext([k.repeat(2, 1, 1, 1) for k in self.keys], [v.repeat(2, 1, 1, 1) for v in self.values],
                             self.query_index.repeat(2, 1), self.query_position.repeat(2, 1),
                             self.key_mask.repeat(2, 1), self.dtype)

    def batch_rows(self, index: torch.Tensor, first_layer: int = 0) -> "StreamContext":
        """The context of the batch rows in ``index`` [n] alone (EarlyStop drops the rows whose
        token has settled from the rest of the solve). Only the keys/values of layers
        ``first_layer`` and up are copied (the stream reads no others); the rest are None."""
        if self.rows is not None:
            raise ValueError("batch_rows() takes a context without packed rows.")

        def pick(t):
            return None if t is None else t.index_select(0, index)

        keys = [pick(k) if i >= first_layer else None for i, k in enumerate(self.keys)]
        values = [pick(v) if i >= first_layer else None for i, v in enumerate(self.values)]
        return StreamContext(keys, values, pick(self.query_index), pick(self.query_position), pick(self.key_mask),
                             self.dtype)

    def select_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Tq, ...] -> [1, N, ...]: the query slots in ``rows`` (unchanged without rows)."""
        if self.rows is None:
            return x
        return x.flatten(0, 1).index_select(0, self.rows).unsqueeze(0)

    def to_sequences(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [1, h, N, d] -> [B, h, Tq, d], each row in its sequence's slot (zeros elsewhere)."""
        if self.rows is None:
            return q
        B, Tq = self.query_index.shape
        _, h, N, d = q.shape
        if self._dense:
            return q[0].unflatten(1, (B, Tq)).transpose(0, 1)
        # a gather from the rows plus one zero row: its backward keeps only the index, not q
        source = torch.cat([q[0].transpose(0, 1), q.new_zeros(1, h, d)])
        return source.index_select(0, self._slot_rows).view(B, Tq, h, d).transpose(1, 2)

    def to_rows(self, out: torch.Tensor) -> torch.Tensor:
        """Attention outputs [B, h, Tq, d] -> [1, h, N, d] (inverse of :meth:`to_sequences`)."""
        if self.rows is None:
            return out
        B, h, Tq, d = out.shape
        if self._dense:
            return out.transpose(0, 1).reshape(1, h, B * Tq, d)
        return out.transpose(1, 2).reshape(B * Tq, h, d).index_select(0, self.rows).transpose(0, 1).unsqueeze(0)

    def mask(self, window):
        if window not in self._masks:
            T = self.key_mask.shape[1]
            kpos = torch.arange(T, device=self.query_index.device)
            qpos = self.query_index.unsqueeze(-1)
            allowed = (kpos <= qpos) & self.key_mask.bool().unsqueeze(1)
            if window is not None:
                allowed = allowed & (kpos > qpos - window)
            # A query slot that sees no key (padding of the query list) would give NaN; let it see
            # key 0 instead. Those slots are never read.
            allowed[..., 0] |= ~allowed.any(-1)
            self._masks[window] = allowed.unsqueeze(1)
        return self._masks[window]

    def attn_bias(self, window, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`mask` as an additive float mask (0 or -inf), built once per window and dtype.
        Given a boolean mask, attention converts it, and its backward keeps, a float copy per
        layer ([B, 1, Tq, T] each: a GiB at 4 x 1024 queries over 2048 keys in 30 layers); given
        this one, every layer keeps the same tensor."""
        if (window, dtype) not in self._biases:
            allowed = self.mask(window)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._biases[window, dtype] = bias.masked_fill(~allowed, float("-inf"))
        return self._biases[window, dtype]

    def rotary(self, arch: ArchAdapter, i: int, x: torch.Tensor):
        key = arch.rotary_key(i)
        if key not in self._rotary:
            self._rotary[key] = arch.rotary(i, x, self.query_position)
        return self._rotary[key]
