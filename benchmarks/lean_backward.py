"""What the memory-lean pieces of the stream buy: the default L2D training step (SmolLM2-135M-Instruct,
CPU) with each piece on and off, side by side in one process, interleaved repeats.

    python benchmarks/lean_backward.py [--batches 4x256,32x~40] [--repeats 3] [--threads 2]

Pieces: ``mlp`` (the stream's MLP through ``l2d/stream_mlp.py``, and with ``context="adapted"`` the
context pass's too; off: the frozen module with the deltas on hooks) and ``norm`` (the modulated norm's own backward, ``kernels/l2d_kernels/modulated_norm_torch.py``,
off: ``reference.modulated_norm_ref`` op by op). Both compute the same values and gradients; they
differ in what autograd keeps. Per variant: median step time (forward, backward, AdamW, no
self-conditioning pass), the peak C heap in use in one more step, and the bytes the graph keeps
for backward (each storage once, parameters excluded).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import l2d_kernels.dispatch as dispatch
from l2d import L2DConfig, get_l2d_model
from l2d.bench import PeakHeap, heap_in_use, train_step
from l2d.pretrained import load_smollm2
from l2d_kernels.reference import modulated_norm_ref
from train_step import make_batch

VARIANTS = {"both on (default)": (True, True), "mlp off": (False, True), "norm off": (True, False),
            "both off": (False, False)}


@contextlib.contextmanager
def pieces(model, mlp: bool, norm: bool):
    parts = [block.mlp_deltas.parts for block in model.path.blocks]
    lean_norm = dispatch.modulated_norm_torch
    if not mlp:
        for block in model.path.blocks:
            block.mlp_deltas.parts = None
    if not norm:
        dispatch.modulated_norm_torch = modulated_norm_ref
    try:
        yield
    finally:
        for block, p in zip(model.path.blocks, parts):
            block.mlp_deltas.parts = p
        dispatch.modulated_norm_torch = lean_norm


def kept_for_backward(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for the step's backward (no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "class_labels")},
                    reduction="sum", self_conditioning=False)
    del out
    return sum(kept.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="4x256,32x~40",
                    help="comma-separated batch kinds of train_step.py: 4x256, 32x~40 (response = the last half; "
                         "KIND:F for the last fraction F) or arith32 (default: 4x256,32x~40)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant, interleaved (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, _ = load_smollm2()
    model = get_l2d_model(base, L2DConfig()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = base.get_input_embeddings().weight.shape[0]
    print("| batch | variant | step time (s) | peak heap (MiB) | kept for backward (MiB) | time vs default "
          "| heap vs default |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.batches.split(","):
        batch = make_batch(kind, vocab)
        times = {name: [] for name in VARIANTS}
        for rep in range(args.repeats + 1):  # the first round warms up (and creates the AdamW state)
            for name, flags in VARIANTS.items():
                with pieces(model, *flags):
                    t0 = time.perf_counter()
                    train_step(model, "l2d", opt, batch, self_conditioning=False)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
        rows = {}
        for name, flags in VARIANTS.items():
            with pieces(model, *flags):
                heap = float("nan")
                if heap_in_use() is not None:
                    with PeakHeap() as peak:
                        train_step(model, "l2d", opt, batch, self_conditioning=False)
                    heap = peak.delta
                kept = kept_for_backward(model, batch)
            rows[name] = (statistics.median(times[name]), heap, kept)
        t0, h0, _ = rows["both on (default)"]
        for name, (t, heap, kept) in rows.items():
            print(f"| {kind} | {name} | {t:.2f} | {heap / 2**20:.0f} | {kept / 2**20:.1f} | {t / t0:.2f}x "
                  f"| {heap / h0:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
