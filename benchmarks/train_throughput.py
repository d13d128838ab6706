"""Throughput, peak memory and loss curves of L2D against peft LoRA through `l2d train` itself.

    python benchmarks/train_throughput.py [--recipe recipes/smollm2-135m/arithmetic.yaml]
                                          [--steps 60] [--chunk 20] [--out runs/bench-throughput]

Both methods run the same recipe (same data, batches, schedule), only `method` differs. They run
interleaved in chunks of `--chunk` steps (`--stop-after`, then `--resume`), so machine noise hits
both alike; the resumed runs continue exactly where they stopped.

- tokens/s: all non-padding input tokens over the summed step times of `metrics.jsonl` (step 1,
  the warm-up, left out), per method.
- peak memory: the maximum resident set size of the training process (`os.wait4` rusage), max
  over its chunks: the whole process, base model included.
- loss curves: `metrics.jsonl` of each run; a plot is written when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/smollm2-135m/arithmetic.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--chunk", type=int, default=20)
    ap.add_argument("--out", default="runs/bench-throughput")
    args = ap.parse_args()
    methods = ("l2d", "lora")
    outs = {m: Path(args.out) / m for m in methods}
    peak = {m: 0 for m in methods}
    done = 0
    while done < args.steps:
        for m in methods:
            peak[m] = max(peak[m], run_chunk_rss(args.recipe, m, outs[m], args.steps, args.chunk, first=done == 0))
        done += args.chunk
        print(f"{min(done, args.steps)}/{args.steps} steps", flush=True)

    rows = {m: [json.loads(ln) for ln in (outs[m] / "metrics.jsonl").read_text().splitlines()] for m in methods}
    print(f"\n{args.recipe}, {args.steps} steps, interleaved chunks of {args.chunk}\n")
    print("| method | tokens/s | supervised tokens/s | median step (s) | peak RSS (MiB) | loss first 10 | loss last 10 |")
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        r = rows[m][1:]
        tok = sum(x["tokens"] for x in r) / sum(x["step_time_s"] for x in r)
        sup = sum(x["supervised_tokens"] for x in r) / sum(x["step_time_s"] for x in r)
        med = sorted(x["step_time_s"] for x in r)[len(r) // 2]
        first = sum(x["loss"] for x in rows[m][:10]) / len(rows[m][:10])
        last = sum(x["loss"] for x in rows[m][-10:]) / len(rows[m][-10:])
        print(f"| {m} | {tok:,.0f} | {sup:,.0f} | {med:.2f} | {peak[m] / 2**20:,.0f} | {first:.3f} | {last:.3f} |")
    print("\nloss by step (mean over windows of 10 steps):")
    print("| steps | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for s in range(0, args.steps, 10):
        vals = []
        for m in methods:
            w = [x["loss"] for x in rows[m] if s < x["step"] <= s + 10]
            vals.append(f"{sum(w) / len(w):.3f}" if w else "")
        print(f"| {s + 1}-{s + 10} | " + " | ".join(vals) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m in methods:
            ax.plot([x["step"] for x in rows[m]], [x["loss"] for x in rows[m]], label=m)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("response cross-entropy")
        ax.set_title(Path(args.recipe).stem + ": L2D vs LoRA (same script, data, schedule)")
        ax.legend()
        fig.tight_layout()
        path = Path(args.out) / "loss_curves.png"
        fig.savefig(path, dpi=120)
        print(f"\nplot: {path}")
    except ImportError:
        pass


def run_chunk_rss(recipe, method, out, steps, chunk, first):
    """Run one chunk as a child process and return its peak RSS in bytes (from wait4's rusage)."""
    cmd = [sys.executable, "-m", "l2d", "train", recipe, "--set", f"method={method}", "--set",
           f"train.max_steps={steps}", "--set", f"train.output_dir={out}", "--set", "train.progress_bar=false",
           "--stop-after", str(chunk)]
    cmd += ["--overwrite"] if first else ["--resume", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return usage.ru_maxrss * 1024


if __name__ == "__main__":
    main()
