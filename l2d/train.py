"""The training script: one linear function, `train(recipe)`, behind `l2d train`.

    recipe -> Accelerator -> base + tokenizer -> examples (l2d.data) -> model for the method
    (l2d path | peft LoRA | full) -> AdamW -> global batches -> loop:
        per micro-batch: forward (summed loss) / global supervised tokens -> backward
        clip -> lr of the step -> optimizer step -> log -> checkpoint every N steps
    -> final adapter (save_pretrained) + recipe.yaml

Exactness, by construction:
- A global batch (`train.batch_size` sequences) is a fixed list of examples for a step. Process
  `r` at accumulation step `a` takes micro-batch `a * P + r` of it, and the random draws of
  each micro-batch (timesteps, noise, class dropout, self-conditioning) are seeded from
  (seed, step, micro-batch index). So one process with accumulation and P processes without it
  see the same micro-batches with the same noise, and a resumed run repeats the same draws.
- Each micro-batch's summed loss is divided by the supervised token count of the whole global
  batch (all-reduced across processes), times P because DDP averages gradients: the gradient
  is exactly that of the mean over every supervised token of the step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from . import ds_engine
from .baseline_loss import ResponseLoss, inner, inner_state_dict, is_response_loss, response_loss
from .batching import Collator, length_grouped_batches
from .checkpoint import METRICS_FILE, MetricSinks, TrainingError, check_resume, latest_checkpoint, \
    list_checkpoints, load_checkpoint, load_optimizer_tensors, save_checkpoint, set_rng_state  # noqa: F401
from .arch import base_fingerprint, full_shape
from .config import IGNORE_INDEX
from .data import build_dataset, null_class_label
from .optim import PARTS, freeze_parts, is_up_projection, lr_at, lr_scales, optimizer_groups, part_of  # noqa: F401
from .pretrained import dtype_named
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"


# ------------------------------------------------------------------------------------- pieces
def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the random draws of micro-batch `micro` of step `step` (same on any process layout)."""
    return ((seed * 1_000_003 + step) * 1_009 + micro) % (2 ** 63)


def load_recipe_base(recipe: Recipe):
    """``(base, tokenizer)`` of the recipe's ``model`` section (name, dtype, revision, attention
    implementation, remote code), through :func:`l2d.pretrained.load_base`."""
    from .pretrained import load_base

    m = recipe.model
    kw = {k: v for k, v in (("revision", m.revision), ("attn_implementation", m.attn_implementation)) if v}
    if m.trust_remote_code:
        kw["trust_remote_code"] = True
    return load_base(m.name_or_path, dtype=dtype_named(m.dtype), **kw)


def build_model(recipe: Recipe, base, tokenizer=None):
    """The trainable model for `recipe.method`: L2D path, peft LoRA of the base, the whole base, or the
    base adapted into a masked diffusion LM (`mdm`, :func:`l2d.mdm.get_mdm_model`)."""
    if recipe.method == "l2d":
        from .model import get_l2d_model

        model = get_l2d_model(base, recipe.l2d)
        # a part at lr scale 0 is frozen: no gradients, no optimizer state for it
        freeze_parts(model, [part for part, scale in lr_scales(recipe).items() if scale == 0])
        if recipe.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model
    if recipe.train.gradient_checkpointing:
        base.config.use_cache = False
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name goes in v6)
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.method == "mdm":  # the base itself adapted into a masked diffusion LM (l2d.mdm)
        from .mdm import get_mdm_model

        config = dataclasses.replace(recipe.mdm, base_model_name_or_path=recipe.mdm.base_model_name_or_path
                                     or recipe.model.name_or_path)
        return get_mdm_model(base, config, tokenizer=tokenizer).train()
    if recipe.method == "lora":
        from peft import LoraConfig, get_peft_model

        lc = recipe.lora
        model = get_peft_model(base, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                target_modules=lc.target_modules, task_type="CAUSAL_LM"))
    else:
        base.requires_grad_(True)
        model = base
    return model.train()


def batch_loss(model, method: str, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over supervised tokens, their count) of one micro-batch.

    The baselines get the same economy as L2D (:mod:`l2d.baseline_loss`): the head and the
    cross-entropy only at supervised positions. ``model`` is an L2D model, a baseline, or a baseline
    inside :class:`~l2d.baseline_loss.ResponseLoss` (what ``l2d train`` hands to DDP/FSDP/DeepSpeed),
    whose forward then computes the loss.
    """
    if method == "l2d":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    class_labels=batch["class_labels"], reduction="sum")
        return out.loss, int(out.num_tokens)
    if method == "mdm":  # the 1/t-weighted CE at masked response tokens, summed (l2d.mdm.loss)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    reduction="sum")
        return out.loss, int(out.num_tokens)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    return (model(*args) if is_response_loss(model) else response_loss(model, *args)), n


# ------------------------------------------------------------------------------------- train
def train(recipe: Recipe, resume: str | None = None, stop_after: int | None = None,
          overwrite: bool = False) -> dict:
    """Run `recipe`; returns a summary (steps, last loss, output_dir, whether it stopped early).

    `resume`: a run folder (its newest checkpoint) or one checkpoint folder. `stop_after`: stop
    after that many optimizer steps in this invocation, saving a checkpoint (a step budget that
    does not change the schedule). Ctrl-C saves a checkpoint too.
    """
    run = TrainingRun(recipe)
    ckpt = run.open_output_dir(resume, overwrite)
    run.build(ckpt)
    stopped = run.loop(stop_after)
    run.finish(stopped)
    return {"steps": run.step, "loss": run.last_loss, "output_dir": str(run.out_dir), "stopped": stopped,
            "trainable_parameters": run.n_trainable, "examples": len(run.lengths), "data_reports": run.reports}


class TrainingRun:
    """One run of :func:`train`, step by step: the accelerator and the output folder, then the base,
    the data, the model and its optimizer (restored from a checkpoint on resume), then the loop of
    optimizer steps, each over its global batch, and the final save."""

    def __init__(self, recipe: Recipe):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.recipe = recipe
        cfg = self.cfg = recipe.train
        # Several processes and no GPU (torchrun on a CPU machine): accelerate wants cpu=True for gloo DDP
        # (with cpu=True it would also ignore a DeepSpeed launch, which runs on gloo by itself).
        cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() \
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
        accelerator = self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_ddp)
        self.P, self.rank, self.main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
        if cfg.batch_size % (cfg.micro_batch_size * self.P):
            raise RecipeError(f"train.batch_size ({cfg.batch_size}) must be a multiple of train.micro_batch_size "
                              f"({cfg.micro_batch_size}) x processes ({self.P})")
        self.accum = cfg.batch_size // (cfg.micro_batch_size * self.P)
        self.sharded_state = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if recipe.method == "l2d" and accelerator.distributed_type == DistributedType.DEEPSPEED \
                and accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise TrainingError("method l2d cannot run under DeepSpeed ZeRO-3: the diffusion path reads the frozen "
                                "layers' weights directly. Use recipes/accelerate/zero2.yaml or fsdp2.yaml.")
        self.out_dir = Path(cfg.output_dir)
        self.step, self.last_loss, self.sinks = 0, None, None

    def open_output_dir(self, resume: str | None, overwrite: bool) -> Path | None:
        """The checkpoint to resume from (None: a fresh run); refuses to write over another run."""
        out_dir, ckpt = self.out_dir, None
        if resume:
            ckpt = latest_checkpoint(resume)
            if ckpt is None:
                raise TrainingError(f"--resume {resume}: no checkpoint there (expected {resume}/checkpoints/step-*/)")
        elif list_checkpoints(out_dir) and not overwrite:
            raise TrainingError(f"{out_dir} already holds checkpoints of a run: pass --resume {out_dir} to continue "
                                "it, --overwrite to start over, or set train.output_dir to a new folder.")
        if self.main:
            if overwrite and not resume and out_dir.exists():
                shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / RECIPE_FILE).write_text(self.recipe.to_yaml())
        return ckpt

    def build(self, ckpt: Path | None) -> None:
        """Base, data, model and optimizer (wrapped by accelerate), then the checkpoint's state if any."""
        from accelerate.utils import set_seed

        recipe, cfg, accelerator = self.recipe, self.cfg, self.accelerator
        set_seed(cfg.seed)
        base, self.tokenizer = load_recipe_base(recipe)
        self._load_data(base)
        model = build_model(recipe, base, self.tokenizer)
        self.fingerprint = base_fingerprint(base)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(optimizer_groups(model, recipe), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        self.n_trainable = sum(p.numel() for p in self.params)
        if ds_engine.is_deepspeed(accelerator):
            ds_engine.configure(accelerator, cfg)
        if recipe.method in ("lora", "full"):  # the baseline's loss runs inside the distributed wrapper's forward
            model = ResponseLoss(model)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped = inner(accelerator.unwrap_model(self.model))  # the L2D model or the baseline: names, saving
        self.steps_per_epoch = len(self.batches_of_epoch(0))
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.start = 0 if ckpt is None else self._resume_from(ckpt)
        if self.main:
            self.sinks = MetricSinks(self.out_dir, recipe, keep_until=self.start if ckpt is not None else None)

    def _load_data(self, base) -> None:
        recipe, cfg = self.recipe, self.cfg
        tokenizer = self.tokenizer
        categories = tuple(recipe.l2d.class_names)
        with self.accelerator.main_process_first():
            dataset, self.reports = build_dataset(recipe.data.sources, tokenizer, max_length=recipe.data.max_length,
                                                  categories=categories, chat_template=recipe.data.chat_template,
                                                  system_prompt=recipe.data.system_prompt)
        vocab = full_shape(base.get_input_embeddings().weight)[0]
        if len(tokenizer) > vocab:
            logger.warning("tokenizer has %d tokens, the model %d rows; ids are checked per batch", len(tokenizer),
                           vocab)
        if len(dataset) < cfg.batch_size:
            raise TrainingError(f"the data has {len(dataset)} usable examples, fewer than one global batch "
                                f"(train.batch_size = {cfg.batch_size})")
        self.lengths = list(dataset["length"])
        self.examples = dataset.select_columns(["input_ids", "labels", "class_label"])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collate = Collator(pad, null_label=null_class_label(categories))

    def batches_of_epoch(self, epoch: int) -> list[list[int]]:
        cfg = self.cfg
        if cfg.group_by_length:
            return length_grouped_batches(self.lengths, cfg.batch_size, seed=cfg.seed + epoch, drop_last=True)
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        return [order[i:i + cfg.batch_size] for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)]

    def _resume_from(self, ckpt: Path) -> int:
        """Restore weights, optimizer and RNG state from `ckpt`; returns its step."""
        weights, opt_tensors, state, rng_tensors, rng_extra = load_checkpoint(ckpt)
        check_resume(state, self.recipe, self.fingerprint, ckpt)
        named = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        if self.sharded_state:
            if not (ckpt / "accelerate_state").is_dir():
                raise TrainingError(f"{ckpt} has no finished accelerate_state (the sharded optimizer state): the "
                                    "run stopped while writing it. Delete that checkpoint folder to resume from "
                                    "the one before, or resume from a run saved without FSDP/DeepSpeed.")
            self.accelerator.load_state(str(ckpt / "accelerate_state"))
        else:
            if set(named) != set(weights):
                raise TrainingError(f"{ckpt}: trainable weights do not match the model "
                                    f"(missing {sorted(set(named) - set(weights))[:3]}, "
                                    f"unexpected {sorted(set(weights) - set(named))[:3]})")
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(weights[n])
            optimizer = self.optimizer
            load_optimizer_tensors(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                   opt_tensors, state["optimizer"])
        set_rng_state(rng_tensors, rng_extra)
        if self.main:
            logger.info("resumed from %s at step %d", ckpt, state["step"])
        return state["step"]

    def save(self, step: int) -> Path | None:
        """A checkpoint of `step` (every process writes its shard of a sharded optimizer state)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        state = {"recipe": self.recipe.to_dict(), "base": self.fingerprint, "total_steps": self.total_steps,
                 "data": {"epoch": step // spe, "batch_in_epoch": step % spe,
                          "steps_per_epoch": spe, "examples": len(self.lengths)},
                 "schedule": {"kind": cfg.schedule, "lr": cfg.lr, "min_lr": cfg.min_lr,
                              "warmup_steps": cfg.warmup_steps}}
        path = None
        if self.main:
            weights = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
            opt = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
            path = save_checkpoint(self.out_dir, step, {} if self.sharded_state else weights,
                                   None if self.sharded_state else opt, state, cfg.keep_last)
        if self.sharded_state:  # FSDP / DeepSpeed shard the optimizer: every process writes its part,
            # into a temporary folder that the main process renames once all parts are written
            accelerator = self.accelerator
            accelerator.wait_for_everyone()
            final = self.out_dir / "checkpoints" / f"step-{step:06d}" / "accelerate_state"
            tmp = final.with_name("accelerate_state.tmp")
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if self.main:
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
            accelerator.wait_for_everyone()
        return path

    def loop(self, stop_after: int | None) -> str | None:
        """Optimizer steps up to the total (or `stop_after` of them); returns why it stopped early, if it did."""
        cfg, recipe = self.cfg, self.recipe
        if self.main:
            logger.info("method %s: %s trainable parameters; %d examples, %d steps of %d sequences "
                        "(%d process(es) x %d accumulation x %d)", recipe.method, f"{self.n_trainable:,d}",
                        len(self.lengths), self.total_steps, cfg.batch_size, self.P, self.accum, cfg.micro_batch_size)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=self.start, disable=not (self.main and cfg.progress_bar),
                        desc=f"l2d train ({recipe.method})", dynamic_ncols=True)
        self.model.train()
        epoch_cache: dict[int, list] = {}
        self.step, stopped, self.t_start = self.start, None, time.perf_counter()
        try:
            while self.step < self.total_steps:
                if stop_after is not None and self.step - self.start >= stop_after:
                    stopped = "step budget"
                    break
                epoch, index = divmod(self.step, self.steps_per_epoch)
                if epoch not in epoch_cache:
                    epoch_cache.clear()
                    epoch_cache[epoch] = self.batches_of_epoch(epoch)
                self.optimizer_step(epoch_cache[epoch][index])
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save(self.step)
        except _NonFinite as e:
            self._stop_on_non_finite(e)
        except KeyboardInterrupt:
            stopped = "interrupted"
        self.bar.close()
        return stopped

    def micro_batches(self, global_batch: list[int]):
        """This process's micro-batches of the global batch, `(index in the global batch, tensors)`, and
        the supervised and total token counts of the whole global batch (all processes)."""
        accelerator, size = self.accelerator, self.cfg.micro_batch_size
        micro = []
        for a in range(self.accum):
            g = a * self.P + self.rank
            rows = self.examples[global_batch[g * size:(g + 1) * size]]
            feats = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
            micro.append((g, {k: v.to(accelerator.device) for k, v in self.collate(feats).items()}))
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, b in micro),
                               sum(int(b["attention_mask"].sum()) for _, b in micro)],
                              dtype=torch.float64, device=accelerator.device)
        n_sup, n_tok = accelerator.reduce(counts, "sum").tolist() if self.P > 1 else counts.tolist()
        return micro, n_sup, n_tok

    def optimizer_step(self, global_batch: list[int]) -> None:
        """One optimizer step over `global_batch`: the summed loss of each micro-batch divided by the
        global supervised token count, backward, clip, step; then the metrics row."""
        cfg, accelerator, P, step = self.cfg, self.accelerator, self.P, self.step
        t0 = time.perf_counter()
        micro, n_sup, n_tok = self.micro_batches(global_batch)
        # Set before the first backward: DeepSpeed's engine steps inside the last one.
        lr = lr_at(step, self.total_steps, cfg)
        if self.recipe.method == "mdm":  # the annealed attention's step
            self.unwrapped.training_step = step
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for a, (g, batch) in enumerate(micro):
            torch.manual_seed(micro_seed(cfg.seed, step, g))
            sync = a == self.accum - 1 or P == 1
            with (accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()):
                try:
                    loss, _ = batch_loss(self.model, self.recipe.method, batch)
                    bad = not torch.isfinite(loss).item()
                except FloatingPointError:
                    loss, bad = None, True
                if P > 1:
                    bad = bool(accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum") > 0)
                if bad:
                    raise _NonFinite(step + 1)
                ds_engine.backward(accelerator, self.model, loss * (P / n_sup), boundary=sync)
            loss_sum += loss.detach().double()
        grad_norm = accelerator.clip_grad_norm_(self.params if not self.sharded_state else self.model.parameters(),
                                                cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if grad_norm is not None:  # DeepSpeed: the norm its engine clipped by, after its step
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                raise _NonFinite(step + 1, what="gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        total = accelerator.reduce(loss_sum, "sum") if P > 1 else loss_sum
        self.last_loss = float(total) / n_sup
        self._log(lr, grad_norm, n_sup, n_tok, time.perf_counter() - t0)

    def _log(self, lr: float, grad_norm, n_sup: float, n_tok: float, dt: float) -> None:
        if not self.main:
            return
        step = self.step
        row = {"step": step, "loss": self.last_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tok),
               "supervised_tokens": int(n_sup), "tokens_per_s": n_tok / dt, "step_time_s": dt,
               "epoch": step / self.steps_per_epoch, "elapsed_s": time.perf_counter() - self.t_start}
        if torch.cuda.is_available():
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self.sinks.log(row)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:,.0f}")
        self.bar.update(1)

    def _stop_on_non_finite(self, e: "_NonFinite") -> None:
        # DeepSpeed's engine reports its gradient norm after it stepped: the live weights are no longer
        # the last good state, so the newest checkpoint is.
        stepped = e.what == "gradient norm" and ds_engine.is_deepspeed(self.accelerator)
        path = None if stepped else self.save(self.step)
        self.bar.close()
        good = "the newest checkpoint" if stepped else f"after step {self.step}"
        raise TrainingError(f"non-finite {e.what} at step {e.step} (the {self.recipe.method} run stopped; the last "
                            f"good state, {good}, is saved in {path or self.out_dir / 'checkpoints'}). "
                            "Lower train.lr, check the data, or use bf16 instead of fp16.") from None

    def finish(self, stopped: str | None) -> None:
        """A checkpoint when stopped early; else the final state, the weights and the recipe."""
        accelerator, out_dir, step = self.accelerator, self.out_dir, self.step
        if stopped:
            path = self.save(step)
            if self.main:
                print(f"{'Interrupted' if stopped == 'interrupted' else 'Stopped'} after step {step}; checkpoint "
                      f"saved to {path}. Continue with --resume {out_dir}.", flush=True)
        else:
            accelerator.wait_for_everyone()
            self.save(step)  # the final state, so --resume with a larger max_steps can extend the run
            # FSDP / DeepSpeed shard the weights: gather them (a collective, so every process calls it)
            gathered = ({"state_dict": inner_state_dict(accelerator.get_state_dict(self.model))}
                        if self.sharded_state else {})
            if self.main:
                self.unwrapped.save_pretrained(str(out_dir), **gathered)
                if self.recipe.method in ("full", "mdm"):  # mdm: the tokenizer may hold an added [MASK]
                    self.tokenizer.save_pretrained(str(out_dir))
                (out_dir / RECIPE_FILE).write_text(self.recipe.to_yaml())
                print(f"Saved the {self.recipe.method} weights and the recipe to {out_dir}", flush=True)
        if self.sinks is not None:
            self.sinks.close()
        accelerator.wait_for_everyone()  # every process returns once the main one has written everything


class _NonFinite(Exception):
    def __init__(self, step: int, what: str = "loss"):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what
