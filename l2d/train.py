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

import dataclasses
import json
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
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_optimizer_tensors, \
    save_checkpoint, set_rng_state
from .config import REMOVED_OPTIONS
from .data import IGNORE_INDEX, DataSource, build_dataset, null_class_label
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
# Recipe keys that must match for --resume (the rest, e.g. lr or micro_batch_size, may change).
# The lr scales are stored in the optimizer's groups, which a resume restores: they must match too.
_RESUME_KEYS = ("model.name_or_path", "model.revision", "method", "l2d", "lora", "mdm", "data",
                "train.batch_size", "train.seed", "train.group_by_length", "train.epochs",
                "train.head_lr_scale", "train.encoder_lr_scale", "train.loraplus_lr_ratio")


class TrainingError(RuntimeError):
    """Training stopped on a problem (non-finite loss, bad resume directory, too little data)."""


# ------------------------------------------------------------------------------------- pieces
def lr_at(step: int, total: int, t) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr + (t.lr - t.min_lr) * shape


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the random draws of micro-batch `micro` of step `step` (same on any process layout)."""
    return ((seed * 1_000_003 + step) * 1_009 + micro) % (2 ** 63)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_recipe_base(recipe: Recipe):
    """``(base, tokenizer)`` of the recipe's ``model`` section (name, dtype, revision, attention
    implementation, remote code), through :func:`l2d.pretrained.load_base`."""
    from .pretrained import load_base

    m = recipe.model
    kw = {k: v for k, v in (("revision", m.revision), ("attn_implementation", m.attn_implementation)) if v}
    if m.trust_remote_code:
        kw["trust_remote_code"] = True
    return load_base(m.name_or_path, dtype=_dtype(m.dtype), **kw)


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


# Groups of path parameters that train at their own rate (names as in L2DModel.named_parameters).
PARTS = {
    "heads": (".adaln.", "path.merge.", "path.conditioning."),  # see only t and the class
    "encoder": ("path.encoder.", "path.latent."),                # read the noisy latent x_t and z_hat
}


def part_of(name: str) -> str:
    """``heads``, ``encoder`` or ``deltas`` (everything else: low-rank or full deltas, k/v deltas)."""
    for part, keys in PARTS.items():
        if any(k in name for k in keys):
            return part
    return "deltas"


def lr_scales(recipe: Recipe) -> dict:
    """Learning-rate multiplier per part (all 1 for the baselines)."""
    t = recipe.train
    if recipe.method != "l2d":
        return {"deltas": 1.0}
    return {"heads": t.head_lr_scale, "encoder": t.encoder_lr_scale, "deltas": 1.0}


def freeze_parts(model, parts) -> None:
    """Stop training the named parts (a part whose lr scale is 0)."""
    for name, p in model.named_parameters():
        if part_of(name) in parts:
            p.requires_grad_(False)


def is_up_projection(name: str) -> bool:
    """The ``B`` of a low-rank delta ``B A x``: l2d's (``...B``) or peft's (``...lora_B...``)."""
    return name.endswith(".B") or ".lora_B." in name


def optimizer_groups(model, recipe: Recipe) -> list[dict]:
    """AdamW groups: no weight decay on vectors; for l2d, each part at its own rate (:func:`lr_scales`);
    the ``B`` of every low-rank delta at ``train.loraplus_lr_ratio`` times its part's rate.

    The heads (per-block adaLN, merge, time MLP, class embedding) see only ``t`` and the class.
    AdamW moves every weight by about ``lr`` per step whatever the gradient's size, so a head's
    output (fan-in ``cond_dim``, inputs of order one) can move by about ``lr * cond_dim`` per
    step, for every token alike: the heads learn a bias towards frequent answers long before the
    deltas learn to read the context (benchmarks/README.md, "Sample efficiency"). A smaller rate,
    or 0 (frozen, see ``build_model``), keeps them from doing so.

    LoRA+: with ``B = 0`` at init a delta ``B A x`` grows only as fast as ``B`` learns, while ``A``
    (random, wide) barely needs to move; a higher rate for ``B`` learns features faster.
    """
    t = recipe.train
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = lr_scales(recipe)
    split_up = t.loraplus_lr_ratio != 1  # (one rate: the groups of earlier checkpoints, which still resume)
    buckets = {}  # (part, is B, decayed) -> params
    for n, p in named:
        part = part_of(n) if recipe.method == "l2d" else "deltas"
        buckets.setdefault((part, split_up and is_up_projection(n), p.dim() >= 2), []).append(p)
    order = list(scales)  # groups in a fixed order: part, then A before B, then decayed first
    return [{"params": ps, "weight_decay": t.weight_decay if decay else 0.0,
             "lr_scale": scales[part] * (t.loraplus_lr_ratio if up else 1.0)}
            for (part, up, decay), ps in sorted(buckets.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1],
                                                                                   not kv[0][2]))]


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(p, "ds_shape", p.shape)


def base_fingerprint(base) -> dict:
    vocab, hidden = full_shape(base.get_input_embeddings().weight)
    return {"model_type": base.config.model_type, "vocab_size": int(vocab), "hidden_size": int(hidden),
            "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())}


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


def _resume_values(d: dict) -> dict:
    """The values at :data:`_RESUME_KEYS` of a recipe dict (None where it has none)."""
    out = {}
    for key in _RESUME_KEYS:
        node = d
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def _source_defaults() -> dict:
    """Every :class:`l2d.data.DataSource` field but ``name`` at its default."""
    return {k: v for k, v in dataclasses.asdict(DataSource(name="")).items() if k != "name"}


def _recipe_view(d: dict) -> dict:
    """What must match for a resume. Keys a checkpoint's recipe predates (a field added to a section,
    or to a data source, since) read as today's defaults, which the run used, so older checkpoints
    still resume."""
    out, saved = {}, _resume_values(d)
    for key, default in _resume_values(Recipe().to_dict()).items():
        value = saved[key]
        if isinstance(value, dict) and isinstance(default, dict):
            if key == "l2d":  # options removed since, at their old defaults (as every such run had them)
                value = {k: v for k, v in value.items() if not (k in REMOVED_OPTIONS and v == REMOVED_OPTIONS[k])}
            value = {**default, **value}
        out[key] = default if value is None else value
    sources = out["data"].get("sources")
    if isinstance(sources, list):
        out["data"] = {**out["data"], "sources": [{**_source_defaults(), **s} if isinstance(s, dict) else s
                                                  for s in sources]}
    if d.get("method") != "lora":
        out.pop("lora")
    if d.get("method") != "mdm":
        out.pop("mdm")
    return out


def check_resume(saved_state: dict, recipe: Recipe, fingerprint: dict, where: Path) -> None:
    """Raise when the checkpoint at `where` comes from another recipe or base model."""
    saved, now = _recipe_view(saved_state.get("recipe", {})), _recipe_view(recipe.to_dict())
    diffs = [f"{k}: checkpoint {json.dumps(saved.get(k))[:120]} vs recipe {json.dumps(now.get(k))[:120]}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if saved_state.get("base") != fingerprint:
        diffs.append(f"base model: checkpoint {saved_state.get('base')} vs now {fingerprint}")
    if diffs:
        raise TrainingError(f"cannot resume from {where}: it was written by another recipe or base model ("
                            + "; ".join(diffs) + "). Resume with the recipe that wrote it, or start a new "
                            "output_dir.")


class MetricSinks:
    """metrics.jsonl (always) plus tensorboard / wandb when installed and asked for."""

    def __init__(self, output_dir: Path, recipe: Recipe, keep_until: int | None):
        self.path = output_dir / METRICS_FILE
        lines = []
        if keep_until is not None and self.path.is_file():  # resume: drop what came after the checkpoint
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= keep_until]
        self.path.write_text("".join(ln + "\n" for ln in lines))
        self.tb = self.wandb = None
        if "tensorboard" in recipe.train.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                logger.warning("report_to tensorboard: tensorboard is not installed; logging to %s only", self.path)
        if "wandb" in recipe.train.report_to:
            try:
                import wandb

                self.wandb = wandb.init(project="l2d", config=recipe.to_dict(), dir=str(output_dir),
                                        resume="allow")
            except ImportError:
                logger.warning("report_to wandb: wandb is not installed; logging to %s only", self.path)

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------- train
def train(recipe: Recipe, resume: str | None = None, stop_after: int | None = None,
          overwrite: bool = False) -> dict:
    """Run `recipe`; returns a summary (steps, last loss, output_dir, whether it stopped early).

    `resume`: a run folder (its newest checkpoint) or one checkpoint folder. `stop_after`: stop
    after that many optimizer steps in this invocation, saving a checkpoint (a step budget that
    does not change the schedule). Ctrl-C saves a checkpoint too.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    t = recipe.train
    # Several processes and no GPU (torchrun on a CPU machine): accelerate wants cpu=True for gloo DDP
    # (with cpu=True it would also ignore a DeepSpeed launch, which runs on gloo by itself).
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() \
        and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=cpu_ddp)
    P, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if t.batch_size % (t.micro_batch_size * P):
        raise RecipeError(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size}) x processes ({P})")
    accum = t.batch_size // (t.micro_batch_size * P)
    sharded_state = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if recipe.method == "l2d" and accelerator.distributed_type == DistributedType.DEEPSPEED \
            and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise TrainingError("method l2d cannot run under DeepSpeed ZeRO-3: the diffusion path reads the frozen "
                            "layers' weights directly. Use recipes/accelerate/zero2.yaml or fsdp2.yaml.")

    out_dir = Path(t.output_dir)
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise TrainingError(f"--resume {resume}: no checkpoint there (expected {resume}/checkpoints/step-*/)")
    elif list_checkpoints(out_dir) and not overwrite:
        raise TrainingError(f"{out_dir} already holds checkpoints of a run: pass --resume {out_dir} to continue "
                            "it, --overwrite to start over, or set train.output_dir to a new folder.")
    if main:
        if overwrite and not resume and out_dir.exists():
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RECIPE_FILE).write_text(recipe.to_yaml())

    # --- base, data, model -------------------------------------------------------------------
    set_seed(t.seed)
    base, tokenizer = load_recipe_base(recipe)
    categories = tuple(recipe.l2d.class_names)
    with accelerator.main_process_first():
        dataset, reports = build_dataset(recipe.data.sources, tokenizer, max_length=recipe.data.max_length,
                                         categories=categories, chat_template=recipe.data.chat_template,
                                         system_prompt=recipe.data.system_prompt)
    vocab = full_shape(base.get_input_embeddings().weight)[0]
    if len(tokenizer) > vocab:
        logger.warning("tokenizer has %d tokens, the model %d rows; ids are checked per batch", len(tokenizer), vocab)
    if len(dataset) < t.batch_size:
        raise TrainingError(f"the data has {len(dataset)} usable examples, fewer than one global batch "
                            f"(train.batch_size = {t.batch_size})")
    lengths = list(dataset["length"])
    examples = dataset.select_columns(["input_ids", "labels", "class_label"])
    collate = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                       null_label=null_class_label(categories))

    model = build_model(recipe, base, tokenizer)
    fingerprint = base_fingerprint(base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(optimizer_groups(model, recipe), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    n_trainable = sum(p.numel() for p in params)
    if ds_engine.is_deepspeed(accelerator):
        ds_engine.configure(accelerator, t)
    if recipe.method in ("lora", "full"):  # the baseline's loss runs inside the distributed wrapper's forward
        model = ResponseLoss(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = inner(accelerator.unwrap_model(model))  # the L2D model or the baseline: names, saving

    def batches_of_epoch(epoch: int) -> list[list[int]]:
        if t.group_by_length:
            return length_grouped_batches(lengths, t.batch_size, seed=t.seed + epoch, drop_last=True)
        g = torch.Generator().manual_seed(t.seed + epoch)
        order = torch.randperm(len(lengths), generator=g).tolist()
        return [order[i:i + t.batch_size] for i in range(0, len(order) - t.batch_size + 1, t.batch_size)]

    steps_per_epoch = len(batches_of_epoch(0))
    total_steps = t.max_steps or steps_per_epoch * t.epochs

    # --- resume ----------------------------------------------------------------------------------
    start = 0
    if ckpt is not None:
        weights, opt_tensors, state, rng_tensors, rng_extra = load_checkpoint(ckpt)
        check_resume(state, recipe, fingerprint, ckpt)
        named = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
        if sharded_state:
            if not (ckpt / "accelerate_state").is_dir():
                raise TrainingError(f"{ckpt} has no finished accelerate_state (the sharded optimizer state): the "
                                    "run stopped while writing it. Delete that checkpoint folder to resume from "
                                    "the one before, or resume from a run saved without FSDP/DeepSpeed.")
            accelerator.load_state(str(ckpt / "accelerate_state"))
        else:
            if set(named) != set(weights):
                raise TrainingError(f"{ckpt}: trainable weights do not match the model "
                                    f"(missing {sorted(set(named) - set(weights))[:3]}, "
                                    f"unexpected {sorted(set(weights) - set(named))[:3]})")
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(weights[n])
            load_optimizer_tensors(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                   opt_tensors, state["optimizer"])
        set_rng_state(rng_tensors, rng_extra)
        start = state["step"]
        if main:
            logger.info("resumed from %s at step %d", ckpt, start)
    sinks = MetricSinks(out_dir, recipe, keep_until=start if ckpt is not None else None) if main else None

    def save(step: int) -> Path | None:
        state = {"recipe": recipe.to_dict(), "base": fingerprint, "total_steps": total_steps,
                 "data": {"epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                          "steps_per_epoch": steps_per_epoch, "examples": len(lengths)},
                 "schedule": {"kind": t.schedule, "lr": t.lr, "min_lr": t.min_lr, "warmup_steps": t.warmup_steps}}
        path = None
        if main:
            weights = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
            opt = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
            path = save_checkpoint(out_dir, step, {} if sharded_state else weights,
                                   None if sharded_state else opt, state, t.keep_last)
        if sharded_state:  # FSDP / DeepSpeed shard the optimizer: every process writes its part,
            # into a temporary folder that the main process renames once all parts are written
            accelerator.wait_for_everyone()
            final = out_dir / "checkpoints" / f"step-{step:06d}" / "accelerate_state"
            tmp = final.with_name("accelerate_state.tmp")
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if main:
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
            accelerator.wait_for_everyone()
        return path

    # --- loop ------------------------------------------------------------------------------------
    if main:
        logger.info("method %s: %s trainable parameters; %d examples, %d steps of %d sequences "
                    "(%d process(es) x %d accumulation x %d)", recipe.method, f"{n_trainable:,d}", len(lengths),
                    total_steps, t.batch_size, P, accum, t.micro_batch_size)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start, disable=not (main and t.progress_bar), desc=f"l2d train ({recipe.method})",
               dynamic_ncols=True)
    model.train()
    epoch_cache: dict[int, list] = {}
    step, last_loss, stopped, t_start = start, None, None, time.perf_counter()
    try:
        while step < total_steps:
            if stop_after is not None and step - start >= stop_after:
                stopped = "step budget"
                break
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = batches_of_epoch(epoch)
            global_batch = epoch_cache[epoch][index]
            t0 = time.perf_counter()
            micro = []
            for a in range(accum):
                g = a * P + rank
                idx = global_batch[g * t.micro_batch_size:(g + 1) * t.micro_batch_size]
                rows = examples[idx]
                feats = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
                micro.append((g, {k: v.to(accelerator.device) for k, v in collate(feats).items()}))
            counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for _, b in micro),
                                   sum(int(b["attention_mask"].sum()) for _, b in micro)],
                                  dtype=torch.float64, device=accelerator.device)
            n_sup, n_tok = accelerator.reduce(counts, "sum").tolist() if P > 1 else counts.tolist()
            # Set before the first backward: DeepSpeed's engine steps inside the last one.
            lr = lr_at(step, total_steps, t)
            if recipe.method == "mdm":  # the annealed attention's step
                unwrapped.training_step = step
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            for a, (g, batch) in enumerate(micro):
                torch.manual_seed(micro_seed(t.seed, step, g))
                sync = a == accum - 1 or P == 1
                with (accelerator.no_sync(model) if not sync else _null()):
                    try:
                        loss, _ = batch_loss(model, recipe.method, batch)
                        bad = not torch.isfinite(loss).item()
                    except FloatingPointError:
                        loss, bad = None, True
                    if P > 1:
                        bad = bool(accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum") > 0)
                    if bad:
                        raise _NonFinite(step + 1)
                    ds_engine.backward(accelerator, model, loss * (P / n_sup), boundary=sync)
                loss_sum += loss.detach().double()
            grad_norm = accelerator.clip_grad_norm_(params if not sharded_state else model.parameters(),
                                                    t.grad_clip if t.grad_clip > 0 else float("inf"))
            if grad_norm is not None:  # DeepSpeed: the norm its engine clipped by, after its step
                grad_norm = float(grad_norm)
                if not math.isfinite(grad_norm):
                    raise _NonFinite(step + 1, what="gradient norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            total = accelerator.reduce(loss_sum, "sum") if P > 1 else loss_sum
            last_loss = float(total) / n_sup
            dt = time.perf_counter() - t0
            if main:
                row = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tok),
                       "supervised_tokens": int(n_sup), "tokens_per_s": n_tok / dt, "step_time_s": dt,
                       "epoch": step / steps_per_epoch, "elapsed_s": time.perf_counter() - t_start}
                if torch.cuda.is_available():
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
                if step % t.log_every == 0 or step == total_steps:
                    sinks.log(row)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / dt:,.0f}")
                bar.update(1)
            if t.save_every and step % t.save_every == 0 and step < total_steps:
                save(step)
    except _NonFinite as e:
        # DeepSpeed's engine reports its gradient norm after it stepped: the live weights are no longer
        # the last good state, so the newest checkpoint is.
        stepped = e.what == "gradient norm" and ds_engine.is_deepspeed(accelerator)
        path = None if stepped else save(step)
        bar.close()
        good = "the newest checkpoint" if stepped else f"after step {step}"
        raise TrainingError(f"non-finite {e.what} at step {e.step} (the {recipe.method} run stopped; the last "
                            f"good state, {good}, is saved in {path or out_dir / 'checkpoints'}). "
                            "Lower train.lr, check the data, or use bf16 instead of fp16.") from None
    except KeyboardInterrupt:
        stopped = "interrupted"
    bar.close()
    if stopped:
        path = save(step)
        if main:
            print(f"{'Interrupted' if stopped == 'interrupted' else 'Stopped'} after step {step}; checkpoint "
                  f"saved to {path}. Continue with --resume {out_dir}.", flush=True)
    else:
        accelerator.wait_for_everyone()
        save(step)  # the final state, so --resume with a larger max_steps can extend the run
        # FSDP / DeepSpeed shard the weights: gather them (a collective, so every process calls it)
        gathered = {"state_dict": inner_state_dict(accelerator.get_state_dict(model))} if sharded_state else {}
        if main:
            unwrapped.save_pretrained(str(out_dir), **gathered)
            if recipe.method in ("full", "mdm"):  # mdm: the tokenizer may hold an added [MASK]
                tokenizer.save_pretrained(str(out_dir))
            (out_dir / RECIPE_FILE).write_text(recipe.to_yaml())
            print(f"Saved the {recipe.method} weights and the recipe to {out_dir}", flush=True)
    if sinks is not None:
        sinks.close()
    accelerator.wait_for_everyone()  # every process returns once the main one has written everything
    return {"steps": step, "loss": last_loss, "output_dir": str(out_dir), "stopped": stopped,
            "trainable_parameters": n_trainable, "examples": len(lengths), "data_reports": reports}


class _NonFinite(Exception):
    def __init__(self, step: int, what: str = "loss"):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
