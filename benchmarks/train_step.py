"""Training step of L2D (default L2DConfig) against a peft LoRA (rank 32, all linear layers) of the
same base, SmolLM2-135M-Instruct on the CPU, interleaved repeats, one process.

    python benchmarks/train_step.py [--repeats 3] [--threads 2] [--batches 32x~40] [--checkpointing] [--adapted]
                                    [--stream-layers 8]

A step = forward + backward + AdamW step, the loss being response-only cross-entropy (summed, as
`l2d train` computes it). L2D is timed with and without its self-conditioning pass (the default
config runs it with probability 0.5, so the expected step is their mean). A second L2D model has
its conditioning heads frozen, as the SmolLM2 recipe trains it (`train.head_lr_scale: 0.0`).
`--adapted` adds one with `context="adapted"` (heads frozen): its deltas also run over every
context position, a LoRA-like forward and backward of the base (`--context-layers K`, which
adapted the top K layers only, measured the removed `context_layers` option: benchmarks/README.md).
`--stream-layers K` adds the default config with the diffusion stream in the top K layers only
(`L2DConfig.stream_layers`), and with `--adapted` the adapted one likewise.

Memory, two measures, each the peak above its pre-step value sampled every 1 ms by a thread:
the C heap in use (glibc `mallinfo2`: bytes malloc has handed out and not taken back, where torch
puts CPU tensors; the CPU counterpart of CUDA's `max_memory_allocated`, and deterministic), and
the resident set size (RSS, /proc/self/statm, after `malloc_trim(0)` so freed memory of earlier
steps is returned to the OS first; it also counts what the allocator keeps after a free, which
varies from run to run). Both count activations, gradients and optimizer-state growth of that step
(the optimizer state is created by the warm-up step, so it is in the baseline of timed steps).
They are measured in one extra step per variant after the timed ones: with the sampler running, steps
take longer, and unevenly (runs of the same batches on the 2-core AMD container: LoRA 7.5-9.8 s
with it against 4.4-4.6 s without, L2D about 1.3x longer with it), so times taken under it
understate L2D's ratio to LoRA.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch

from l2d import L2DConfig, get_l2d_model
from l2d.bench import PeakHeap, PeakRSS, heap_in_use, train_step
from l2d.pretrained import load_smollm2
from l2d.train import freeze_parts

def recipe_batch(path: str = "recipes/smollm2-135m/arithmetic.yaml", size: int = 32) -> dict:
    """The first ``size`` examples of a recipe's data through l2d's own pipeline (chat template,
    answer-only labels): the batches the sample-efficiency runs train on."""
    from l2d.bench import recipe_batch as first_examples
    from l2d.pretrained import load_base
    from l2d.recipe import load_recipe

    recipe = load_recipe(path)
    for source in recipe.data.sources:
        source.n = size
    _, tokenizer = load_base(recipe.model.name_or_path)
    return first_examples(recipe, tokenizer, size)


def make_batch(kind: str, vocab: int, seed: int = 0) -> dict:
    """``4x256`` or ``32x~40`` random tokens whose last half is the response, or ``KIND:F`` with
    the response the last fraction ``F`` of each sequence; ``arith32``: :func:`recipe_batch`."""
    if kind == "arith32":
        return recipe_batch()
    kind, _, fraction = kind.partition(":")
    fraction = float(fraction) if fraction else 0.5
    if not 0 < fraction <= 1:
        raise SystemExit(f"response fraction must lie in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    if kind == "4x256":
        B, lengths = 4, [256] * 4
    elif kind == "32x~40":
        B, lengths = 32, torch.randint(34, 47, (32,), generator=g).tolist()
    else:
        raise SystemExit(f"unknown batch kind {kind!r}: use 4x256, 32x~40 (optionally :FRACTION) or arith32")
    T = max(lengths)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        start = n - math.ceil(n * fraction)  # (0.5: the last half, as n // 2 splits it)
        labels[i, start:n] = ids[i, start:n]  # the response: the last `fraction` of the tokens
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "class_labels": torch.zeros(B, dtype=torch.long)}


def step(model, method, opt, batch, sc=None):
    """One training step (``l2d bench``'s): every ``l2d*`` model key is an L2D model."""
    train_step(model, "l2d" if method.startswith("l2d") else method, opt, batch, self_conditioning=sc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="4x256,32x~40",
                    help="comma-separated batch kinds: 4x256, 32x~40 (random tokens, response = the last half; "
                         "KIND:F for the last fraction F, e.g. 32x~40:0.1) and arith32 (32 examples of the "
                         "SmolLM2 arithmetic recipe: chat template, answer-only labels)")
    ap.add_argument("--checkpointing", action="store_true",
                    help="add L2D (frozen heads) with gradient checkpointing of the blocks as a third model")
    ap.add_argument("--adapted", action="store_true",
                    help="add L2D with context='adapted' (frozen heads): the deltas also run over the context")
    ap.add_argument("--stream-layers", type=int, default=None, metavar="K",
                    help="add the default L2D with its diffusion stream in the top K decoder layers only "
                         "(and, with --adapted, the adapted one likewise)")
    ap.add_argument("--no-memory", action="store_true",
                    help="time only: skip the extra step per variant that samples the peak heap and RSS")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from peft import LoraConfig, get_peft_model

    base_l2d, _ = load_smollm2()
    base_lora, _ = load_smollm2()  # peft edits modules in place: give it its own copy
    l2d = get_l2d_model(base_l2d, L2DConfig()).train()

    def heads_frozen(**config):  # the SmolLM2 recipe's setting: conditioning heads frozen (train.head_lr_scale = 0)
        model = get_l2d_model(load_smollm2()[0], L2DConfig(**config)).train()
        freeze_parts(model, ["heads"])
        return model

    frozen = heads_frozen()
    lora = get_peft_model(base_lora, LoraConfig(r=32, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM")).train()
    models = {"l2d": l2d, "l2d_frozen": frozen}
    labels = [("L2D", "l2d"), ("L2D, heads frozen", "l2d_frozen")]  # (table label, model key)
    k = args.stream_layers
    if k:
        models["l2d_stream"] = get_l2d_model(load_smollm2()[0], L2DConfig(stream_layers=k)).train()
        labels.append((f"L2D, stream in the top {k} layers", "l2d_stream"))
    if args.checkpointing:
        models["l2d_ckpt"] = heads_frozen()
        models["l2d_ckpt"].gradient_checkpointing_enable()
        labels.append(("L2D, heads frozen, checkpointed", "l2d_ckpt"))
    if args.adapted:
        models["l2d_adapted"] = heads_frozen(context="adapted")
        labels.append(("L2D, heads frozen, context adapted", "l2d_adapted"))
        if k:
            models["l2d_adapted_stream"] = heads_frozen(context="adapted", stream_layers=k)
            labels.append((f"L2D, heads frozen, context adapted, stream in the top {k} layers", "l2d_adapted_stream"))
    models["lora"] = lora
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
            for k, m in models.items()}
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    vocab = base_l2d.get_input_embeddings().weight.shape[0]
    variants = [(key, sc) for _, key in labels for sc in (False, True)] + [("lora", None)]

    results = {}
    for kind in args.batches.split(","):
        batch = make_batch(kind, vocab)
        for method, sc in variants:  # warm-up (also creates the optimizer state)
            step(models[method], method, opts[method], batch, sc)
        times = {v: [] for v in variants}
        mems = {}  # variant -> (peak heap, peak RSS) in bytes
        for _ in range(args.repeats):
            for v in variants:  # interleaved: machine noise hits every variant alike
                method, sc = v
                t0 = time.perf_counter()
                step(models[method], method, opts[method], batch, sc)
                times[v].append(time.perf_counter() - t0)
        for v in variants:  # memory in one more step each: the sampling threads slow the step they watch
            method, sc = v
            measure = not args.no_memory
            with PeakRSS() if measure else contextlib.nullcontext() as mem, \
                    PeakHeap() if measure and heap_in_use() is not None else contextlib.nullcontext() as heap:
                step(models[method], method, opts[method], batch, sc)
            mems[v] = ((heap.delta if heap is not None else float("nan"), mem.delta) if measure
                       else (float("nan"), float("nan")))
        results[kind] = (times, mems)
        print(f"done {kind}", flush=True)

    print(f"\nSmolLM2-135M-Instruct, CPU, {args.threads} threads, {args.repeats} interleaved repeats "
          f"(median step time; in one more step each: peak heap in use and peak RSS above their pre-step values)")
    print(f"trainable parameters: L2D {counts['l2d']:,d}  |  L2D, heads frozen {counts['l2d_frozen']:,d}  |  "
          f"LoRA r=32 all-linear {counts['lora']:,d}\n")
    header = ("| batch | method | step time (s) | peak heap (MiB) | peak RSS (MiB) | time vs LoRA | heap vs LoRA "
              "| RSS vs LoRA |")
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for kind, (times, mems) in results.items():
        lora_t, (lora_h, lora_r) = statistics.median(times[variants[-1]]), mems[variants[-1]]

        def row(name, t, heap, rss_):
            print(f"| {kind} | {name} | {t:.2f} | {_mib(heap)} | {_mib(rss_)} | {t / lora_t:.2f}x | "
                  f"{_ratio(heap, lora_h)} | {_ratio(rss_, lora_r)} |")

        for label, method in labels:
            no_sc, with_sc = (method, False), (method, True)
            for name, v in ((f"{label}, no self-cond pass", no_sc), (f"{label}, with self-cond pass", with_sc)):
                row(name, statistics.median(times[v]), *mems[v])
            t_exp = (statistics.median(times[no_sc]) + statistics.median(times[with_sc])) / 2
            row(f"{label}, expected (p=0.5)", t_exp, *(max(a, b) for a, b in zip(mems[no_sc], mems[with_sc])))
        row("LoRA r=32", lora_t, lora_h, lora_r)


def _mib(m: float) -> str:
    return "-" if math.isnan(m) else f"{m / 2**20:.0f}"


def _ratio(m: float, ref: float) -> str:
    return "-" if math.isnan(m) else f"{m / ref:.2f}x"


if __name__ == "__main__":
    main()
