"""Where each model family keeps what the diffusion path reuses.

The path never forks a modeling file: it calls each decoder layer's own submodules (norms,
q/o projections, MLP, the model's rotary module) and reads post-rotary keys/values from the
main path's cache. What differs between families lives in one small ``ArchSpec`` each.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache


class _LastKeysCached(Exception):
    """Raised by :class:`KVOnlyCache` to end a forward whose output is only its keys/values."""


class KVOnlyCache(DynamicCache):
    """A ``DynamicCache`` for passes read only through their keys/values: storing the last decoder
    layer's keys/values ends the forward (:meth:`ArchAdapter.run_backbone` catches the signal),
    since nothing reads what that layer computes after them."""

    def __init__(self, num_layers: int, **kwargs):
        super().__init__(**kwargs)
        self._last_layer = num_layers - 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == self._last_layer:
            raise _LastKeysCached
        return out


def _logit_multiplier(config) -> float:
    """What logits are multiplied by after ``lm_head``: ``1 / logits_scaling`` (granite) times
    ``logit_scale`` (cohere); 1 for most families."""
    scale = 1.0
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling not in (0, 1):
        scale /= scaling
    multiplier = getattr(config, "logit_scale", None)
    if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool):
        scale *= multiplier
    return float(scale)


def head_kwargs(config) -> dict:
    """A config's transforms after ``lm_head`` (granite's scaling, cohere's logit scale, gemma2's
    soft-capping) as arguments of ``l2d_kernels.linear_cross_entropy``: ``logit_scale`` and ``softcap``."""
    scale = _logit_multiplier(config)
    cap = getattr(config, "final_logit_softcapping", None)
    return {
        "logit_scale": None if scale == 1.0 else scale,
        "softcap": cap or None,
    }


# The up-projection name of an MLP whose gate projection also holds the up projection: its output is
# [gate, up] along the last dimension (phi3's gate_up_proj).
FUSED_GATE_UP = "<fused with gate>"


# Each ``q_layout``: the default name of the module whose output holds the queries, and how that
# output groups them (viewed as [..., groups, slots, head_dim], each group's first slots are queries).
Q_LAYOUTS = {
    "separate": ("q_proj", "one"),             # [q]
    "phi3": ("qkv_proj", "one"),               # rows [q | k | v]
    "gpt2": ("c_attn", "one"),                 # Conv1D columns [q | k | v]
    "neox": ("query_key_value", "head"),       # [q_h | k_h | v_h] for each head h
    "grouped": (None, "kv_group"),             # [q_g.. | k_g | v_g] for each key/value group g
}


def _q_layout(layout: str) -> tuple[str | None, str]:
    if layout not in Q_LAYOUTS:
        raise ValueError(f"unknown q_layout {layout!r}")
    return Q_LAYOUTS[layout]


@dataclass(frozen=True)
class ArchSpec:
    """One family's layout. Attribute names are relative to the decoder layer unless noted.

    ``q_layout`` says how to take the query projection out of the attention module:
    ``separate`` (``q_proj``), ``phi3`` (first rows of a fused ``[q | k | v]`` projection,
    ``q_module``), ``gpt2`` (first columns of the ``c_attn`` Conv1D), ``neox`` (per-head
    interleaved ``[q_h | k_h | v_h]``), ``grouped`` (per key/value group ``[q_g.. | k_g | v_g]``,
    falcon's new architecture).
    ``q_norm``: ``head`` (per-head norm after the reshape, qwen3/gemma3), ``full`` (on the whole
    projection, olmo2) or ``None``. ``parallel``: attention and MLP read the same residual
    (gpt_neox when ``config.use_parallel_residual``). ``q_clip``: queries clamped to
    ``[-q_clip, q_clip]`` after the projection and a full q norm (olmo's ``clip_qkv``).
    ``nope_layers``: layers without rotary positions (cohere2's global layers). ``derived``: found by
    ``l2d/arch_derive.py`` and accepted by the wrap-time check (``l2d/arch_check.py``).
    """

    layers: str                      # from the backbone (``model.base_model``)
    final_norm: str                  # from the backbone
    attn: str = "self_attn"
    q_layout: str = "separate"
    o_proj: str = "o_proj"
    q_norm: str | None = None
    attn_norm: str | None = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    mlp: str = "mlp"
    norm_kind: str = "rms"           # rms | rms_offset (Gemma's 1 + w) | layer | layer_offset (1 + w)
    parallel: bool = False
    rotary: bool = True
    # the MLP's (gate or fc, up or None, down, activation) attributes, when its forward is
    # down(act(gate(x)) * up(x)) or down(act(fc(x))): the stream then runs it through
    # l2d/stream_mlp.py, which keeps less for backward; None: the module is called as it is.
    # FUSED_GATE_UP as the up name: one projection gives [gate, up] (phi3's gate_up_proj).
    mlp_parts: tuple | None = ("gate_proj", "up_proj", "down_proj", "act_fn")
    q_module: str | None = None      # the fused projection's name (phi3/neox/grouped); default by layout
    q_clip: float | None = None
    nope_layers: tuple = ()
    kv_heads: int | None = None      # key/value heads when the config does not say (gpt_bigcode)
    head_dim: int | None = None      # when the config does not say
    derived: bool = False


_LLAMA = ArchSpec(layers="layers", final_norm="norm")
_GEMMA = ArchSpec(layers="layers", final_norm="norm", norm_kind="rms_offset",
                  post_attn_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                  post_mlp_norm="post_feedforward_layernorm")

SPECS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "granite": _LLAMA,
    "qwen3": ArchSpec(layers="layers", final_norm="norm", q_norm="head"),
    "gemma2": _GEMMA,
    "gemma3_text": ArchSpec(**{**_GEMMA.__dict__, "q_norm": "head"}),
    "phi3": ArchSpec(layers="layers", final_norm="norm", q_layout="phi3",
                     mlp_parts=("gate_up_proj", FUSED_GATE_UP, "down_proj", "activation_fn")),
    "olmo2": ArchSpec(layers="layers", final_norm="norm", q_norm="full", attn_norm=None, mlp_norm=None,
                      post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm"),
    "gpt2": ArchSpec(layers="h", final_norm="ln_f", attn="attn", q_layout="gpt2", o_proj="c_proj",
                     attn_norm="ln_1", mlp_norm="ln_2", norm_kind="layer", rotary=False,
                     mlp_parts=("c_fc", None, "c_proj", "act")),
    "gpt_neox": ArchSpec(layers="layers", final_norm="final_layer_norm", attn="attention", q_layout="neox",
                         o_proj="dense", norm_kind="layer", parallel=True,
                         mlp_parts=("dense_h_to_4h", None, "dense_4h_to_h", "act")),
}


class ArchRefused(NotImplementedError):
    """A base the diffusion path cannot reproduce: raised at wrap time, before any training."""


def supported_families() -> list[str]:
    """Families with a hand-written spec plus those whose derived spec the test suite checks."""
    from .arch_derive import DERIVED_FAMILIES

    return sorted(set(SPECS) | set(DERIVED_FAMILIES))


def refusal(family, piece: str) -> ArchRefused:
    """The error for a base the path cannot reproduce: the family, what failed, what works."""
    return ArchRefused(f"l2d cannot wrap model_type {family!r}: {piece}. Supported families: "
                       f"{', '.join(supported_families())}. Other decoder-only families are derived from "
                       "the model and accepted when the rebuilt layers match the real ones.")


def get_spec(config) -> ArchSpec:
    """The hand-written spec of ``config.model_type``, or a clear error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS:
        raise refusal(model_type, "no hand-written ArchSpec in l2d/arch.py")
    spec = SPECS[model_type]
    if model_type == "gpt_neox" and not getattr(config, "use_parallel_residual", True):
        spec = ArchSpec(**{**spec.__dict__, "parallel": False})
    _refuse_alibi(config)
    return spec


def _refuse_alibi(config, model: nn.Module | None = None):
    """ALiBi biases scores by distance inside attention: the cache holds no positions to reuse.
    Found by the config (falcon, mpt) or a backbone that builds the bias (bloom)."""
    builds_alibi = model is not None and any("alibi" in name for name in dir(type(model.base_model)))
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", "") == "alibi" or builds_alibi:
        raise refusal(getattr(config, "model_type", None),
                      "ALiBi attention is not supported by the diffusion path (no cached rotary positions)")


def resolve_spec(model: nn.Module) -> ArchSpec:
    """The hand-written spec (the fast path) or one derived from the model itself
    (``l2d/arch_derive.py``); a derived spec is checked by :class:`ArchAdapter` before use."""
    if getattr(model.config, "model_type", None) in SPECS:
        return get_spec(model.config)
    _refuse_alibi(model.config, model)
    from .arch_derive import derive_spec

    return derive_spec(model)


class ArchAdapter:
    """Resolves a spec against one loaded model: layer modules, norms, rotary, scales."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None, verify: bool | None = None):
        """``spec``: None resolves it (:func:`resolve_spec`). ``verify``: run the wrap-time check
        (``l2d/arch_check.py``); None checks derived specs only, once per model."""
        self.model = model
        self.config = model.config
        self.spec = resolve_spec(model) if spec is None else spec
        self.backbone = model.base_model
        self.layers = _getattr_path(self.backbone, self.spec.layers)
        self.final_norm = _getattr_path(self.backbone, self.spec.final_norm)
        self.rotary_emb = getattr(self.backbone, "rotary_emb", None) if self.spec.rotary else None
        if self.spec.rotary and self.rotary_emb is None:
            raise NotImplementedError(f"{self.config.model_type}: no rotary_emb module on the backbone.")
        self._rotary_takes_type = (self.rotary_emb is not None
                                   and "layer_type" in inspect.signature(self.rotary_emb.forward).parameters)
        self.num_layers = len(self.layers)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters \
            else "past_key_values"
        self.hidden_size = self.config.hidden_size
        self.residual_multiplier = float(getattr(self.config, "residual_multiplier", 1.0) or 1.0)
        if verify or (verify is None and self.spec.derived):
            from .arch_check import verify_once

            verify_once(self)

    # --- per layer -------------------------------------------------------------------------
    def attn(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.spec.attn)

    def norm(self, i: int, which: str):
        name = getattr(self.spec, which)
        return None if name is None else getattr(self.layers[i], name)

    @property
    def head_dims(self) -> tuple[int, int]:
        """(number of query heads, head_dim), the same in every layer."""
        cfg = self.config
        n_heads = cfg.num_attention_heads
        head_dim = self.spec.head_dim or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        return n_heads, head_dim

    @property
    def kv_dims(self) -> tuple[int, int]:
        """(number of key/value heads, head_dim), the same in every layer."""
        n_heads, head_dim = self.head_dims
        return self.spec.kv_heads or getattr(self.config, "num_key_value_heads", None) or n_heads, head_dim

    def q_in_out(self, i: int) -> tuple[int, int]:
        n_heads, head_dim = self.head_dims
        return self.hidden_size, n_heads * head_dim

    def o_module(self, i: int) -> nn.Module:
        return getattr(self.attn(i), self.spec.o_proj)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.spec.mlp)

    def query_groups(self) -> tuple[int, int]:
        """Where the queries sit in ``q_module``'s output: viewed as [..., groups, slots, head_dim],
        they are the first slots of each group. Returns (groups, query heads per group)."""
        n_heads = self.head_dims[0]
        groups = {"one": 1, "head": n_heads, "kv_group": self.kv_dims[0]}[_q_layout(self.spec.q_layout)[1]]
        return groups, n_heads // groups

    def query_weight(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``i``'s frozen query weight [heads * head_dim, in] and bias: views into
        ``q_module(i)``'s parameters (a Conv1D's weight is stored [in, out], so read transposed)."""
        module = self.q_module(i)
        w, b = module.weight, module.bias
        if self.spec.q_layout == "gpt2":
            w = w.T
        groups, per = self.query_groups()
        head_dim = self.head_dims[1]
        wq = w.view(groups, -1, head_dim, w.shape[-1])[:, :per].reshape(groups * per * head_dim, -1)
        bq = None if b is None else b.view(groups, -1, head_dim)[:, :per].reshape(groups * per * head_dim)
        return wq, bq

    def query_projection(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The frozen query projection of ``x`` ([..., H] -> [..., heads * head_dim])."""
        if self.spec.q_layout == "separate":
            return self.q_module(i)(x)
        wq, bq = self.query_weight(i)
        if self.spec.q_layout == "gpt2":  # as Conv1D computes it: b + x @ W
            return torch.addmm(bq, x.reshape(-1, x.shape[-1]), wq.T).view(*x.shape[:-1], wq.shape[0])
        return F.linear(x, wq, bq)

    def q_module(self, i: int) -> nn.Module:
        """The module whose output holds layer ``i``'s queries (fused with k/v in some families)."""
        return getattr(self.attn(i), self.spec.q_module or _q_layout(self.spec.q_layout)[0])

    def add_to_queries(self, i: int, out: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
        """``q_module(i)``'s output with ``dq`` [..., heads * head_dim] added to its query part only."""
        if self.spec.q_layout == "separate":
            return out + dq
        groups, per = self.query_groups()
        head_dim = self.head_dims[1]
        slots = out.view(*out.shape[:-1], groups, -1, head_dim)
        dq = dq.view(*dq.shape[:-1], groups, per, head_dim)
        return torch.cat([slots[..., :per, :] + dq, slots[..., per:, :]], dim=-2).view(out.shape)

    def shape_queries(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """[B, Tq, heads * hd] -> [B, heads, Tq, hd], with the family's query norm."""
        attn = self.attn(i)
        n_heads, head_dim = self.head_dims
        if self.spec.q_norm == "full":
            q = attn.q_norm(q)
        if self.spec.q_clip is not None:
            q = q.clamp(-self.spec.q_clip, self.spec.q_clip)
        q = q.view(*q.shape[:-1], n_heads, head_dim)
        if self.spec.q_norm == "head":
            q = attn.q_norm(q)
        return q.transpose(1, 2)

    def rotary(self, i: int, x: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) for layer ``i`` at ``position_ids``, or None for learned positions."""
        if self.rotary_emb is None or i in self.spec.nope_layers:
            return None
        if self._rotary_takes_type:
            return self.rotary_emb(x, position_ids, self.config.layer_types[i])
        return self.rotary_emb(x, position_ids)

    def apply_rotary(self, i: int, q: torch.Tensor, cos_sin) -> torch.Tensor:
        """Rotate queries with the family's own function (handles partial rotary)."""
        if cos_sin is None:
            return q
        fn = sys.modules[type(self.attn(i)).__module__].apply_rotary_pos_emb
        cos, sin = cos_sin
        return fn(q, q, cos, sin)[0]

    def rotary_key(self, i: int):
        """Layers with equal keys share rotary tables (gemma3 has two, by layer type; NoPE layers none)."""
        if i in self.spec.nope_layers:
            return "nope"
        return self.config.layer_types[i] if self._rotary_takes_type else None

    def attn_scale(self, i: int) -> float:
        attn = self.attn(i)
        scale = getattr(attn, "scaling", None)
        if scale is None:
            scale = self.head_dims[1] ** -0.5
        return float(scale)

    def attn_softcap(self, i: int):
        return getattr(self.attn(i), "attn_logit_softcapping", None)

    def sliding_window(self, i: int):
        """Keys ``(q - window, q]`` for sliding layers; None for full attention."""
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[i] == "sliding_attention" else None
        if getattr(cfg, "use_sliding_window", True) is False:
            return None
        return window

    # --- whole model -----------------------------------------------------------------------
    def run_backbone(self, input_ids, attention_mask, position_ids, cache=None, kv_only: bool = False):
        """The decoder stack on ``input_ids``, appending to ``cache`` (a fresh ``DynamicCache``
        without a config by default); returns that cache. The keyword is ``cache`` from
        transformers 5.24 on (``past_key_values``, deprecated there, before), and so is the
        output field.

        ``kv_only``: only the keys/values are wanted (the adapted context pass), so the forward
        stops once the last layer has cached them (a :class:`KVOnlyCache`, also when appending to
        one): that layer's attention output and MLP and the final norm are never computed."""
        if cache is None:
            cache = KVOnlyCache(self.num_layers) if kv_only else DynamicCache()
        try:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, **{self._cache_kwarg: cache})
        except _LastKeysCached:
            return cache
        cache = out.get("cache", None)
        return out.get("past_key_values") if cache is None else cache

    def logits_postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """Family-specific transforms after ``lm_head`` (granite scaling, cohere's logit scale,
        gemma2 soft-capping)."""
        scale = _logit_multiplier(self.config)
        if scale != 1.0:
            logits = logits * scale
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def head_kwargs(self) -> dict:
        """The same transforms as arguments of ``l2d_kernels.linear_cross_entropy``."""
        return head_kwargs(self.config)

    def fingerprint(self) -> dict:
        """What an adapter must match to fit this base."""
        emb = self.model.get_input_embeddings()
        return {
            "model_type": self.config.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "vocab_size": int(emb.weight.shape[0]),
        }


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(p, "ds_shape", p.shape)


def base_fingerprint(base) -> dict:
    """What a training checkpoint must match to resume: any base (the baselines' too, and under
    DeepSpeed ZeRO-3), counted by parameters. An adapter's fit is :meth:`ArchAdapter.fingerprint`."""
    vocab, hidden = full_shape(base.get_input_embeddings().weight)
    return {"model_type": base.config.model_type, "vocab_size": int(vocab), "hidden_size": int(hidden),
            "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())}


def norm_params(norm: nn.Module | None, kind: str):
    """(weight, bias, eps, kind) of a frozen norm module, for ``l2d_kernels.modulated_norm``."""
    if norm is None:
        return None, None, 0.0, "none"
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:  # a norm that keeps no eps (olmo's) uses the default of its kind
        eps = getattr(norm, "eps", 1e-5 if kind.startswith("layer") else 1e-6)
    weight = getattr(norm, "weight", None)  # None: a norm without a gain (olmo)
    if kind == "layer_offset":  # LayerNorm with a (1 + w) gain (nemotron): an ordinary one of gain 1 + w
        return weight + 1, getattr(norm, "bias", None), float(eps), "layer"
    return weight, getattr(norm, "bias", None), float(eps), kind


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
