"""The wrap-time check: the diffusion path's rebuild of the decoder layers must match the real ones.

With neutral modulation (``dw = shift = 0``, gates 1) and zero deltas, a diffusion block fed the
main path's input to layer ``l`` at every position must return the main path's output of layer
``l``: same norms, query projection, rotary, q/k norms, GQA, window, scales, residual shape.

Layers built alike are checked once (:func:`checked_layers`): the first and the last layer, and
the first of every other kind of layer, told apart by everything a layer's forward can depend on
(its modules' classes, parameter shapes and plain attributes such as a sliding window or a
``use_rope`` flag, hooks, a forward patched on the instance, and the config's per-layer lists such
as ``layer_types`` or ``no_rope_layers``). The check runs the frozen model once on two random rows
(one left-padded by 2 tokens) with the other layers passed through unchanged (their work is not
needed: a checked layer only has to match the real layer on the input it gets), keeps each
checked layer's input/output and its attention's and MLP's, and compares at the unpadded positions

    layer:      block(layer_in)                  vs  the layer's output, every checked layer
    head:       postprocess(lm_head(norm(h_L)))  vs  the model's logits (last position; the first
                                                     HEAD_ROWS vocabulary rows of a plain linear head)

and, for a layer that does not match, which piece does not (to name it in the error):

    attention:  block.attention(attn_in)        vs  the attention module's output
    MLP:        block's MLP (parts or module)    vs  the MLP module's output
 A difference above ``tol(dtype) * max(1, max |reference|)`` refuses
the base, naming the family, the piece and the layer. A derived spec is used only once checked.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .arch import ArchAdapter, ArchRefused, refusal

# max error relative to max(1, max |reference|) per dtype: float32 agrees to ~1e-6, half
# precisions to a few units of their last place
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}

_VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def verify_once(arch: ArchAdapter) -> None:
    """:func:`check` unless this model already passed with this spec."""
    if _VERIFIED.get(arch.model) == arch.spec:
        return
    check(arch)
    _VERIFIED[arch.model] = arch.spec


def check(arch: ArchAdapter, batch: int = 2, length: int = 6, pad: int = 2) -> float:
    """Raise :class:`~l2d.arch.ArchRefused` unless every checked layer (:func:`checked_layers`)
    rebuilt matches the real one; returns the largest error relative to its reference's scale."""
    model = arch.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _check(arch, batch, length, pad)
    finally:
        model.train(was_training)


def _inputs(arch: ArchAdapter, batch: int, length: int, pad: int):
    emb = arch.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, emb.shape[0], (batch, length), generator=g).to(emb.device)
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0  # the last row left-padded, the others not
    return ids, mask


# plain attributes that number a layer rather than shape its computation
_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index", "layer_number", "idx")
_PLAIN = (bool, int, float, str, type(None))


def _plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))


def _hooks(module: nn.Module) -> tuple:
    return tuple(getattr(h, "__qualname__", type(h).__name__) for hooks in (
        module._forward_pre_hooks, module._forward_hooks) for h in hooks.values())


def layer_signature(layers, config, i: int) -> tuple:
    """What decoder layer ``i``'s forward can depend on besides its weights' values: two layers
    with equal signatures compute the same function of their inputs and weights."""
    parts = []
    for name, module in layers[i].named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(module).items()
                             if not k.startswith("_") and k not in _INDEX_ATTRS and _plain(v)))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in (*module.named_parameters(recurse=False),
                                                                   *module.named_buffers(recurse=False))
                        if t is not None)
        # a forward set on the instance (a patch) makes the layer one of a kind
        patched = id(module) if "forward" in vars(module) else None
        parts.append((name, type(module), attrs, tensors, _hooks(module), patched))
    n = len(layers)
    per_layer = tuple((k, repr(v[i])) for k, v in sorted(vars(config).items())
                      if isinstance(v, (list, tuple)) and len(v) == n and not k.startswith("_"))
    return tuple(parts), per_layer


def layer_kinds(layers, config) -> list[int]:
    """For each layer, the first layer with its signature (:func:`layer_signature`)."""
    first, kinds = {}, []
    for i in range(len(layers)):
        kinds.append(first.setdefault(layer_signature(layers, config, i), i))
    return kinds


def checked_layers(layers, config) -> list[int]:
    """The layers the check rebuilds: the first and the last, and the first of every kind."""
    return sorted({0, len(layers) - 1, *layer_kinds(layers, config)})


@contextlib.contextmanager
def only_layers(layers, run):
    """The decoder layers not in ``run`` pass their input through unchanged (in the form the
    first layer run returned its output: a tensor or a tuple led by it) while the block is open."""
    run = set(run)
    form = []

    def note(module, args, out):
        if not form:
            form.append(out)

    def passthrough(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if form and isinstance(form[0], tuple):
            return (x, *form[0][1:])
        return x

    hooks, patched = [], []
    for i, layer in enumerate(layers):
        if i in run:
            hooks.append(layer.register_forward_hook(note))
        elif "forward" not in vars(layer):
            layer.forward = passthrough
            patched.append(layer)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for layer in patched:
            del layer.forward


# the vocabulary rows the logits check computes (a plain linear head of a large vocabulary is most
# of a short forward's work; its rows are all the same function of the final norm's output)
HEAD_ROWS = 256


@contextlib.contextmanager
def head_rows(head: nn.Module, rows: int | None):
    """A plain ``nn.Linear`` head (no subclass, hook or patched forward) computes only its first
    ``rows`` outputs while the block is open; any other head, or ``rows=None``, all of them."""
    plain = (type(head) is nn.Linear and "forward" not in vars(head) and not _hooks(head)
             and rows is not None and rows < head.out_features)
    if plain:
        def forward(x):
            bias = None if head.bias is None else head.bias[:rows]
            return F.linear(x, head.weight[:rows], bias)
        head.forward = forward
    try:
        yield head
    finally:
        if plain:
            del head.forward


def _record(arch: ArchAdapter, layers):
    """Hooks keeping the input/output of each of ``layers`` and its attention's and MLP's;
    returns (store, hooks)."""
    store, hooks = {}, []

    def first(args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return x[0] if isinstance(x, tuple) else x

    def keep(key):
        def hook(module, args, kwargs, out):
            out = out[0] if isinstance(out, tuple) else out
            # clones: some layers add to a child's output in place (falcon's parallel MLP)
            store[key] = (first(args, kwargs).detach().clone(), out.detach().clone())
        return hook

    for i in layers:
        for name, module in (("layer", arch.layers[i]), ("attention", arch.attn(i)), ("MLP", arch.mlp(i))):
            hooks.append(module.register_forward_hook(keep((name, i)), with_kwargs=True))
    hooks.append(arch.final_norm.register_forward_pre_hook(lambda m, a: store.__setitem__("h", a[0].detach())))
    return store, hooks


def _run(arch: ArchAdapter, ids, mask, layers):
    """One forward of the frozen model running only ``layers`` (the others pass their input
    through; all of them where that fails): the recorded activations, its cache, and the logits
    of the last position only where the family allows (the vocabulary head is most of a short
    forward's work)."""
    import inspect

    from .main_path import positions_from_mask

    positions = positions_from_mask(mask)
    params = inspect.signature(arch.model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(run, vocab):
        store, hooks = _record(arch, layers)
        try:
            with only_layers(arch.layers, run), head_rows(arch.model.get_output_embeddings(), vocab):
                out = arch.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{cache_kw: DynamicCache()}, **extra)
        finally:
            for h in hooks:
                h.remove()
        return store, out

    try:
        store, out = forward(layers, HEAD_ROWS)
    except Exception:  # noqa: BLE001 - a family whose stack needs every layer's own output (or logits)
        store, out = forward(range(arch.num_layers), None)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    return store, cache, out.logits, positions


def _context(arch: ArchAdapter, cache, mask, positions):
    from .path import StreamContext

    family = arch.config.model_type
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != arch.num_layers:
        raise refusal(family, "its cache does not hold one layer of keys/values per decoder layer")
    # None for the layers passed through
    keys = [getattr(layer, "keys", None) for layer in layers]
    values = [getattr(layer, "values", None) for layer in layers]
    query_index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return StreamContext(keys, values, query_index, positions, mask, keys[0].dtype)


def _compare(arch: ArchAdapter, piece: str, i, got, ref, keep) -> float:
    ref = ref.float()[keep]
    err = float((got.float()[keep] - ref).abs().max())
    tol = TOLERANCE.get(arch.model.dtype, 1e-4)  # the model's dtype, not the float32 comparison's
    # relative to the reference's own scale (tiny random models have outputs of 1e-2)
    limit = tol * max(float(ref.abs().max()), 1e-6)
    if not err <= limit:  # (NaN fails too)
        where = f" at layer {i}" if i is not None else ""
        raise refusal(arch.config.model_type, f"{piece} does not match the rebuilt layer{where}: max error "
                                              f"{err:.1e} (tolerance {limit:.1e})")
    return err / max(float(ref.abs().max()), 1e-6)


def _check(arch: ArchAdapter, batch: int, length: int, pad: int) -> float:
    from .config import L2DConfig
    from .path import DeltaSwitch, DiffusionBlock

    ids, mask = _inputs(arch, batch, length, pad)
    layers = checked_layers(arch.layers, arch.config)
    store, cache, logits, positions = _run(arch, ids, mask, layers)
    ctx = _context(arch, cache, mask, positions)
    keep = mask.bool()
    # the smallest path: rank-1 deltas (zero at init), tiny conditioning; only the frozen parts matter
    config = L2DConfig(latent_dim=8, cond_dim=8, time_features=8, rank=1, alpha=1.0)
    shape = (*ids.shape, arch.hidden_size)
    zeros, ones = torch.zeros(shape, device=ids.device), torch.ones(shape, device=ids.device)
    neutral = (zeros, zeros, ones) * 2
    errors = []
    for i in layers:
        block = DiffusionBlock(arch, i, config, DeltaSwitch()).to(ids.device)
        try:
            layer_in, layer_out = store["layer", i]
            got = block(arch, layer_in.float(), None, ctx, modulation=neutral)
            try:
                errors.append(_compare(arch, "layer output (norms and residuals)", i, got, layer_out, keep))
            except ArchRefused:
                _diagnose(arch, block, i, store, ctx, keep)  # name the piece when it is one
                raise
        finally:
            block.remove_hooks()
    rows = logits.shape[1]  # the last position only, when the forward kept only its logits
    with head_rows(arch.model.get_output_embeddings(), logits.shape[-1]) as head:
        rebuilt = arch.logits_postprocess(head(arch.final_norm(store["h"][:, -rows:])).float())
    errors.append(_compare(arch, "logits (final norm and head)", None, rebuilt, logits, keep[:, -rows:]))
    return max(errors)


def _diagnose(arch: ArchAdapter, block, i: int, store, ctx, keep) -> None:
    """Raise for the attention or the MLP of layer ``i`` if either alone does not match."""
    attn_in, attn_out = store["attention", i]
    _compare(arch, "attention output", i, block.attention(arch, attn_in, ctx), attn_out, keep)
    mlp_in, mlp_out = store["MLP", i]
    _compare(arch, "MLP output", i, block.mlp_deltas(arch.mlp(i), mlp_in.to(ctx.dtype)), mlp_out, keep)
