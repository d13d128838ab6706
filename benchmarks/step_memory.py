"""Peak memory of one training step, the default L2D path against a peft LoRA (rank 32, all linear
layers), SmolLM2-135M-Instruct on the CPU, on B sequences of T random tokens whose last half is
supervised.

    python benchmarks/step_memory.py --batch 2 --seq-len 1024
    python benchmarks/step_memory.py --batch 2 --seq-len 1024 --saved   # what the backward keeps, by node

Peak resident set size above the pre-step value, sampled every millisecond, in the step after
one warm-up step (which creates the optimizer state). L2D is measured without and with its
self-conditioning pass. The script uses only APIs the library has had since 2026-11 and keeps
its own RSS sampler, so it runs unchanged on older commits, to compare them:

    git worktree add /tmp/old REV && (cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/step_memory.py)
"""
from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time

import torch

import l2d
from l2d import L2DConfig, get_l2d_model
from l2d.pretrained import load_smollm2
from l2d.train import batch_loss


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    def __enter__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = rss()
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.delta = max(self.peak, rss()) - self.base


def saved_for_backward(loss, model) -> dict:
    """Bytes of the tensors the autograd graph of ``loss`` keeps for backward, by (node type,
    attribute); each storage counted once (whole storage, so a saved slice counts what it keeps
    alive), the model's parameters not at all. Deterministic, unlike the RSS peak."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, visited, stack, by_node = set(), set(), [loss.grad_fn], {}
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for attr in dir(fn):
            # built-in nodes expose _saved_*; custom autograd Functions (l2d_kernels, stream_mlp) saved_tensors
            if not (attr.startswith("_saved_") or attr == "saved_tensors"):
                continue
            try:
                value = getattr(fn, attr)
            except RuntimeError:  # freed or not a tensor
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in params and ptr not in seen:
                        seen.add(ptr)
                        key = (type(fn).__name__, attr)
                        by_node[key] = by_node.get(key, 0) + t.untyped_storage().nbytes()
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return by_node


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--saved", action="store_true",
                    help="instead: the bytes the L2D forward (no self-conditioning pass) keeps for backward, by "
                         "autograd node, a count that does not depend on the allocator or the machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, T = args.batch, args.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 49152, (B, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, T // 2:] = ids[:, T // 2:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "class_labels": torch.zeros(B, dtype=torch.long)}

    def step(model, method, opt, sc=None):
        if method == "l2d":
            out = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels,
                        class_labels=batch["class_labels"], reduction="sum", self_conditioning=sc)
            loss, n = out.loss, int(out.num_tokens)
        else:
            loss, n = batch_loss(model, method, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from peft import LoraConfig, get_peft_model

    print(f"l2d from {os.path.dirname(l2d.__file__)}; batch {B} x {T}, last half supervised")
    if args.saved:
        model = get_l2d_model(load_smollm2()[0], L2DConfig()).train()
        out = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels,
                    class_labels=batch["class_labels"], reduction="sum", self_conditioning=False)
        by_node = saved_for_backward(out.loss, model)
        print(f"L2D forward, tensors saved for backward: {sum(by_node.values()) / 2**20:.1f} MiB")
        for (node, attr), n in sorted(by_node.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {n / 2**20:8.1f} MiB  {node}.{attr}")
        return
    peaks = {}
    for method in ("l2d", "lora"):
        base = load_smollm2()[0]
        model = (get_l2d_model(base, L2DConfig()) if method == "l2d" else get_peft_model(
            base, LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for sc in ((False, True) if method == "l2d" else (None,)):
            step(model, method, opt, sc)
            with Peak() as peak:
                step(model, method, opt, sc)
            peaks[method, sc] = peak.delta / 2**20
        del model, opt, base
    lora = peaks["lora", None]
    print("| method | peak memory (MiB) | vs LoRA |\n|---|---|---|")
    for (method, sc), mib in peaks.items():
        name = "LoRA r=32" if method == "lora" else f"L2D, {'with' if sc else 'no'} self-cond pass"
        print(f"| {name} | {mib:.0f} | {mib / lora:.2f}x |")


if __name__ == "__main__":
    main()
