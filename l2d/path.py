"""The diffusion path: conditioning, input encoder, one adaLN-zero block per layer, merge.

For a query position ``i`` with noisy latent ``x_t`` of token ``y_{i+1}``:

    c    = MLP(sinusoidal(t)) + class_embedding(label)
    h_f  = Encoder([x_t / s(t), z_hat])
    per layer l, with (dw1, shift1, gate1, dw2, shift2, gate2) = adaLN_l(c):
      h_f += gate1 * O'( Attn( Q'( Norm_{w1+dw1}(h_f) + shift1 ), K_main_l, V_main_l ) )
      h_f += gate2 * MLP'( Norm_{w2+dw2}(h_f) + shift2 )
    h    = h_main_L + g(t) * h_f,   g(t) = m(c_t) - m(c_0)  (+ 1[t > 0] for merge_init="open", + t for "ramp")

With ``stream_init="main"`` (the default) the stream starts as ``h_f = e_s + Encoder(...)``, ``e_s``
being what layer ``s = L - stream_layers`` (0 by default) receives at position ``i``, the blocks
run layers ``s .. L-1`` only, and the merge is ``h = h_main_L + g(t) * (h_f - h_main_L)``.

``Q'``, ``O'``, ``MLP'`` are the layer's frozen modules plus trainable deltas (``l2d/deltas.py``).
The path has no keys/values of its own: query ``i`` attends to the main path's keys ``0..i`` only
(``l2d/stream.py``), or, with ``context="adapted"``, to those of a second pass of the frozen layers
with the same deltas on (``l2d/main_path.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import l2d_kernels

from .arch import ArchAdapter, norm_params
from .config import L2DConfig
from .deltas import DeltaSwitch, MLPDeltas, context_delta_hook, linear_features, make_delta, remove_handles
from .latent import LatentMap, marginal_std
from .stream import StreamContext, attend


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
    """``[x_t / s(t), z_hat] -> MLP -> R^H``: the initial diffusion residual (added to the token embedding when the stream starts from the main path)."""

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
        o_in, o_out = linear_features(arch.o_module(index))
        self.o_delta = make_delta(config, o_in, o_out)
        self.in_context = in_context  # this layer's deltas also act in the adapted context pass
        self.mlp_deltas = MLPDeltas(arch.mlp(index), config, hidden, switch, self.in_context, arch.spec.mlp_parts)
        self.switch = switch
        self._handles = []
        if self.in_context:  # the q/o deltas also act in the context pass, through hooks
            self._handles = [arch.q_module(index).register_forward_hook(self._context_q_hook(arch)),
                             arch.o_module(index).register_forward_hook(context_delta_hook(switch, self.o_delta))]

    def _context_q_hook(self, arch: ArchAdapter):
        def hook(module, inputs, output):
            if self.switch.context:
                return arch.add_to_queries(self.index, output, self.q_delta(inputs[0]).to(output.dtype))
            return None
        return hook

    def remove_hooks(self):
        self._handles = remove_handles(self._handles)
        self.mlp_deltas.remove_hooks()

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

    def forward(self, arch: ArchAdapter, h: torch.Tensor, c_act: torch.Tensor, ctx: StreamContext, modulation=None):
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

    def attention(self, arch: ArchAdapter, a: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
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
        if config.stream_layers is not None and config.stream_layers > L:
            raise ValueError(f"L2DConfig: stream_layers={config.stream_layers} but the base has {L} decoder "
                             f"layers; use at most {L} (or None: all).")
        # The stream runs through layers stream_start..L-1; with the adapted context every layer gets a
        # block (its deltas act in the context pass), otherwise only those. Blocks are a contiguous top range.
        self.stream_start = L - (config.stream_layers or L)
        adapted = config.context == "adapted"
        self.blocks = LayerBlocks(
            DiffusionBlock(arch, i, config, self.switch, in_stream=i >= self.stream_start, in_context=adapted)
            for i in range(0 if adapted else self.stream_start, L))
        self.merge = conditioning_head(config, hidden)

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
        the encoder reads ``x_t`` at (``1 / s(t)``), the merge gate
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
        x_scale = 1 / s  # the encoder reads x_t / s(t)
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

    def batch_rows(self, index: torch.Tensor) -> "TimeConditioning":
        """The same parts for the batch rows in ``index`` [n] alone."""
        mods = None if self.modulations is None else [
            tuple(m.index_select(0, index) for m in block) for block in self.modulations]
        return TimeConditioning(self.c.index_select(0, index), self.gate.index_select(0, index),
                                self.x_scale.index_select(0, index), mods, self.zero)
