"""Derive a family's :class:`~l2d.arch.ArchSpec` from the model itself.

For a base without a hand-written spec, one traced forward of the frozen model on a few tokens
tells where everything sits:

- the decoder layers: the ``ModuleList`` of ``num_hidden_layers`` modules under the backbone;
- the attention module and its query projection (``q_proj``, a fused ``[q | k | v]``
  projection, a Conv1D ``c_attn``), its output projection, q norms (per head or on the whole
  projection) and the keys/values it caches (heads and head size from the cache itself);
- the norms, by data flow in layer 0: a norm whose output the attention reads is the attention
  norm, one whose output the MLP reads the MLP norm, one that reads the attention's (MLP's)
  output a post norm (sandwich); the MLP reading the layer's input rather than ``input +
  attention`` makes the block parallel (GPT-J/NeoX, falcon, cohere);
- each norm's kind, by probing it: ``n(x) w``, ``n(x) (1 + w)`` for RMS and layer norms;
- positions: layers that call the family's ``apply_rotary_pos_emb`` during the trace have rotary
  positions, the others none (NoPE); no rotary module at all: learned or no positions. The trace
  runs the layers the wrap-time check rebuilds (the first, the last and one of each kind, see
  ``l2d.arch_check.checked_layers``) and passes the others through: a layer not run has its
  kind's positions;
- the MLP's parts, by probing candidates (gated, fused gate_up, plain) against the module; none
  matching (mixture-of-experts) leaves it a module with a parallel delta on its input/output.

Where a fused projection's layout is ambiguous, each candidate is tried by the wrap-time check
(``l2d/arch_check.py``), which accepts a spec only if the rebuilt layers match the real ones.
"""
from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .arch import FUSED_GATE_UP, ArchRefused, ArchSpec, refusal

# Families whose derived spec the test suite checks (tests/test_arch_derive.py): the names the
# refusal message lists beside the hand-written ones.
DERIVED_FAMILIES = ("arcee", "cohere", "cohere2", "falcon", "gemma", "glm", "gpt_bigcode", "helium",
                    "nemotron", "olmo", "olmoe", "qwen2_moe", "qwen3_moe", "smollm3", "starcoder2")

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
O_NAMES = ("o_proj", "dense", "c_proj", "out_proj", "wo")
FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "c_attn", "W_pack", "Wqkv")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
MLP_CANDIDATES = (
    ("gate_proj", "up_proj", "down_proj", "act_fn"),
    ("gate_up_proj", FUSED_GATE_UP, "down_proj", "activation_fn"),
    ("gate_up_proj", FUSED_GATE_UP, "down_proj", "act_fn"),
    ("w1", "w3", "w2", "act_fn"),
    ("up_proj", None, "down_proj", "act_fn"),
    ("c_fc", None, "c_proj", "act"),
    ("dense_h_to_4h", None, "dense_4h_to_h", "act"),
    ("fc1", None, "fc2", "activation_fn"),
    ("fc_in", None, "fc_out", "act"),
)


def derive_spec(model: nn.Module) -> ArchSpec:
    """The first derived candidate spec that passes the wrap-time check; else the first refusal."""
    from .arch import ArchAdapter
    from .arch_check import verify_once

    errors = []
    for spec in derive_candidates(model):
        try:
            verify_once(ArchAdapter(model, spec, verify=False))
            return spec
        except ArchRefused as e:
            errors.append(e)
        except Exception as e:  # noqa: BLE001 - a rebuild that cannot even run is a refusal too
            errors.append(refusal(getattr(model.config, "model_type", None), f"the rebuilt layer failed to run "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:120]})"))
    raise errors[0]


def derive_candidates(model: nn.Module) -> list[ArchSpec]:
    """Every spec the module tree and one traced forward allow (usually one)."""
    config = model.config
    family = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise refusal(family, "encoder-decoder models have no single causal decoder stack")
    backbone = model.base_model
    layers_name, layers = _find_layers(backbone, config, family)
    attn_name = _child_name(layers[0], ATTN_NAMES, "Attention")
    mlp_name = _child_name(layers[0], MLP_NAMES, ("MLP", "Moe", "MoE", "FeedForward", "Experts"))
    if attn_name is None:
        raise refusal(family, "decoder layer 0 has no attention module (recurrent or hybrid family?)")
    if mlp_name is None:
        raise refusal(family, "decoder layer 0 has no MLP module")
    trace = _trace(model, layers, attn_name, mlp_name, family)
    attn = getattr(layers[0], attn_name)
    kv_heads, head_dim = trace["kv_shape"]
    common = dict(
        layers=layers_name, final_norm=_final_norm(backbone, layers_name, family), attn=attn_name,
        o_proj=_child_name(attn, O_NAMES, ()), mlp=mlp_name,
        q_norm=_q_norm(attn, head_dim), q_clip=getattr(config, "clip_qkv", None),
        kv_heads=kv_heads, head_dim=head_dim, derived=True,
        mlp_parts=_mlp_parts(getattr(layers[0], mlp_name), config.hidden_size, trace["dtype"]),
        **_norms(trace, layers[0], family), **_positions(backbone, trace, len(layers), family))
    if common["o_proj"] is None:
        raise refusal(family, f"attention module {type(attn).__name__} has no output projection named "
                              f"one of {', '.join(O_NAMES)}")
    return [ArchSpec(**common, **q) for q in _q_layouts(attn, config, kv_heads, family)]


# --- the module tree -----------------------------------------------------------------------
def _find_layers(backbone: nn.Module, config, family):
    """(path, ModuleList) of the decoder layers: ``num_hidden_layers`` modules under the backbone."""
    n = getattr(config, "num_hidden_layers", None)
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name:
            return name, module
    raise refusal(family, f"no list of {n} decoder layers under {type(backbone).__name__}")


def _child_name(module: nn.Module, names: tuple, class_hints) -> str | None:
    """The child called one of ``names``, else the first whose class name holds a hint."""
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return name
    hints = (class_hints,) if isinstance(class_hints, str) else class_hints
    for name, child in module.named_children():
        if any(h in type(child).__name__ for h in hints):
            return name
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _final_norm(backbone: nn.Module, layers_name: str, family) -> str:
    for name in FINAL_NORM_NAMES:
        if _is_norm(getattr(backbone, name, None) or nn.Identity()):
            return name
    for name, child in backbone.named_children():
        if name != layers_name and _is_norm(child):
            return name
    raise refusal(family, "no final norm found on the backbone")


def _q_norm(attn: nn.Module, head_dim: int) -> str | None:
    norm = getattr(attn, "q_norm", None)
    if norm is None:
        return None
    weight = getattr(norm, "weight", None)
    return "head" if weight is not None and weight.numel() == head_dim else "full"


def _q_layouts(attn: nn.Module, config, kv_heads: int, family) -> list[dict]:
    """Candidate ``(q_layout, q_module)`` pairs; fused layouts are told apart by the check."""
    if isinstance(getattr(attn, "q_proj", None), nn.Module):
        return [dict(q_layout="separate")]
    name = next((n for n in FUSED_QKV_NAMES if isinstance(getattr(attn, n, None), nn.Module)), None)
    if name is None:
        raise refusal(family, f"attention module {type(attn).__name__} has no query projection (q_proj or a "
                              f"fused one named {', '.join(FUSED_QKV_NAMES)})")
    if type(getattr(attn, name)).__name__ == "Conv1D":
        return [dict(q_layout="gpt2", q_module=name)]
    n_heads = config.num_attention_heads
    layouts = ["phi3"]
    if kv_heads == n_heads:
        layouts.append("neox")
    if kv_heads < n_heads and n_heads % kv_heads == 0:
        layouts.append("grouped")
    return [dict(q_layout=layout, q_module=name) for layout in layouts]


# --- one traced forward --------------------------------------------------------------------
def _first_tensor(args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states")
    return x[0] if isinstance(x, tuple) else x


def _trace(model, layers, attn_name: str, mlp_name: str, family) -> dict:
    """Inputs/outputs of layer 0's children in call order, which layers apply rotary positions,
    and the cached keys' shape."""
    from .arch_check import checked_layers, layer_kinds, only_layers

    backbone = model.base_model
    kinds = layer_kinds(layers, model.config)  # before any hook of the trace
    run = checked_layers(layers, model.config)
    calls, seen, hooks = [], {}, []
    rope_layers, current = set(), [None]

    def keep(name):
        def hook(module, args, kwargs, out):
            out = out[0] if isinstance(out, tuple) else out
            calls.append((name, _first_tensor(args, kwargs).detach().clone(), out.detach().clone()))
        return hook

    layer0 = layers[0]
    hooks.append(layer0.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("layer_in", _first_tensor(a, kw).detach().clone()), with_kwargs=True))
    for name, child in layer0.named_children():
        hooks.append(child.register_forward_hook(keep(name), with_kwargs=True))
    for i, layer in enumerate(layers):
        hooks.append(getattr(layer, attn_name).register_forward_pre_hook(
            lambda m, a, i=i: current.__setitem__(0, i)))
    module = sys.modules[type(getattr(layer0, attn_name)).__module__]
    rotate = getattr(module, "apply_rotary_pos_emb", None)
    if rotate is not None:  # count the layers that rotate their queries
        def counting(*a, **kw):
            rope_layers.add(current[0])
            return rotate(*a, **kw)
        module.apply_rotary_pos_emb = counting
    cache_kw = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    emb = model.get_input_embeddings().weight
    ids = torch.arange(3, 10, device=emb.device).remainder(emb.shape[0]).unsqueeze(0)
    was_training = model.training
    model.eval()

    def forward():
        with torch.no_grad():
            return backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                            **{cache_kw: DynamicCache()})

    try:
        try:
            with only_layers(layers, run):
                out = forward()
        except Exception:  # noqa: BLE001 - a stack that needs every layer's own output: run them all
            calls.clear(), rope_layers.clear()
            run = range(len(layers))
            out = forward()
    except Exception as e:  # noqa: BLE001 - any failure here means the family is not standard
        raise refusal(family, f"the traced forward failed ({type(e).__name__}: {e})") from e
    finally:
        for h in hooks:
            h.remove()
        if rotate is not None:
            module.apply_rotary_pos_emb = rotate
        model.train(was_training)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    rope_layers = {i for i in range(len(layers)) if (i if i in run else kinds[i]) in rope_layers}
    return dict(calls=calls, layer_in=seen["layer_in"], attn=attn_name, mlp=mlp_name, rope_layers=rope_layers,
                rotate=rotate, kv_shape=_kv_shape(cache, len(layers), family), dtype=emb.dtype)


def _kv_shape(cache, num_layers: int, family) -> tuple[int, int]:
    """(key/value heads, head size) from the standard cache, or a refusal."""
    cached = getattr(cache, "layers", None)
    keys = getattr(cached[0], "keys", None) if cached else None
    if not isinstance(cache, DynamicCache) or len(cached) != num_layers or not isinstance(keys, torch.Tensor):
        raise refusal(family, "its cache does not hold one layer of keys/values per decoder layer "
                              "(a custom or recurrent cache)")
    return int(keys.shape[1]), int(keys.shape[-1])


def _same(a, b) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def _norms(trace: dict, layer0: nn.Module, family) -> dict:
    """Norm names by data flow in layer 0, ``parallel`` and the modulated norms' kind."""
    io = {name: (inp, out) for name, inp, out in trace["calls"]}
    order = [name for name, _, _ in trace["calls"]]
    (attn_in, attn_out), (mlp_in, mlp_out) = io[trace["attn"]], io[trace["mlp"]]
    found = dict(attn_norm=None, mlp_norm=None, post_attn_norm=None, post_mlp_norm=None)
    for name, (inp, out) in io.items():
        if name in (trace["attn"], trace["mlp"]) or not _is_norm(getattr(layer0, name)):
            continue
        # a norm feeding the attention (MLP) is the last match called before it: equal gains
        # (LayerNorms at init) give equal outputs for one input (gpt_neox's parallel block)
        before = {key: order.index(name) < order.index(trace[key]) for key in ("attn", "mlp")}
        for key, hit in (("attn_norm", before["attn"] and _same(out, attn_in)),
                         ("mlp_norm", before["mlp"] and _same(out, mlp_in)),
                         ("post_attn_norm", _same(inp, attn_out)), ("post_mlp_norm", _same(inp, mlp_out))):
            if hit and (found[key] is None or key in ("attn_norm", "mlp_norm")):
                found[key] = name
    layer_in = trace["layer_in"]
    if found["attn_norm"] is None and not _same(attn_in, layer_in):
        raise refusal(family, "the attention reads neither the layer's input nor a norm of it")
    mlp_norm = found["mlp_norm"]
    parallel = (mlp_norm == found["attn_norm"] or _same(io[mlp_norm][0], layer_in)) if mlp_norm \
        else _same(mlp_in, layer_in)
    kinds = {_norm_kind(getattr(layer0, found[k]), trace["dtype"]) for k in ("attn_norm", "mlp_norm") if found[k]}
    if None in kinds or len(kinds) > 1:
        raise refusal(family, "its layer norms are neither RMSNorm nor LayerNorm with a w or 1 + w gain, "
                              "or they differ within a layer")
    return dict(found, parallel=parallel, norm_kind=kinds.pop() if kinds else "rms")


def _norm_kind(norm: nn.Module, dtype) -> str | None:
    """Which of ``n(x) w``, ``n(x) (1 + w)`` (RMS or layer statistics, plus a bias) ``norm`` computes."""
    weight = getattr(norm, "weight", None)
    hidden = weight.shape[-1] if weight is not None else norm.normalized_shape[-1]
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)).to(
        dtype=dtype, device=weight.device if weight is not None else None)
    with torch.no_grad():
        ref = norm(x).float()
    xf = x.float()
    stats = {"rms": xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6),
             "layer": F.layer_norm(xf, (hidden,), eps=1e-5)}
    bias = getattr(norm, "bias", None)
    for kind in ("rms", "rms_offset", "layer", "layer_offset"):
        n = stats[kind.split("_")[0]]
        gain = 1.0 if weight is None else weight.float() + (1.0 if kind.endswith("offset") else 0.0)
        y = n * gain + (bias.float() if bias is not None and kind.startswith("layer") else 0.0)
        if (y - ref).abs().max() <= 2e-2 * max(1.0, float(ref.abs().max())):
            return kind
    return None


def _positions(backbone: nn.Module, trace: dict, num_layers: int, family) -> dict:
    """``rotary`` and ``nope_layers`` from which layers applied rotary positions in the trace."""
    has_table = isinstance(getattr(backbone, "rotary_emb", None), nn.Module)
    rope = trace["rope_layers"]
    if not has_table:
        if rope:
            raise refusal(family, "rotary positions computed inside the attention module (no rotary_emb on "
                                  "the backbone)")
        return dict(rotary=False)
    if trace["rotate"] is None or not rope:
        raise refusal(family, "rotary positions applied by a function other than its apply_rotary_pos_emb")
    return dict(rotary=True, nope_layers=tuple(i for i in range(num_layers) if i not in rope))


def _mlp_parts(mlp: nn.Module, hidden: int, dtype) -> tuple | None:
    """The first candidate ``(gate or fc, up, down, act)`` whose op-by-op forward is the module's."""
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0))
    for parts in MLP_CANDIDATES:
        gate, up, down, act = (getattr(mlp, n, None) if isinstance(n, str) and n != FUSED_GATE_UP else n
                               for n in parts)
        if not (isinstance(gate, nn.Module) and isinstance(down, nn.Module) and callable(act)):
            continue
        if isinstance(parts[1], str) and parts[1] != FUSED_GATE_UP and not isinstance(up, nn.Module):
            continue
        try:
            with torch.no_grad():
                xx = x.to(dtype=dtype, device=down.weight.device)
                g = gate(xx)
                u = None
                if up == FUSED_GATE_UP:
                    g, u = g.chunk(2, dim=-1)
                elif up is not None:
                    u = up(xx)
                y = down(act(g) * u if u is not None else act(g))
                ref = mlp(xx)
        except Exception:  # noqa: BLE001 - a candidate that does not even run is simply not it
            continue
        if isinstance(ref, torch.Tensor) and ref.shape == y.shape and \
                (y.float() - ref.float()).abs().max() <= 1e-3 * max(1.0, float(ref.float().abs().max())):
            return parts
    return None
