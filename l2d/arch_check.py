"""The wrap-time check: the diffusion path's rebuild of every decoder layer must match the real one.

With neutral modulation (``dw = shift = 0``, gates 1) and zero deltas, a diffusion block fed the
main path's input to layer ``l`` at every position must return the main path's output of layer
``l``: same norms, query projection, rotary, q/k norms, GQA, window, scales, residual shape. The
check runs the frozen model once on two random rows (one left-padded by 2 tokens), keeps each
layer's input/output and its attention's and MLP's, and compares at the unpadded positions

    layer:      block(layer_in)                  vs  the layer's output, every layer
    head:       postprocess(lm_head(norm(h_L)))  vs  the model's logits (last position)

and, for a layer that does not match, which piece does not (to name it in the error):

    attention:  block.attention(attn_in)        vs  the attention module's output
    MLP:        block's MLP (parts or module)    vs  the MLP module's output
 A difference above ``tol(dtype) * max(1, max |reference|)`` refuses
the base, naming the family, the piece and the layer. A derived spec is used only once checked.
"""
from __future__ import annotations

import weakref

import torch
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
    """Raise :class:`~l2d.arch.ArchRefused` unless every rebuilt layer matches the real one;
    returns the largest error relative to its reference's scale."""
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


def _record(arch: ArchAdapter):
    """Hooks keeping every layer's input/output and its attention's and MLP's; returns (store, hooks)."""
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

    for i, layer in enumerate(arch.layers):
        for name, module in (("layer", layer), ("attention", arch.attn(i)), ("MLP", arch.mlp(i))):
            hooks.append(module.register_forward_hook(keep((name, i)), with_kwargs=True))
    hooks.append(arch.final_norm.register_forward_pre_hook(lambda m, a: store.__setitem__("h", a[0].detach())))
    return store, hooks


def _run(arch: ArchAdapter, ids, mask):
    """One forward of the frozen model: the recorded activations, its cache, and the logits of
    the last position only where the family allows (the vocabulary head is most of a short
    forward's work)."""
    import inspect

    from .main_path import positions_from_mask

    store, hooks = _record(arch)
    positions = positions_from_mask(mask)
    params = inspect.signature(arch.model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_kw = "cache" if "cache" in params else "past_key_values"
    try:
        out = arch.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{cache_kw: DynamicCache()}, **extra)
    finally:
        for h in hooks:
            h.remove()
    cache = out.get("cache", None) or out.get("past_key_values", None)
    return store, cache, out.logits, positions


def _context(arch: ArchAdapter, cache, mask, positions):
    from .path import StreamContext

    family = arch.config.model_type
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) != arch.num_layers:
        raise refusal(family, "its cache does not hold one layer of keys/values per decoder layer")
    keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
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
    store, cache, logits, positions = _run(arch, ids, mask)
    ctx = _context(arch, cache, mask, positions)
    keep = mask.bool()
    # the smallest path: rank-1 deltas (zero at init), tiny conditioning; only the frozen parts matter
    config = L2DConfig(latent_dim=8, cond_dim=8, time_features=8, rank=1, alpha=1.0)
    shape = (*ids.shape, arch.hidden_size)
    zeros, ones = torch.zeros(shape, device=ids.device), torch.ones(shape, device=ids.device)
    neutral = (zeros, zeros, ones) * 2
    errors = []
    for i in range(arch.num_layers):
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
    head = arch.model.get_output_embeddings()
    rows = logits.shape[1]  # the last position only, when the forward kept only its logits
    rebuilt = arch.logits_postprocess(head(arch.final_norm(store["h"][:, -rows:])).float())
    errors.append(_compare(arch, "logits (final norm and head)", None, rebuilt, logits, keep[:, -rows:]))
    return max(errors)


def _diagnose(arch: ArchAdapter, block, i: int, store, ctx, keep) -> None:
    """Raise for the attention or the MLP of layer ``i`` if either alone does not match."""
    attn_in, attn_out = store["attention", i]
    _compare(arch, "attention output", i, block.attention(arch, attn_in, ctx), attn_out, keep)
    mlp_in, mlp_out = store["MLP", i]
    _compare(arch, "MLP output", i, block.mlp_deltas(arch.mlp(i), mlp_in.to(ctx.dtype)), mlp_out, keep)
