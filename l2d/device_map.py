"""A base dispatched by accelerate (``device_map="auto"``: layers spread over devices, or offloaded):
each diffusion block lives on its decoder layer's device, and the stream is handed over where the
layers change devices.

accelerate's hooks move the frozen layers' inputs and load offloaded weights in the layer's own
forward; the diffusion stream calls the layer's submodules itself, so for each block this module
does the same: before the block runs, the layer's offloaded weights are loaded (its
``AlignDevicesHook.pre_forward``) and the stream, the conditioning and the block's view of the
context move to the layer's device; after it, the weights go back and the stream moves on to the
next block's device (the path's own device after the last one).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def is_dispatched(base: nn.Module) -> bool:
    """Whether accelerate placed ``base`` (a device map, or hooks that offload weights)."""
    return getattr(base, "hf_device_map", None) is not None or any(
        hasattr(m, "_hf_hook") for m in base.modules())


def execution_device(layer: nn.Module, default: torch.device) -> torch.device:
    """Where ``layer`` computes: its accelerate hook's execution device, else its weights' device."""
    for module in layer.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in layer.parameters():
        if p.device.type != "meta":
            return p.device
    return default


def place_blocks(model) -> list:
    """Put each block of ``model.path`` on its layer's device and hook the hand-offs; returns the hooks."""
    home = model.device
    blocks = list(model.path.blocks)
    devices = [execution_device(model.arch.layers[b.index], home) for b in blocks]
    handles = []
    for k, (block, device) in enumerate(zip(blocks, devices)):
        block.to(device)
        after = devices[k + 1] if k + 1 < len(blocks) else home
        offloaded = [m for m in model.arch.layers[block.index].modules()
                     if getattr(getattr(m, "_hf_hook", None), "offload", False)]
        hooks = [m._hf_hook for m in offloaded]
        handles.append(block.register_forward_pre_hook(_enter(device, hooks, offloaded), with_kwargs=True))
        handles.append(block.register_forward_hook(_leave(after, hooks, offloaded)))
    return handles


def _enter(device, hooks, modules):
    def pre_hook(block, args, kwargs):
        for hook, module in zip(hooks, modules):
            hook.pre_forward(module)  # loads the offloaded weights of the layer's submodules
        return tuple(_to(a, device) for a in args), {k: _to(v, device) for k, v in kwargs.items()}
    return pre_hook


def _leave(device, hooks, modules):
    def post_hook(block, args, output):
        for hook, module in zip(hooks, modules):
            hook.post_forward(module, None)  # back to the offload (meta) weights
        return _to(output, device)
    return post_hook


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if hasattr(x, "query_index") and hasattr(x, "keys"):  # a StreamContext: its view on this device
        return _context_on(x, device)
    return x


def _context_on(ctx, device):
    """A shallow copy of the stream context whose tensors (not the per-layer keys/values, which are on
    their layers' devices already) are on ``device``; one copy per context and device."""
    if ctx.query_index.device == device:
        return ctx
    views = ctx.__dict__.setdefault("_device_views", {})
    if device not in views:
        view = copy.copy(ctx)
        view.__dict__ = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                         for k, v in ctx.__dict__.items() if k != "_device_views"}
        views[device] = view
    return views[device]
