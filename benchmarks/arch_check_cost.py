"""What the wrap-time architecture check costs on SmolLM2-135M, against loading the model.

Times (median of ``--repeats``, after one warm-up each): loading SmolLM2 from the offline
safetensors cache (``l2d.pretrained.load_smollm2``); the hand-written fast path
(``ArchAdapter`` without the check); the check alone (``l2d.arch_check.check``: one forward of
the frozen model on 2 x 6 tokens plus every layer rebuilt); deriving the spec as for an unknown
family (``l2d.arch_derive.derive_spec``: one traced forward, the probes, then the check); and
``get_l2d_model`` of the default ``L2DConfig`` (the fast path, as users get it for llama).

    .venv/bin/python benchmarks/arch_check_cost.py [--repeats 5] [--threads 2] [--dtype float32]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

from l2d import L2DConfig, get_l2d_model
from l2d.arch import ArchAdapter
from l2d.arch_check import check
from l2d.arch_derive import derive_spec
from l2d.pretrained import load_smollm2


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    load_s, (model, _) = timed(lambda: load_smollm2(dtype=dtype), args.repeats)
    rows = [("load_smollm2 (offline cache)", load_s, None)]
    fast_s, _ = timed(lambda: ArchAdapter(model, verify=False), args.repeats)
    rows.append(("hand-written spec, no check", fast_s, None))
    check_s, err = timed(lambda: check(ArchAdapter(model, verify=False)), args.repeats)
    rows.append(("check (30 layers rebuilt, 2 x 6 tokens)", check_s, f"max rel. error {err:.1e}"))
    derive_s, spec = timed(lambda: _derive_fresh(model), args.repeats)
    rows.append(("derive + check (as an unknown family)", derive_s, f"q {spec.q_layout}, {spec.norm_kind}"))
    wrap_s, _ = timed(lambda: get_l2d_model(model, L2DConfig()), args.repeats)
    rows.append(("get_l2d_model, default L2DConfig", wrap_s, None))

    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'step':<42} {'seconds':>8} {'/ load':>7}  note")
    for name, seconds, note in rows:
        print(f"{name:<42} {seconds:8.3f} {seconds / load_s:7.3f}  {note or ''}")


def _derive_fresh(model):
    """derive_spec without the once-per-model memo (so every repeat pays the check)."""
    from l2d import arch_check

    arch_check._VERIFIED.pop(model, None)
    return derive_spec(model)


if __name__ == "__main__":
    main()
