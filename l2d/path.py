"""The diffusion path: conditioning, input encoder, one adaLN-zero block per layer, merge.

For a query position ``i`` with noisy latent ``x_t`` of token ``y_{i+1}``:

    c    = MLP(sinusoidal(t)) + class_embedding(label)
    h_f  = Encoder([x_t / s(t), z_hat])          (t x_t / s(t)^2 for encoder_input="denoised")
    per layer l, with (dw1, shift1, gate1, dw2, shift2, gate2) = adaLN_l(c):
      h_f += gate1 * O'( Attn( Q'( Norm_{w1+dw1}(h_f) + shift1 ), K_main_l, V_main_l ) )
      h_f += gate2 * MLP'( Norm_{w2+dw2}(h_f) + shift2 )
    h    = h_main_L + g(t) * h_f,   g(t) = m(c_t) - m(c_0)  (+ 1[t > 0] for merge_init="open", + t for "ramp")

With ``stream_init="main"`` (the default) the stream starts as ``h_f = e_s + Encoder(...)``, ``e_s``
being what layer ``s = L - stream_layers`` (0 by default) receives at position ``i``, the blocks
run layers ``s .. L-1`` only, and the merge is ``h = h_main_L + g(t) * (h_f - h_main_L)``.

``Q'``, ``O'``, ``MLP'`` are the layer's frozen modules plus trainable deltas. The path has no
keys/values of its own: query ``i`` attends to the main path's keys ``0..i`` only, or, with
``context="adapted"``, to those of a second pass of the frozen layers with the same deltas on.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import l2d_kernels

from .arch import FUSED_GATE_UP, ArchAdapter, norm_params
from .config import L2DConfig
from .latent import LatentMap, marginal_std
from .stream_mlp import stream_mlp


# --- deltas on frozen projections ----------------------------------------------------------
class LowRankDelta(nn.Module):
    """``delta(x) = (alpha / r) * B A x`` with ``B = 0`` at init (so the frozen layer is unchanged)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, init: str = "torch"):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        if init == "paper":  # the reference's A ~ N(0, 1 / r^2)
            nn.init.normal_(self.A, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(F.linear(x.to(self.A.dtype), self.A))

    @property
    def first_weight(self) -> torch.Tensor:
        """The weight applied first (``A``): ``l2d/stream_mlp.py`` fuses that matmul with the activation."""
        return self.A

    def finish(self, r: torch.Tensor) -> torch.Tensor:
        """The rest after ``r = A x``: ``(alpha / r) B r``."""
        return F.linear(r, self.B) * self.scale


class FullDelta(nn.Module):
    """The ``full`` variant: a trainable copy ``W + D`` of a frozen weight, stored as ``D = 0`` at init."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.D = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.D.dtype), self.D)

    @property
    def first_weight(self) -> torch.Tensor:
        return self.D

    def finish(self, r: torch.Tensor) -> torch.Tensor:
        """Nothing after ``D x``."""
        return r


def make_delta(config: L2DConfig, in_features: int, out_features: int) -> nn.Module:
    if config.path_variant == "full":
        return FullDelta(in_features, out_features)
    return LowRankDelta(in_features, out_features, config.rank, config.alpha, config.weight_init)


def _linear_features(module: nn.Module):
    """(in, out) of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    return None


class DeltaSwitch:
    """Turns the deltas that ride on forward hooks of frozen modules on and off.

    ``on``: the MLP deltas (hooks on the MLP's own linear layers), while the diffusion stream calls
    a frozen MLP (``active()``) or during the adapted context pass. ``context``: the q/o deltas as
    hooks, only during the context pass (the stream adds its q/o deltas itself). Outside those
    the hooks return nothing, so the main path (and the base model used alone) is untouched.
    """

    def __init__(self):
        self.on = False
        self.context = False

    @contextlib.contextmanager
    def _set(self, on: bool, context: bool | None = None):
        prev = self.on, self.context
        self.on = on
        if context is not None:
            self.context = context
        try:
            yield
        finally:
            self.on, self.context = prev

    def active(self):
        """The MLP delta hooks on."""
        return self._set(True)

    def paused(self):
        """The MLP delta hooks off (the caller adds the deltas itself), the context flag kept."""
        return self._set(False)

    def context_pass(self):
        """Every delta hook on: the frozen layers run as the adapted context."""
        return self._set(True, context=True)


def _context_delta_hook(switch: DeltaSwitch, delta: nn.Module):
    """A forward hook that adds ``delta(input)`` to a frozen module's output during the adapted
    context pass only (elsewhere the module is left as it is)."""
    def hook(module, inputs, output):
        if switch.context:
            return output + delta(inputs[0]).to(output.dtype)
        return None
    return hook


class MLPDeltas(nn.Module):
    """Deltas for every linear layer of one frozen MLP, or one parallel adapter when the MLP
    holds other parameters (e.g. 3-D expert weights of mixture-of-experts)."""

    def __init__(self, mlp: nn.Module, config: L2DConfig, hidden_size: int, switch: DeltaSwitch,
                 in_context: bool = False, parts: tuple | None = None):
        super().__init__()
        self.switch = switch
        self.parts = None  # set below when the MLP's layout is known and every projection has a delta
        self.in_context = in_context  # the deltas also act in the adapted context pass
        self.deltas = nn.ModuleDict()
        self.parallel = None
        linears = {name: m for name, m in mlp.named_modules() if _linear_features(m) is not None}
        covered = {id(p) for m in linears.values() for p in m.parameters(recurse=False)}
        self._handles = []
        if not linears or any(id(p) not in covered for p in mlp.parameters()):
            self.parallel = make_delta(config, hidden_size, hidden_size)
            if in_context:  # the context pass calls the MLP itself: add the adapter there
                self._handles.append(mlp.register_forward_hook(_context_delta_hook(switch, self.parallel)))
            return
        for name, module in linears.items():
            key = name.replace(".", "__")
            self.deltas[key] = make_delta(config, *_linear_features(module))
            self._handles.append(module.register_forward_hook(self._hook(key)))
        named = [name for name in parts[:3] if name not in (None, FUSED_GATE_UP)] if parts is not None else []
        if (parts is not None and all(name in self.deltas for name in named)
                and callable(getattr(mlp, parts[3], None))):
            self.parts = parts
            if in_context and "forward" not in mlp.__dict__:
                # the context pass calls the module: lend it the lean forward there (not when
                # something else, e.g. an accelerate hook, has already replaced its forward)
                self._context_forward = _ContextForward(mlp, self)
                mlp.forward = self._context_forward

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if self.switch.on and (self.in_context or not self.switch.context):
                return output + self.deltas[key](inputs[0]).to(output.dtype)
            return None
        return hook

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        lent = getattr(self, "_context_forward", None)
        if lent is not None and lent.mlp.__dict__.get("forward") is lent:
            del lent.mlp.forward  # the class's forward again
        self._context_forward = None

    def forward(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.parts is not None and not self.switch.on and not mlp.training:
            # same result, less kept for backward (l2d/stream_mlp.py)
            return stream_mlp(mlp, self.parts, self.deltas, x)
        with self.switch.active():
            out = mlp(x)
        if self.parallel is not None:
            out = out + self.parallel(x).to(out.dtype)
        return out


class _ContextForward:
    """Stands in for a frozen MLP's ``forward`` (an instance attribute, removed by
    :meth:`MLPDeltas.remove_hooks`). In the adapted context pass, which calls the module over every
    position, it runs the MLP through :func:`stream_mlp` with the deltas added there and the
    projections' hooks paused: the same result, two intermediates kept for backward instead of
    four. Anywhere else (the main path, the base used alone) it is the module's own forward."""

    def __init__(self, mlp: nn.Module, owner: MLPDeltas):
        self.mlp = mlp
        self.owner = owner
        self.original = mlp.forward

    def __call__(self, x, *args, **kwargs):
        owner = self.owner
        if owner.switch.context and owner.switch.on and owner.parts is not None and not (args or kwargs) \
                and not self.mlp.training:
            with owner.switch.paused():
                return stream_mlp(self.mlp, owner.parts, owner.deltas, x)
        return self.original(x, *args, **kwargs)


# --- conditioning, encoder, merge ----------------------------------------------------------
def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> torch.Tensor:
    """``[cos(s t * f_k), sin(s t * f_k)]`` with ``f_k = max_period^(-k / (dim/2))``; ``t`` in [0, 1]
    is scaled by ``s`` (1000 by default, so its range spans the frequencies; the reference: 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale if scale != 1.0 else t.float()).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Conditioning(nn.Module):
    """``c = MLP(sinusoidal(t)) + class_embedding(label)``; row ``num_classes`` is the null class."""

    def __init__(self, config: L2DConfig):
        super().__init__()
        self.time_features = config.time_features
        self.time_mlp = nn.Sequential(nn.Linear(config.time_features, config.cond_dim), nn.SiLU(),
                                      nn.Linear(config.cond_dim, config.cond_dim))
        self.time_scale = config.time_scale
        if config.weight_init == "paper":  # the reference's: N(0, 0.02^2) weights, zero biases
            for layer in (self.time_mlp[0], self.time_mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # no classes (class_names=()): no class embedding, c is the time embedding alone
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.cond_dim) if config.num_classes else None
        # small, as for the time MLP's output: N(0, 1) rows made sum|SiLU(c)|, and with it every
        # zero-initialised head's first AdamW steps, several times larger
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=config.class_init_std)
        self.null_class = config.num_classes

    def forward(self, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """t: [B, Tq] in [0, 1]; class_labels: [B] (null class for none), or one per query [B, Tq].
        Returns [B, Tq, cond_dim]."""
        dtype = self.time_mlp[0].weight.dtype
        c = self.time_mlp(sinusoidal(t.clamp(0.0, 1.0), self.time_features, scale=self.time_scale).to(dtype))
        if self.class_embedding is None:
            return c
        labels = self.class_embedding(class_labels)
        return c + (labels if class_labels.dim() == t.dim() else labels.unsqueeze(1))


class InputEncoder(nn.Module):
    """``[x_t / s(t), z_hat] -> MLP -> R^H`` (or ``t x_t / s(t)^2``, ``config.encoder_input``): the
    initial diffusion residual (added to the token embedding when the stream starts from the main path)."""

    def __init__(self, latent_dim: int, hidden: int, out: int, reads_z_hat: bool = True):
        super().__init__()
        self.reads_z_hat = reads_z_hat  # False (config.encoder_z_hat): x_t alone, as the reference
        self.net = nn.Sequential(nn.Linear((2 if reads_z_hat else 1) * latent_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, x_scaled: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        dtype = self.net[0].weight.dtype
        return self.net((torch.cat([x_scaled, z_hat], dim=-1) if self.reads_z_hat else x_scaled).to(dtype))


def conditioning_head(config: L2DConfig, out: int) -> nn.Sequential:
    """A head on ``c`` whose last layer starts at zero: ``Sequential(SiLU, Linear(cond, out))``
    (``head_layers=1``) or ``Sequential(Linear(cond, cond), SiLU, Linear(cond, out))`` (2, the
    reference's; its first layer xavier-uniform with a zero bias under ``weight_init="paper"``)."""
    cond = config.cond_dim
    if config.head_layers == 1:
        head = nn.Sequential(nn.SiLU(), nn.Linear(cond, out))
    else:
        head = nn.Sequential(nn.Linear(cond, cond), nn.SiLU(), nn.Linear(cond, out))
        if config.weight_init == "paper":
            _xavier(head[0])
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def head_input(config: L2DConfig, c: torch.Tensor) -> torch.Tensor:
    """What the adaLN heads' shared part reads: ``SiLU(c)`` for one-layer heads (applied once for
    all blocks, see :meth:`DiffusionBlock.modulation`), ``c`` itself for two-layer heads."""
    return F.silu(c) if config.head_layers == 1 else c


def _xavier(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


# --- one block per decoder layer -----------------------------------------------------------
class DiffusionBlock(nn.Module):
    """adaLN-zero block that reuses decoder layer ``index`` of the frozen main path."""

    def __init__(self, arch: ArchAdapter, index: int, config: L2DConfig, switch: DeltaSwitch,
                 in_stream: bool = True, in_context: bool = False):
        super().__init__()
        self.index = index
        # False: a layer below ``stream_layers`` whose deltas act only in the adapted context pass
        # (no adaLN head: nothing conditions on t there)
        self.in_stream = in_stream
        self.open_gates = config.stream_init == "main"  # gates 1 + g: the block starts as its frozen layer
        self.adaln_scale = config.adaln_scale
        hidden = arch.hidden_size
        if in_stream:
            self.adaln = conditioning_head(config, 6 * hidden)
        q_in, q_out = arch.q_in_out(index)
        self.q_delta = make_delta(config, q_in, q_out)
        o_in, o_out = _linear_features(arch.o_module(index))
        self.o_delta = make_delta(config, o_in, o_out)
        self.in_context = in_context  # this layer's deltas also act in the adapted context pass
        self.mlp_deltas = MLPDeltas(arch.mlp(index), config, hidden, switch, self.in_context, arch.spec.mlp_parts)
        self.switch = switch
        self._handles = []
        if self.in_context:  # the q/o deltas also act in the context pass, through hooks
            self._handles = [arch.q_module(index).register_forward_hook(self._context_q_hook(arch)),
                             arch.o_module(index).register_forward_hook(_context_delta_hook(switch, self.o_delta))]
        if config.kv_rank:  # same alpha / rank scale as the other deltas
            kv_heads, head_dim = arch.kv_dims(index)
            scale_alpha = config.alpha * config.kv_rank / config.rank
            self.k_delta = LowRankDelta(hidden, kv_heads * head_dim, config.kv_rank, scale_alpha)
            self.v_delta = LowRankDelta(hidden, kv_heads * head_dim, config.kv_rank, scale_alpha)

    def _context_q_hook(self, arch: ArchAdapter):
        def hook(module, inputs, output):
            if self.switch.context:
                return arch.add_to_queries(self.index, output, self.q_delta(inputs[0]).to(output.dtype))
            return None
        return hook

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.mlp_deltas.remove_hooks()

    def kv_deltas(self, arch: ArchAdapter, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rot(dK x), dV x)`` [B, kv_heads, T, head_dim] for the main path's attention input ``x``
        [B, T, H]; added to the cached post-rotary K and V (rotation is linear)."""
        kv_heads, head_dim = arch.kv_dims(self.index)
        shape = (*x.shape[:-1], kv_heads, head_dim)
        dk = self.k_delta(x).view(shape).transpose(1, 2)
        dv = self.v_delta(x).view(shape).transpose(1, 2)
        return arch.apply_rotary(self.index, dk, cos_sin), dv

    def modulation(self, c_act: torch.Tensor):
        """(dw1, shift1, gate1, dw2, shift2, gate2), each [B, Tq, H], from ``c_act = SiLU(c)``; all zero
        at init (gates 1 when the stream starts from the main path).

        ``adaln`` is ``Sequential(SiLU, Linear)``; the caller applies the SiLU once for all blocks, so
        that backward keeps one ``SiLU(c)`` rather than one per block."""
        # one-layer head: its SiLU was applied by the caller; two-layer head: c_act is c itself
        out = (self.adaln[1](c_act) if len(self.adaln) == 2 else self.adaln(c_act)).float()
        if self.adaln_scale != 1.0:
            out = out * self.adaln_scale
        dw1, shift1, gate1, dw2, shift2, gate2 = out.chunk(6, dim=-1)
        if self.open_gates:
            gate1, gate2 = 1 + gate1, 1 + gate2
        return dw1, shift1, gate1, dw2, shift2, gate2

    def forward(self, arch: ArchAdapter, h: torch.Tensor, c_act: torch.Tensor, ctx: "StreamContext", modulation=None):
        """One block on the stream ``h`` [B, Tq, H]; ``c_act = SiLU(c)``, or ``modulation`` precomputed."""
        i = self.index
        dw1, shift1, gate1, dw2, shift2, gate2 = self.modulation(c_act) if modulation is None else modulation
        a = _modulated_norm(arch, i, "attn_norm", h, dw1, shift1)
        attn_out = self.attention(arch, a, ctx)
        if arch.spec.post_attn_norm:
            attn_out = arch.norm(i, "post_attn_norm")(attn_out)
        mlp_in = h if arch.spec.parallel else h + gate1 * attn_out.float() * arch.residual_multiplier
        m = _modulated_norm(arch, i, "mlp_norm", mlp_in, dw2, shift2)
        dtype = ctx.dtype
        mlp_out = self.mlp_deltas(arch.mlp(i), m.to(dtype))
        if arch.spec.post_mlp_norm:
            mlp_out = arch.norm(i, "post_mlp_norm")(mlp_out)
        if arch.spec.parallel:
            return h + (gate1 * attn_out.float() + gate2 * mlp_out.float()) * arch.residual_multiplier
        return mlp_in + gate2 * mlp_out.float() * arch.residual_multiplier

    def attention(self, arch: ArchAdapter, a: torch.Tensor, ctx: "StreamContext") -> torch.Tensor:
        """Queries of the diffusion stream against the main path's cached keys/values of this layer."""
        i = self.index
        x = a.to(ctx.dtype)
        q = arch.query_projection(i, x) + self.q_delta(a).to(ctx.dtype)
        q = arch.apply_rotary(i, arch.shape_queries(i, q), ctx.rotary(arch, i, x))
        k, v = ctx.keys[i], ctx.values[i]
        window, softcap = arch.sliding_window(i), arch.attn_softcap(i)
        mask = ctx.mask(window) if softcap is not None else ctx.attn_bias(window, q.dtype)
        out = attend(ctx.to_sequences(q), k, v, mask, arch.attn_scale(i), softcap)
        out = ctx.to_rows(out)
        out = out.transpose(1, 2).reshape(*a.shape[:-1], -1)
        return arch.o_module(i)(out) + self.o_delta(out).to(out.dtype)


def _modulated_norm(arch: ArchAdapter, i: int, which: str, h, dw, shift):
    """``Norm_{w+dw}(h) + shift`` with layer ``i``'s frozen norm (identity where the family has none)."""
    weight, bias, eps, kind = norm_params(arch.norm(i, which), arch.spec.norm_kind)
    return l2d_kernels.modulated_norm(h, weight, bias, dw, shift, eps, kind)


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

    def __init__(self, keys, values, query_index, query_position, key_mask, dtype, kv_deltas=None, rows=None):
        if kv_deltas is not None:  # the path's own reading of the context: K + dK, V + dV
            keys = [k + dk.to(k.dtype) for k, (dk, _) in zip(keys, kv_deltas)]
            values = [v + dv.to(v.dtype) for v, (_, dv) in zip(values, kv_deltas)]
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


class LayerBlocks(nn.ModuleDict):
    """The blocks keyed by their decoder layer (state-dict keys ``blocks.<layer>.``, whichever
    layers have one), iterated in layer order; ``blocks[i]`` is layer ``i``'s block."""

    def __init__(self, blocks):
        super().__init__({str(block.index): block for block in blocks})

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, layer) -> DiffusionBlock:
        if str(layer) not in self._modules:
            raise IndexError(f"decoder layer {layer} has no diffusion block (blocks cover layers "
                             f"{', '.join(self._modules)}).")
        return self._modules[str(layer)]


class DiffusionPath(nn.Module):
    """All trainable parts: latent map, conditioning, encoder, one block per layer the stream runs
    through (and per lower layer whose deltas act in the adapted context pass), merge head."""

    def __init__(self, arch: ArchAdapter, config: L2DConfig):
        super().__init__()
        self.config = config
        hidden = arch.hidden_size
        self.switch = DeltaSwitch()
        self.latent = LatentMap(hidden, config.latent_dim, bias=config.latent_bias)
        self.conditioning = Conditioning(config)
        self.encoder = InputEncoder(config.latent_dim, config.encoder_hidden or hidden, hidden,
                                    reads_z_hat=config.encoder_z_hat)
        if config.weight_init == "paper":  # the reference's xavier-uniform weights, zero biases
            _xavier(self.latent.phi)
            for layer in (self.encoder.net[0], self.encoder.net[2]):
                _xavier(layer)
        if config.merge_init in ("ramp", "open"):  # the gate starts open, so the path's input starts at zero
            nn.init.zeros_(self.encoder.net[-1].weight)
            nn.init.zeros_(self.encoder.net[-1].bias)
        L = arch.num_layers
        for name in ("context_layers", "stream_layers"):
            value = getattr(config, name)
            if value is not None and value > L:
                raise ValueError(f"L2DConfig: {name}={value} but the base has {L} decoder layers; "
                                 f"use at most {L} (or None: all).")
        # The stream runs through layers stream_start..L-1; layers below it get a block only when the
        # adapted context pass needs their deltas. Blocks are always a contiguous top range.
        self.stream_start = L - (config.stream_layers or L)
        context_start = L - ((config.context_layers or L) if config.context == "adapted" else 0)
        self.blocks = LayerBlocks(
            DiffusionBlock(arch, i, config, self.switch, in_stream=i >= self.stream_start,
                           in_context=i >= context_start)
            for i in range(min(self.stream_start, context_start), L))
        self.merge = conditioning_head(config, hidden)

    def kv_deltas(self, arch: ArchAdapter, attn_inputs: list, position_ids: torch.Tensor) -> list | None:
        """Per layer ``(dK, dV)`` at the positions of ``attn_inputs`` (``kv_rank > 0``), else None."""
        if not self.config.kv_rank:
            return None
        rotary = {}
        out = []
        for i, (block, x) in enumerate(zip(self.blocks, attn_inputs)):
            key = arch.rotary_key(i)
            if key not in rotary:
                rotary[key] = arch.rotary(i, x, position_ids)
            out.append(block.kv_deltas(arch, x.float(), rotary[key]))
        return out

    @property
    def stream_blocks(self) -> list:
        """The blocks the diffusion stream runs through (layers ``stream_start`` and up)."""
        return [block for block in self.blocks if block.in_stream]

    def remove_hooks(self):
        for block in self.blocks:
            block.remove_hooks()

    def time_conditioning(self, t: torch.Tensor, class_labels: torch.Tensor,
                          modulations: bool = False) -> "TimeConditioning":
        """Everything that depends on ``t`` and the class alone (not on the latent): ``c``, the scale
        the encoder reads ``x_t`` at (``1 / s(t)`` or ``t / s(t)^2``), the merge gate
        ``m(c_t) - m(c_0)`` (plus ``1[t > 0]`` or ``t`` for ``merge_init`` open or ramp) and, if
        asked, every block's adaLN modulation.

        A fixed-grid sampler visits the same times for every token, so generation builds these once
        per grid time; training builds them per forward (modulations inside each block, so gradient
        checkpointing recomputes rather than stores them).
        """
        c = self.conditioning(t, class_labels)
        c0 = self.conditioning(torch.zeros_like(t), class_labels)
        gate = self.merge(c).float() - self.merge(c0).float()
        if self.config.merge_init == "ramp":  # g = t + m(c_t) - m(c_0): open from the first step
            gate = gate + t.float().clamp(0.0, 1.0).unsqueeze(-1)
        elif self.config.merge_init == "open":  # g = 1[t > 0] + m(c_t) - m(c_0)
            gate = gate + (t > 0).float().unsqueeze(-1)
        # Zero exactly at t=0 whatever the GEMM blocking did to equal rows: steps=0 is the base.
        at_zero = (t == 0).unsqueeze(-1)
        gate = torch.where(at_zero, torch.zeros_like(gate), gate)
        s = marginal_std(t.float(), self.config.sigma).unsqueeze(-1)
        # the encoder reads x_t / s(t), or t x_t / s(t)^2 = E[z | x_t] (linear, unit-variance z)
        x_scale = 1 / s if self.config.encoder_input == "scaled" else t.float().unsqueeze(-1) / s**2
        c_act = head_input(self.config, c) if modulations else None
        mods = [block.modulation(c_act) for block in self.stream_blocks] if modulations else None
        return TimeConditioning(c, gate, x_scale, mods, bool(at_zero.all()))

    def forward(self, arch: ArchAdapter, ctx: StreamContext, h_main: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor | None, z_hat: torch.Tensor, class_labels: torch.Tensor | None,
                checkpoint: bool = False, h_start: torch.Tensor | None = None,
                cond: "TimeConditioning | None" = None):
        """Merged last hidden state ``h`` [B, Tq, H] (before the frozen final norm).

        h_main: [B, Tq, H] main path's last hidden states at the query positions.
        x_t, z_hat: [B, Tq, d]; t: [B, Tq]; class_labels: [B] (null class allowed) or [B, Tq].
        h_start: [B, Tq, H] what the stream's first layer (``stream_start``) receives there in the
            main path, or in the adapted context pass (needed when ``stream_init="main"``).
        cond: precomputed :meth:`time_conditioning` (then ``t`` and ``class_labels`` are not read).
        """
        if cond is None:
            cond = self.time_conditioning(t, class_labels)
        if cond.zero:  # t = 0 everywhere: the merge gate is exactly zero, the result is the base
            return h_main
        h = self.encoder(x_t.float() * cond.x_scale, z_hat.float()).float()
        if self.config.stream_init == "main":
            if h_start is None:
                raise ValueError("stream_init='main' needs h_start, the main path's input to the stream's "
                                 "first layer.")
            h = h + h_start.float()
        c_act = head_input(self.config, cond.c) if cond.modulations is None else None  # each block's adaLN input
        for i, block in enumerate(self.stream_blocks):
            modulation = None if cond.modulations is None else cond.modulations[i]
            if checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, arch, h, c_act, ctx, modulation, use_reentrant=False)
            else:
                h = block(arch, h, c_act, ctx, modulation=modulation)
        return self.merged(h_main, h, cond.gate)

    def merged(self, h_main, h_f, gate):
        """``h_main + g * h_f`` (``g * (h_f - h_main)`` when the stream starts from the main path),
        ``g`` being :meth:`time_conditioning`'s gate: exactly ``h_main`` at ``t = 0``."""
        if self.config.stream_init == "main":
            h_f = h_f - h_main.float()
        return (h_main.float() + gate * h_f).to(h_main.dtype)


@dataclass
class TimeConditioning:
    """The ``t``-only parts of one evaluation (see :meth:`DiffusionPath.time_conditioning`)."""

    c: torch.Tensor                  # [B, Tq, cond_dim]
    gate: torch.Tensor               # [B, Tq, H] merge gate, zero where t == 0
    x_scale: torch.Tensor            # [B, Tq, 1] what x_t is multiplied by for the encoder
    modulations: list | None         # per block (dw1, shift1, gate1, dw2, shift2, gate2), or None
    zero: bool                       # t == 0 everywhere
