"""``l2d bench``: the training step of a recipe's L2D path against its LoRA (and full) baseline, on
the user's own base and device: step time, tokens/s, peak memory, matmul FLOPs, side by side.

A step is what ``l2d train`` runs for one micro-batch: forward, backward of the mean response
cross-entropy, AdamW step (the recipe's parameter groups and frozen parts, its gradient
checkpointing and mixed precision). L2D is timed with and without its self-conditioning pass;
the expected step mixes them with the config's probability ``p``:
``E[time] = (1 - p) time_without + p time_with`` (only the one that runs when ``p`` is 0 or 1).

Methods run one after another (so that a large base is resident once), each with warm-up steps,
then ``repeats`` timed steps (median). Memory is the peak above what was allocated before a step
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the C heap in use, :func:`heap_in_use`, or where
glibc does not report it the resident set size, sampled every millisecond in one more step, since
the sampling thread slows the step it watches). FLOPs: matrix products and
attention of one step, counted by ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from .recipe import Recipe, RecipeError

METHODS = ("l2d", "lora", "full")


# --- memory ----------------------------------------------------------------------------------
def rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    """Peak of ``read()`` above its value at entry, sampled by a background thread every millisecond."""

    def read(self) -> int:
        raise NotImplementedError

    def __enter__(self):
        self.base = self.peak = self.read()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.read())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self.read())
        self.delta = self.peak - self.base


class PeakRSS(_PeakSampler):
    """Peak RSS above the value at entry. ``malloc_trim`` first returns memory freed by earlier
    steps to the OS, so the delta counts what this step allocates (activations, gradients,
    optimizer-state growth), plus what the allocator keeps of it after freeing."""

    def read(self) -> int:
        return rss()

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        return super().__enter__()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not yet taken back (glibc ``mallinfo2``: heap
    chunks in use plus mmapped blocks), or None where that is not available. Torch allocates CPU
    tensors through it, so this is the CPU counterpart of ``torch.cuda.memory_allocated``: memory
    freed but kept by the allocator (fragmentation, arenas) is not counted, unlike in the RSS."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class PeakHeap(_PeakSampler):
    """Peak of :func:`heap_in_use` above the value at entry."""

    def read(self) -> int:
        return heap_in_use()


def memory_meter(device: torch.device):
    """``(name, context manager class or factory)`` of the peak-memory measure used on ``device``:
    CUDA's allocator statistics, the C heap in use on a CPU with glibc, else the sampled RSS, else
    None (no measure)."""
    if device.type == "cuda":
        return "CUDA allocated", lambda: PeakCUDA(device)
    if heap_in_use() is not None:
        return "heap in use", PeakHeap
    if os.path.exists("/proc/self/statm"):
        return "RSS", PeakRSS
    return None, None


class PeakCUDA:
    """Peak CUDA memory allocated during the block, above what was allocated at entry."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.delta = torch.cuda.max_memory_allocated(self.device) - self.base


# --- batches ---------------------------------------------------------------------------------
def synthetic_batch(vocab: int, batch: int, seq_len: int, response: float, seed: int = 0) -> dict:
    """``batch`` sequences of ``seq_len`` random tokens whose last ``response`` fraction is supervised."""
    if batch < 1 or seq_len < 2:
        raise RecipeError(f"need --batch >= 1 and --seq-len >= 2 (got {batch} and {seq_len})")
    if not 0 < response <= 1:
        raise RecipeError(f"--response is the supervised fraction of each sequence, in (0, 1]; got {response}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    start = seq_len - max(2, math.ceil(seq_len * response))  # at least one shifted target
    labels[:, start:] = ids[:, start:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "class_labels": torch.zeros(batch, dtype=torch.long)}


def recipe_batch(recipe: Recipe, tokenizer, batch: int) -> dict:
    """The first ``batch`` examples of the recipe's own data, as ``l2d train`` collates them."""
    from .batching import Collator
    from .data import build_dataset, null_class_label

    categories = tuple(recipe.l2d.class_names)
    data, _ = build_dataset(recipe.data.sources, tokenizer, max_length=recipe.data.max_length, categories=categories,
                            chat_template=recipe.data.chat_template, system_prompt=recipe.data.system_prompt)
    if len(data) < batch:
        raise RecipeError(f"--data: the recipe's data has {len(data)} usable examples, fewer than "
                          f"--batch {batch}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad, null_label=null_class_label(categories))
    return collate([data[i] for i in range(batch)])


# --- one step --------------------------------------------------------------------------------
@dataclass
class Variant:
    """One row of the table: a method, and for l2d whether its self-conditioning pass runs."""

    method: str
    self_conditioning: bool | None = None
    times: list = field(default_factory=list)
    memory: float = float("nan")
    flops: float = float("nan")

    @property
    def name(self) -> str:
        if self.self_conditioning is None:
            return {"lora": "LoRA", "full": "full fine-tune"}.get(self.method, self.method)
        return f"L2D, {'with' if self.self_conditioning else 'no'} self-cond pass"


def _autocast(device: torch.device, mixed_precision: str):
    if mixed_precision in (None, "no"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model, method: str, optimizer, batch: dict, mixed_precision: str = "no",
               self_conditioning: bool | None = None) -> None:
    """Forward, backward of the mean response cross-entropy, optimizer step."""
    from .train import batch_loss

    device = next(p.device for p in model.parameters())
    with _autocast(device, mixed_precision):
        if method == "l2d":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        class_labels=batch["class_labels"], reduction="sum", self_conditioning=self_conditioning)
            loss, n = out.loss, int(out.num_tokens)
        else:
            loss, n = batch_loss(model, method, batch)
    (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, method: str, optimizer, batch: dict, variants: list[Variant], repeats: int, warmup: int,
            mixed_precision: str, device: torch.device, flops: bool = True, memory: bool = True) -> None:
    """Fill each variant's times (interleaved repeats), peak memory and FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(v: Variant):
        train_step(model, method, optimizer, batch, mixed_precision, v.self_conditioning)

    for _ in range(warmup):  # also creates the optimizer state, which then counts as resident
        for v in variants:
            run(v)
    for _ in range(repeats):
        for v in variants:  # interleaved: machine noise hits both L2D variants alike
            synchronize(device)
            t0 = time.perf_counter()
            run(v)
            synchronize(device)
            v.times.append(time.perf_counter() - t0)
    meter = memory_meter(device)[1] if memory else None  # none there: the column stays empty
    for v in variants:
        if meter is not None:
            with meter() as peak:
                run(v)
            v.memory = float(peak.delta)
        if flops:
            with FlopCounterMode(display=False) as counter:
                run(v)
            v.flops = float(counter.get_total_flops())


# --- the whole benchmark ---------------------------------------------------------------------
def _load_for(recipe: Recipe, device: torch.device):
    from .train import load_recipe_base

    base, tokenizer = load_recipe_base(recipe)
    return base.to(device), tokenizer


def run_bench(recipe: Recipe, methods=("l2d", "lora"), batch: int = 4, seq_len: int = 256, response: float = 0.5,
              use_data: bool = False, repeats: int = 3, warmup: int = 1, device: str | None = None,
              flops: bool = True, memory: bool = True, load=None, progress: bool = True) -> dict:
    """Benchmark ``recipe``'s training step for each of ``methods``; returns the results as a dict
    (``rows``: one per table row; ``batch``: its shape and supervised tokens).

    ``load(recipe, device) -> (base, tokenizer)`` loads a fresh base for each method (default: the
    recipe's ``model`` section through :func:`l2d.pretrained.load_base`).
    """
    from .train import build_model, optimizer_groups

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise RecipeError(f"unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    if repeats < 1 or warmup < 0:
        raise RecipeError(f"need --repeats >= 1 and --warmup >= 0 (got {repeats} and {warmup})")
    if not use_data:
        synthetic_batch(8, batch, seq_len, response)  # bad shapes fail here, before any model is loaded
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = load or _load_for
    p_sc = recipe.l2d.self_conditioning
    rows, shape = [], None
    for method in methods:
        r = copy.deepcopy(recipe)
        r.method = method
        torch.manual_seed(r.train.seed)
        base, tokenizer = load(r, dev)
        if shape is None:
            data = recipe_batch(r, tokenizer, batch) if use_data else synthetic_batch(
                base.get_input_embeddings().weight.shape[0], batch, seq_len, response, r.train.seed)
            shape = {"batch": list(data["input_ids"].shape), "tokens": int(data["attention_mask"].sum()),
                     "supervised": int((data["labels"][:, 1:] != -100).sum())}
            data = {k: v.to(dev) for k, v in data.items()}
        model = build_model(r, base).to(dev)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW(optimizer_groups(model, r), lr=r.train.lr, betas=tuple(r.train.betas),
                                      eps=r.train.eps)
        # L2D: each setting of the self-conditioning pass that training draws (both for 0 < p < 1)
        variants = ([Variant("l2d", sc) for sc, weight in ((False, 1 - p_sc), (True, p_sc)) if weight > 0]
                    if method == "l2d" else [Variant(method)])
        if progress:
            print(f"{method} ...", flush=True)
        measure(model, method, optimizer, data, variants, repeats, warmup, r.train.mixed_precision, dev,
                flops=flops, memory=memory)
        for v in variants:
            rows.append({"name": v.name, "method": method, "self_conditioning": v.self_conditioning,
                         "trainable": trainable, "time": statistics.median(v.times), "times": v.times,
                         "memory": v.memory, "flops": v.flops})
        if len(variants) == 2:  # the step training actually takes on average
            off, on = rows[-2], rows[-1]
            rows.append({"name": f"L2D, expected (p={p_sc:g})", "method": "l2d", "self_conditioning": p_sc,
                         "trainable": trainable, "time": (1 - p_sc) * off["time"] + p_sc * on["time"],
                         "times": [], "memory": max(off["memory"], on["memory"]),
                         "flops": (1 - p_sc) * off["flops"] + p_sc * on["flops"]})
        del model, optimizer, base
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(dev), "model": recipe.model.name_or_path, "mixed_precision": recipe.train.mixed_precision,
            "batch": shape, "rows": rows, "memory_measure": memory_meter(dev)[0] if memory else None}


def format_table(result: dict) -> str:
    """Markdown table of :func:`run_bench`'s result, ratios against LoRA when it ran."""
    rows = result["rows"]
    ref = next((r for r in rows if r["method"] == "lora"), None)
    b = result["batch"]
    lines = [f"{result['model']} on {result['device']} (mixed precision: {result['mixed_precision']}), batch "
             f"{b['batch'][0]} x {b['batch'][1]}: {b['tokens']} tokens, {b['supervised']} supervised"
             + (f"; peak memory: {result['memory_measure']} above the start of the step"
                if result.get("memory_measure") else ""),
             "",
             "| method | trainable params | step time (s) | tokens/s | peak memory (MiB) | GFLOPs/step "
             "| time vs LoRA | memory vs LoRA | FLOPs vs LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ratio(x, key):
        if ref is None or math.isnan(x) or math.isnan(ref[key]) or ref[key] <= 0:
            return "-"
        return f"{x / ref[key]:.2f}x"

    for r in rows:
        mem = "-" if math.isnan(r["memory"]) else f"{r['memory'] / 2**20:.0f}"
        fl = "-" if math.isnan(r["flops"]) else f"{r['flops'] / 1e9:.1f}"
        lines.append(f"| {r['name']} | {r['trainable']:,d} | {r['time']:.3f} | {b['tokens'] / r['time']:.0f} | {mem} "
                     f"| {fl} | {ratio(r['time'], 'time')} | {ratio(r['memory'], 'memory')} "
                     f"| {ratio(r['flops'], 'flops')} |")
    return "\n".join(lines)
