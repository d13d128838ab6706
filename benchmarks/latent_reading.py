"""Does the diffusion path learn to read its latent? A seconds-long probe on a tiny random Llama.

The context is random tokens, so it predicts nothing about the next token: only the noisy latent
``x_t`` of that token can. A path that reads its latent drives the loss at ``t = 0.99`` (latent
nearly clean) far below ``ln V`` while ``t = 0.5`` (mostly noise at sigma 64) stays near it.

    python benchmarks/latent_reading.py                       # L2DConfig() defaults, 5 seeds
    python benchmarks/latent_reading.py --preset paper        # L2DConfig.paper()
    python benchmarks/latent_reading.py --set adaln_scale=1.0 --set class_init_std=1.0

Prints the loss at each probe ``t`` per seed and the median; ``tests/test_latent_reading.py``
runs the same probe on the defaults.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from l2d.latent_probe import probe_latent_reading  # noqa: E402
from l2d import L2DConfig  # noqa: E402


def _parse_sets(items):
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        else:
            value = {"None": None, "true": True, "false": False}.get(value, value)
        out[key] = value
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["default", "paper"], default="default",
                   help="L2DConfig() or L2DConfig.paper() before --set overrides.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an L2DConfig field (repeatable).")
    p.add_argument("--steps", type=int, default=300, help="AdamW steps.")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..n-1).")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate.")
    p.add_argument("--t", type=float, nargs="+", default=[0.99, 0.9, 0.5], help="probe times.")
    p.add_argument("--train-t", type=float, default=None,
                   help="train at this one t instead of the schedule (a diagnostic).")
    p.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = _parse_sets(args.set)
    rows = []
    for seed in range(args.seeds):
        config = (L2DConfig.paper(**overrides) if args.preset == "paper" else L2DConfig(**overrides))
        start = time.perf_counter()
        losses = probe_latent_reading(config, steps=args.steps, seed=seed, lr=args.lr, probe_t=args.t,
                                      train_t=args.train_t)
        rows.append(losses)
        print(f"seed {seed}: " + "  ".join(f"t={t:g} {losses[t]:.3f}" for t in args.t)
              + f"  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"\npreset {args.preset}, overrides {overrides or '-'}, {args.steps} steps, lr {args.lr}, "
          f"ln V = {math.log(96):.2f}")
    print("| t | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | median |")
    print("|---" * (args.seeds + 2) + "|")
    for t in args.t:
        vals = [r[t] for r in rows]
        print(f"| {t:g} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {statistics.median(vals):.2f} |")


if __name__ == "__main__":
    main()
