"""Deltas on the frozen layers: what the diffusion path trains inside each decoder layer.

    Q' = Q + dQ,  O' = O + dO,  MLP' = MLP with a delta on each of its linear layers,
    dW x = (alpha / r) B A x  (low rank, B = 0 at init)  or  D x  (the ``full`` variant, D = 0).

The stream adds its q/o deltas itself (``l2d/path.py``); the MLP's deltas ride on forward hooks of
the MLP's own linear layers, which :class:`DeltaSwitch` turns on only while the stream calls the
frozen MLP, or during the adapted context pass (``context="adapted"``), when the q/o deltas act
through hooks too. Anywhere else the hooks return nothing: the main path is the base model.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .arch import FUSED_GATE_UP
from .config import L2DConfig
from .stream_mlp import stream_mlp


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


def linear_features(module: nn.Module):
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


def remove_handles(handles: list) -> list:
    """Remove every hook in ``handles``; returns the empty list that replaces them."""
    for handle in handles:
        handle.remove()
    return []


def context_delta_hook(switch: DeltaSwitch, delta: nn.Module):
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
        linears = {name: m for name, m in mlp.named_modules() if linear_features(m) is not None}
        covered = {id(p) for m in linears.values() for p in m.parameters(recurse=False)}
        self._handles = []
        if not linears or any(id(p) not in covered for p in mlp.parameters()):
            self.parallel = make_delta(config, hidden_size, hidden_size)
            if in_context:  # the context pass calls the MLP itself: add the adapter there
                self._handles.append(mlp.register_forward_hook(context_delta_hook(switch, self.parallel)))
            return
        for name, module in linears.items():
            key = name.replace(".", "__")
            self.deltas[key] = make_delta(config, *linear_features(module))
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
        self._handles = remove_handles(self._handles)
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
