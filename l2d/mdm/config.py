"""MaskedDiffusionConfig: the settings of a masked-diffusion adaptation (DiffuGPT / DiffuLLaMA)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from ..config import write_json_atomic

CONFIG_NAME = "mdm_config.json"
DEFAULT_MASK_TOKEN = "<|mdm_mask|>"
FINETUNING = ("full", "lora")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class MaskedDiffusionConfig:
    """How a causal LM is turned into a masked (absorbing-state) diffusion LM by continued training.

    Gong et al., "Scaling Diffusion Language Models via Adaptation from Autoregressive Models"
    (ICLR 2025). The model itself is trained (all weights, or LoRA plus the [MASK] embedding row);
    there is no time embedding; the output at position ``i-1`` keeps predicting token ``i``.

    Args:
        mask_token_id: Token id used as [MASK]. ``None``: the tokenizer's mask token when it has one,
            else a new token ``mask_token`` is added (the embedding table grows by a row, the output
            head too; tied embeddings stay tied). Set it to reuse an existing token, as DiffuGPT-small
            (10541) and DiffuLLaMA (811) do.
        mask_token: Text of the token added when there is none (``mask_token_id=None``).
        anneal_steps: Training steps over which attention goes from causal to bidirectional: at step
            ``s`` every future (query, key) pair is opened with probability ``min(1, (s + 1) /
            anneal_steps)``. 0: bidirectional from the first step (the paper's fine-tuning setting;
            its adaptation from a causal LM used 10k). Evaluation and generation are bidirectional.
        eps: Smallest masking rate: ``t ~ U(eps, 1)`` per sequence, so the ``1/t`` weight stays finite.
        finetuning: ``full`` (every weight trains) or ``lora`` (peft LoRA on ``lora_target_modules``
            plus a trainable embedding row for [MASK], as the paper's DiffuLLaMA fine-tuning).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA settings (``finetuning=lora``).
        base_model_name_or_path: The base this was trained from (stamped by ``l2d train``; used by
            ``from_pretrained`` of a LoRA adapter when no base is given).
    """

    mask_token_id: int | None = field(default=None, metadata=_help(
        "Token id used as [MASK]; null: the tokenizer's mask token, else a new token is added."))
    mask_token: str = field(default=DEFAULT_MASK_TOKEN, metadata=_help(
        "Text of the [MASK] token added when the tokenizer has none and mask_token_id is null."))
    anneal_steps: int = field(default=0, metadata=_help(
        "Training steps from causal to bidirectional attention (future pairs opened with probability "
        "min(1, (step+1)/anneal_steps)); 0: bidirectional from the start."))
    eps: float = field(default=1e-3, metadata=_help("Smallest masking rate t ~ U(eps, 1) (the loss weighs 1/t)."))
    finetuning: str = field(default="full", metadata=_help(
        f"What trains {FINETUNING}: the whole model, or peft LoRA plus the [MASK] embedding row."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank (finetuning: lora)."))
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA alpha (finetuning: lora)."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout (finetuning: lora)."))
    lora_target_modules: str | list[str] = field(default="all-linear", metadata=_help(
        "Modules that get LoRA (finetuning: lora): all-linear or a list of names."))
    base_model_name_or_path: str | None = field(default=None, metadata=_help(
        "The base model (stamped when trained; a LoRA adapter loads onto it)."))

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise ValueError(f"mask_token_id must be >= 0 or null, got {self.mask_token_id}")
        if not self.mask_token:
            raise ValueError("mask_token must be a non-empty string")
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0 (0: bidirectional from the start), got {self.anneal_steps}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {self.eps}")
        if self.finetuning not in FINETUNING:
            raise ValueError(f"finetuning must be one of {FINETUNING}, got {self.finetuning!r}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be positive, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")

    # --- JSON round trip ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MaskedDiffusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MaskedDiffusionConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, directory: str, extra: dict | None = None) -> str:
        """Write ``mdm_config.json`` (this config under ``config`` plus ``extra``) atomically."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        return write_json_atomic(path, {"config": self.to_dict(), **(extra or {})})

    @classmethod
    def load(cls, directory: str) -> tuple["MaskedDiffusionConfig", dict]:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not a masked-diffusion model folder")
        with open(path) as f:
            raw = json.load(f)
        extra = {k: v for k, v in raw.items() if k != "config"}
        return cls.from_dict(raw.get("config", {})), extra
