"""The frozen MLP of a decoder layer run by the diffusion stream, with its deltas, keeping little
for backward.

Gated MLPs (llama, mistral, qwen, gemma, olmo2, granite)::

    g = W_g m + dG(m),   u = W_u m + dU(m),   p = act(g) * u,   out = W_d p + dD(p)

phi3's fused ones with ``[g, u] = W_gu m + dGU(m)`` split in halves, and plain ones (gpt2,
gpt_neox) with ``p = act(W_fc m + dFC(m))``. Run op by op, autograd keeps
``g`` (for act'), ``act(g)`` and ``u`` (for the product) and ``p`` (for the down delta's first
matmul ``p A^T``): four [rows, intermediate] tensors per block, the largest part of what a step
keeps. :class:`ActivationProject` computes ``p`` and ``r = p A^T`` together and keeps ``g`` and
``u`` only; its backward recomputes ``act(g)`` and ``p`` (elementwise work, no matmul):

    dp  = dp_out + dr A                    (the frozen down projection's gradient plus the delta's)
    dA  = dr^T p
    du  = dp * act(g),    dg = dp * u * act'(g)        (plain: dg = dp * act'(g))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import FUSED_GATE_UP


class ActivationProject(torch.autograd.Function):
    """``(p, r) = (act(g) * u, p A^T)``; ``u`` may be None (then ``p = act(g)``)."""

    @staticmethod
    def forward(ctx, g, u, A, act):
        with torch.no_grad():
            a = act(g)
            p = a * u if u is not None else a
            r = F.linear(p.to(A.dtype), A)  # under autocast this runs (and is redone) in r.dtype
        ctx.act = act
        ctx.save_for_backward(g, u, A)
        ctx.p_dtype = p.dtype
        return p, r

    @staticmethod
    def backward(ctx, dp, dr):
        g, u, A = ctx.saved_tensors
        need_g, need_u, need_A = ctx.needs_input_grad[:3]
        # act' by autograd on a detached copy; the module's forward is called directly so that
        # module hooks (profilers, FlopCounterMode) do not see a graph built inside a backward
        act = ctx.act.forward if isinstance(ctx.act, nn.Module) else ctx.act
        with torch.enable_grad():
            g_leaf = g.detach().requires_grad_(need_g)
            a = act(g_leaf)
        p = a.detach() * u if u is not None else a.detach()
        if dr is not None:
            mm = dr.dtype
            extra = (dr @ A.to(mm)).to(ctx.p_dtype)
            dp = extra if dp is None else dp + extra
            dA = (dr.flatten(0, -2).t() @ p.to(mm).flatten(0, -2)).to(A.dtype) if need_A else None
        else:
            dA = None
        if dp is None:
            return None, None, dA, None
        du = dp * a.detach() if (u is not None and need_u) else None
        dg = None
        if need_g:
            da = dp * u if u is not None else dp
            dg, = torch.autograd.grad(a, g_leaf, da)
        return dg, du, dA, None


def stream_mlp(mlp: nn.Module, parts: tuple, deltas, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` plus its deltas, through :class:`ActivationProject`.

    ``parts``: the MLP's attribute names ``(gate or fc, up or None or FUSED_GATE_UP, down,
    activation)`` (from the family's :class:`~l2d.arch.ArchSpec`); ``deltas``: ModuleDict keyed like :class:`MLPDeltas`, each
    with ``first_weight`` and ``finish`` (the low-rank and full deltas of ``l2d/path.py``).
    The frozen projections are called as modules, so their delta hooks must be switched off.
    """
    gate_name, up_name, down_name, act_name = parts
    gate_mod, down_mod = getattr(mlp, gate_name), getattr(mlp, down_name)
    g = gate_mod(x)
    g = g + deltas[gate_name](x).to(g.dtype)
    u = None
    if up_name == FUSED_GATE_UP:  # halves of one output: g and u kept as views of one tensor
        g, u = g.chunk(2, dim=-1)
    elif up_name is not None:
        u = getattr(mlp, up_name)(x)
        u = u + deltas[up_name](x).to(u.dtype)
    down = deltas[down_name]
    p, r = ActivationProject.apply(g, u, down.first_weight, getattr(mlp, act_name))
    out = down_mod(p)
    return out + down.finish(r).to(out.dtype)
