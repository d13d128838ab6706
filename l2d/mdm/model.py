"""MaskedDiffusionModel: a causal LM adapted into a masked diffusion LM (its weights train).

    input_ids, labels -> corrupt (loss.py) -> the LM's own backbone under a 4-D annealed mask
    (attention.py) -> hidden states at the positions before masked tokens -> the LM's head ->
    CE weighted 1/t -> loss;  generation and infilling (generation.py) unmask over ``steps``.

Unlike :class:`l2d.L2DModel` nothing is frozen: ``finetuning="full"`` trains every weight,
``"lora"`` a peft LoRA plus the [MASK] embedding row. The saved artifact is an ordinary
transformers model folder (or a peft adapter folder) plus ``mdm_config.json``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .. import __version__
from ..arch import head_kwargs
from .attention import additive_mask, allowed_pairs, check_attention_backend, opening_ratio, positions
from .config import MaskedDiffusionConfig
from .loss import corrupt, response_tokens, weighted_cross_entropy
from .mask_token import embedding_rows, resolve_mask_token

PEFT_CONFIG = "adapter_config.json"


@dataclass
class MaskedDiffusionOutput(ModelOutput):
    """``loss`` (with labels; mean per response token, or the sum with ``reduction="sum"``),
    ``logits`` (without labels; ``logits[:, i]`` predicts token ``i + 1``), ``num_tokens`` (the
    normaliser ``N``) and ``masked_tokens`` (how many were masked)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_tokens: int | None = None
    masked_tokens: int | None = None


class MaskedDiffusionModel(nn.Module):
    """A causal LM (or a peft model of one) trained and decoded as a masked diffusion LM."""

    def __init__(self, model: nn.Module, config: MaskedDiffusionConfig):
        super().__init__()
        if config.mask_token_id is None:
            raise ValueError("no mask token: config.mask_token_id is null; build the model with get_mdm_model, "
                             "which picks or adds one.")
        self.model = model
        self.config = config
        # The optimizer step the annealed attention is at; `l2d train` sets it before each step.
        self.training_step: int | None = None
        check_attention_backend(self.causal_lm)

    # --- what users of transformers/peft expect --------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model (inside the peft wrapper when there is one)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def mask_token_id(self) -> int:
        return int(self.config.mask_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.causal_lm.get_input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        return embedding_rows(self.causal_lm)

    @property
    def generation_config(self):
        return self.causal_lm.generation_config

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, **kwargs):
        lm = self.causal_lm
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
        lm.gradient_checkpointing_enable(**kwargs)
        if self.is_lora:
            lm.enable_input_require_grads()

    # --- forward ---------------------------------------------------------------------------------
    def attention(self, attention_mask: torch.Tensor, ratio: float) -> torch.Tensor:
        """The 4-D additive mask at opening ratio ``ratio`` (1: bidirectional)."""
        return additive_mask(allowed_pairs(attention_mask, ratio), self.dtype)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
        """Last hidden states [B, T, H] of the LM's backbone under the (annealed) mask."""
        backbone = self.causal_lm.base_model
        out = backbone(input_ids=input_ids, attention_mask=self.attention(attention_mask, ratio),
                       position_ids=positions(attention_mask), use_cache=False)
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's output head plus its logit transforms (granite's scaling, soft-capping)."""
        logits = self.causal_lm.get_output_embeddings()(hidden)
        kw = head_kwargs(self.causal_lm.config)
        if kw["logit_scale"] is not None:
            logits = logits * kw["logit_scale"]
        if kw["softcap"] is not None:
            logits = kw["softcap"] * torch.tanh(logits / kw["softcap"])
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, reduction: str = "mean", step: int | None = None,
                t: torch.Tensor | None = None, masked: torch.Tensor | None = None) -> MaskedDiffusionOutput:
        """With ``labels`` (-100 on prompt and padding): the masked-diffusion loss of a random
        corruption of the response (``t`` per row and ``masked`` [B, T] may be given instead of drawn).
        Without: the logits of ``input_ids`` as they are (put [MASK] where tokens are unknown).

        In training mode the attention is annealed at ``step`` (default ``self.training_step``);
        in eval mode it is bidirectional.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.numel() and int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is outside the vocabulary ({self.vocab_size} rows)")
        ratio = opening_ratio(step if step is not None else self.training_step, self.config) if self.training else 1.0
        if labels is None:
            return MaskedDiffusionOutput(logits=self.head(self.hidden_states(input_ids, attention_mask, ratio)))
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
        x_t, masked, t = corrupt(input_ids, labels, self.mask_token_id, self.config.eps, t=t, masked=masked)
        hidden = self.hidden_states(x_t, attention_mask, ratio)
        predicted = masked[:, 1:]                                    # token i masked -> row i - 1 predicts it
        rows = hidden[:, :-1][predicted]
        weights = (1.0 / t)[:, None].expand_as(predicted)[predicted]
        loss = weighted_cross_entropy(self.head(rows), input_ids[:, 1:][predicted], weights)
        n = response_tokens(labels)
        if reduction == "mean":
            loss = loss / max(n, 1)
        return MaskedDiffusionOutput(loss=loss, num_tokens=n, masked_tokens=int(predicted.sum()))

    # --- generation --------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Append ``max_new_tokens`` [MASK] positions and unmask them in ``steps`` steps.
        See :func:`l2d.mdm.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def infill(self, inputs, attention_mask=None, **kwargs):
        """Fill every [MASK] of ``inputs`` (ids, or text with ``tokenizer=``) in ``steps`` steps.
        See :func:`l2d.mdm.generation.infill`."""
        from .generation import infill

        return infill(self, inputs, attention_mask, **kwargs)

    # --- save / load -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, state_dict: dict | None = None, tokenizer=None, **kw) -> None:
        """An ordinary transformers folder (full) or a peft adapter folder (lora), plus ``mdm_config.json``
        (and the tokenizer, when given: it holds an added [MASK] token)."""
        os.makedirs(save_directory, exist_ok=True)
        if state_dict is not None:
            kw["state_dict"] = state_dict
        self.model.save_pretrained(save_directory, **kw)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        lm = self.causal_lm
        extra = {"l2d_version": __version__, "method": "mdm", "vocab_size": self.vocab_size,
                 "model_type": lm.config.model_type, "finetuning": "lora" if self.is_lora else "full"}
        self.config.save(save_directory, extra)

    @classmethod
    def from_pretrained(cls, path: str, base_model: nn.Module | None = None, is_trainable: bool = False,
                        **load_kwargs) -> "MaskedDiffusionModel":
        """Load a folder written by :meth:`save_pretrained`. A LoRA adapter goes onto ``base_model``
        (default: the base named in its config, through :func:`l2d.pretrained.load_base`); a full
        model loads by itself (``load_kwargs`` go to ``from_pretrained``: dtype, attn_implementation)."""
        config, extra = MaskedDiffusionConfig.load(path)
        if os.path.isfile(os.path.join(path, PEFT_CONFIG)):
            from peft import PeftModel

            if base_model is None:
                if not config.base_model_name_or_path:
                    raise ValueError(f"{path} is a LoRA adapter and names no base: pass base_model.")
                from ..pretrained import load_base

                base_model, _ = load_base(config.base_model_name_or_path, **load_kwargs)
            rows = extra.get("vocab_size")
            if rows and embedding_rows(base_model) != rows:
                base_model.resize_token_embeddings(rows)
                base_model.config.vocab_size = rows
            model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
        else:
            if base_model is not None:
                raise ValueError(f"{path} holds a whole model (full fine-tuning); load it without base_model.")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
            model.requires_grad_(is_trainable)
        out = cls(model, config)
        return out.train(is_trainable)


def get_mdm_model(base_model: nn.Module, config: MaskedDiffusionConfig | None = None,
                  tokenizer=None) -> MaskedDiffusionModel:
    """Turn ``base_model`` into a trainable masked diffusion LM (the peft ``get_peft_model`` analogue).

    Picks the [MASK] token (``config.mask_token_id``, the tokenizer's, or a new one added to
    ``tokenizer`` and the embedding table) and makes the weights trainable: all of them, or a peft
    LoRA plus the [MASK] embedding row (``finetuning="lora"``). ``base_model`` is changed in place.
    """
    config = copy.deepcopy(config or MaskedDiffusionConfig())
    check_attention_backend(base_model)
    config.mask_token_id = resolve_mask_token(base_model, config, tokenizer)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(base_model.config, "_name_or_path", None) or None
    if config.finetuning == "full":
        base_model.requires_grad_(True)
        model = base_model
    else:
        from peft import LoraConfig, get_peft_model

        base_model.requires_grad_(False)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_target_modules, task_type="CAUSAL_LM",
                          trainable_token_indices=[config.mask_token_id])
        model = get_peft_model(base_model, lora)
    return MaskedDiffusionModel(model, config).train()


def load_for_eval(path: str, base: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a folder written by ``l2d train`` with ``method: mdm``: the tokenizer
    saved beside it (it may hold an added [MASK]), else the base's."""
    from ..pretrained import load_base

    config, _ = MaskedDiffusionConfig.load(path)
    base_name = base or config.base_model_name_or_path
    base_model = tok = None
    if os.path.isfile(os.path.join(path, PEFT_CONFIG)) or not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        if not base_name:
            raise ValueError(f"{path} names no base model: pass --base.")
        base_model, tok = load_base(base_name, dtype=dtype)
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if os.path.isfile(os.path.join(path, PEFT_CONFIG)):
        return MaskedDiffusionModel.from_pretrained(path, base_model=base_model), tok
    return MaskedDiffusionModel.from_pretrained(path, dtype=dtype), tok
