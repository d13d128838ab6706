"""Training an :class:`~l2d.model.L2DModel` with transformers' ``Trainer`` or TRL's ``SFTTrainer``.

    trainer = L2DTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, data_collator=collate)
    trainer.train()                           # checkpoints hold l2d_config.json + l2d_model.safetensors
    trainer.save_model("runs/adapter")        # then L2DModel.from_pretrained(base, "runs/adapter")

The model already speaks Trainer's language: ``forward(input_ids, attention_mask, labels)`` returns
the loss, normalised by Trainer's ``num_items_in_batch`` under gradient accumulation; the
(activation|gradient)_checkpointing hooks recompute the diffusion blocks. What Trainer decides by
class alone is done here: it calls ``save_pretrained`` (and loads checkpoints back) only for
``PreTrainedModel`` and peft models, and it would take ``class_labels`` for a target because of
its name. :class:`L2DTrainerMixin` puts both right over any Trainer subclass;
``L2DSFTTrainer`` is the mixin over TRL's ``SFTTrainer`` (``pip install l2d[trl]``).
"""
from __future__ import annotations

import contextlib
import os

from transformers import Trainer

from .config import WEIGHTS_NAME
from .model import L2DModel

TRAINING_ARGS_NAME = "training_args.bin"


class _BaseConfigView:
    """``model.config`` as trainers read it: a transformers config (``get_text_config``, where they
    align the tokenizer's special token ids) is the frozen base's; every other attribute is the
    L2DConfig's, so the model's own code reads and writes its config unchanged."""

    def __init__(self, l2d_config, base_config):
        object.__setattr__(self, "_l2d", l2d_config)
        object.__setattr__(self, "_base", base_config)

    def get_text_config(self, *args, **kwargs):
        return self._base.get_text_config(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._l2d, name) if hasattr(self._l2d, name) else getattr(self._base, name)

    def __setattr__(self, name, value):
        setattr(self._l2d, name, value)


@contextlib.contextmanager
def base_config_view(model):
    """While a trainer holds ``model`` (an L2DModel), its ``config`` is a :class:`_BaseConfigView`."""
    if not isinstance(model, L2DModel) or isinstance(model.config, _BaseConfigView):
        yield
        return
    config, model.config = model.config, _BaseConfigView(model.config, model.base_model.config)
    try:
        yield
    finally:
        model.config = config


class L2DTrainerMixin:
    """Adapter-only checkpoints for an ``L2DModel`` inside any ``transformers.Trainer`` subclass."""

    def __init__(self, *args, **kwargs):
        with base_config_view(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        if self.args.label_names is None:
            self.label_names = ["labels"]  # class_labels condition the path; they are not targets

    def train(self, *args, **kwargs):
        with base_config_view(self._l2d_model()):
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with base_config_view(self._l2d_model()):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with base_config_view(self._l2d_model()):
            return super().predict(*args, **kwargs)

    def _l2d_model(self) -> L2DModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, L2DModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._l2d_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # the path only: the frozen base is the user's, and its tied weights would not even serialise
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            import torch

            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._l2d_model() is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_path_weights(self._l2d_model(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self._l2d_model() is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        load_path_weights(self._l2d_model(), self.state.best_model_checkpoint)


def load_path_weights(model: L2DModel, directory: str) -> None:
    """Load ``l2d_model.safetensors`` from ``directory`` into ``model.path`` in place (strict)."""
    from safetensors.torch import load_file

    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r}: not a checkpoint of an L2D run.")
    model.path.load_state_dict(load_file(weights, device=str(model.device)))


class L2DTrainer(L2DTrainerMixin, Trainer):
    """``transformers.Trainer`` for an :class:`~l2d.model.L2DModel` (adapter-only checkpoints)."""


def _sft_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    # TRL's own loss asks the model for fused per-token log-probs (fused_lm_head=True); the path
    # computes its response-only loss itself, so Trainer's plain loss is the one to take.
    if self._l2d_model() is None:
        return super(L2DSFTTrainer, self).compute_loss(model, inputs, return_outputs, num_items_in_batch)
    return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def __getattr__(name: str):
    # TRL is optional and heavy to import: its trainer class is built on first use.
    global L2DSFTTrainer
    if name == "L2DSFTTrainer":
        from trl import SFTTrainer

        L2DSFTTrainer = type("L2DSFTTrainer", (L2DTrainerMixin, SFTTrainer), {
            "compute_loss": _sft_compute_loss,
            "__doc__": "TRL's ``SFTTrainer`` for an :class:`~l2d.model.L2DModel` (adapter-only checkpoints)."})
        return L2DSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
