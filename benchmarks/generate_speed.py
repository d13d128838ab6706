"""Generation speed of ``L2DModel.generate(steps=N)`` against ``base.generate`` (issue 3), on the CPU.

    python benchmarks/generate_speed.py             # SmolLM2-135M-Instruct, batch 1 and 8, 64 tokens
    python benchmarks/generate_speed.py --quick     # a short run (fewer tokens, steps, repeats)
    python benchmarks/generate_speed.py --profile   # also profile one diffusion evaluation
    python benchmarks/generate_speed.py --stream-layers 8   # the stream in the top 8 layers only

What it measures. SmolLM2-135M-Instruct (offline, ``l2d.pretrained.load_smollm2``) wrapped with a
fresh, randomly initialised diffusion path (``get_l2d_model(base, L2DConfig())``; the weights do not
change the work, and the zero-initialised gates are randomised so nothing is skipped by accident).
Every run generates exactly ``--new-tokens`` tokens: ``base.generate`` with ``min_new_tokens`` equal
to ``max_new_tokens`` (end-of-sequence suppressed), ``model.generate`` with ``eos_token_id=[]``.
Greedy decoding, a fixed chat prompt repeated over the batch (no padding).

The settings (``base.generate``, l2d ``steps=0``, and every (solver, steps)) are run in rounds:
each round runs every setting once, in an order rotated from round to round, so that a load
change on the shared machine hits all settings alike. Times are medians over the rounds.

Columns (per batch size):
- ``ms/token``: wall time of one ``generate`` call divided by the new tokens (prefill included,
  amortised; the prompt is short).
- ``x base``: that time over ``base.generate``'s, measured in the same rounds.
- ``NFE/token``: diffusion evaluations per generated token (from ``return_dict_in_generate``).
- ``eval / base step``: the derived cost of one diffusion evaluation relative to one
  ``base.generate`` decoding step, ``(t(steps) - t(steps=0)) / NFE / t(base)``, all three per
  generated token, ``t(steps=0)`` being l2d's own token loop without the path. Below the table the
  same quantity from a least-squares line of ``t`` against NFE over all settings with NFE > 0.

The issue's target is ``eval / base step <= 0.35``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from l2d.bench_generate import label, measure, prompt_ids, randomize_zero_parameters  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment() -> str:
    import transformers

    return (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible) | torch {torch.__version__} "
            f"({torch.get_num_threads()} threads) | transformers {transformers.__version__} | "
            f"python {platform.python_version()}")


def build(seed: int, stream_layers: int | None = None):
    from l2d import L2DConfig, get_l2d_model
    from l2d.pretrained import load_smollm2

    base, tok = load_smollm2()
    torch.manual_seed(seed)
    model = get_l2d_model(base, L2DConfig(stream_layers=stream_layers)).eval()
    randomize_zero_parameters(model)  # non-zero gates: the timing must not depend on exact zeros anywhere
    return model, tok


def fit_slope(points):
    """Least-squares slope and intercept of y against x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    return slope, my - slope * mx


def table(batch, settings, med, nfe, raw):
    base = ("base", None, 0)
    zero = ("l2d", "euler", 0)
    tb, t0 = med[base], med[zero]
    lines = [f"batch {batch}",
             "| setting | ms/token | x base | NFE/token | eval / base step | spread (min-max ms/token) |",
             "|---|---:|---:|---:|---:|---:|"]
    points = []
    for s in settings:
        t = med[s]
        per_eval = "" if nfe[s] == 0 else f"{(t - t0) / nfe[s] / tb:.3f}"
        if nfe[s] > 0:
            points.append((nfe[s], t))
        lines.append(f"| {label(s)} | {1e3 * t:.1f} | {t / tb:.2f} | {nfe[s]:.0f} | {per_eval} | "
                     f"{1e3 * min(raw[s]):.1f}-{1e3 * max(raw[s]):.1f} |")
    if len(points) >= 2:
        slope, icpt = fit_slope(points)
        lines.append(f"\nleast-squares fit over the {len(points)} settings with NFE > 0: t/token = "
                     f"{1e3 * icpt:.1f} ms + NFE x {1e3 * slope:.2f} ms  ->  one evaluation = "
                     f"{slope / tb:.3f} x one base.generate step ({1e3 * tb:.1f} ms); "
                     f"l2d steps=0 loop = {t0 / tb:.2f} x base.generate")
    return "\n".join(lines)


def profile_eval(model, tok, batch: int, rows: int):
    """Profile the diffusion evaluations of one token (euler, 8 steps: 9 evaluations)."""
    from torch.profiler import ProfilerActivity, profile

    from l2d import generation as G

    ids, mask = prompt_ids(tok, batch)
    # a short generate first so the cache holds a realistic context, then profile one token's solve
    model.generate(ids, mask, max_new_tokens=2, steps=1, eos_token_id=[])
    cls = model.class_tensor(None, batch)
    Z = model.latent_table().float()
    main = model.run_main_path(ids, mask)
    h_last = main.hidden[:, -1:]
    # the t-only parts are shared by every token of a generate call: warm them as generate would
    args = (model, main, h_last, cls, Z, G.SolverSettings(steps=8), None, G.ConditioningCache(model, cls))
    with torch.no_grad():
        G._solve_token(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            G._solve_token(*args)
    print(f"\nprofile: batch {batch}, one token, euler steps=8 (9 evaluations, the one at t=0 skips the blocks), "
          f"t-only parts cached, prompt {ids.shape[1]} tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                   help="batch sizes to measure (default: 1 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call (default: 64)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="fixed-grid steps per token, besides steps=0 which is always run (default: 1 2 4 8 16)")
    p.add_argument("--solvers", nargs="+", default=["euler", "midpoint"],
                   help="fixed-grid solvers (default: euler midpoint)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds; each round runs every setting once, order rotated (default: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random diffusion path (default: 0)")
    p.add_argument("--stream-layers", type=int, default=None, metavar="K",
                   help="L2DConfig(stream_layers=K): the diffusion stream in the top K decoder layers only, so "
                        "every evaluation runs K blocks instead of one per layer (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="short run: 16 tokens, steps 1 4, euler only, 1 round (overrides those flags)")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, profile one token's solve (9 evaluations) per batch size")
    p.add_argument("--profile-only", action="store_true", help="only the profile, no timings")
    p.add_argument("--profile-rows", type=int, default=25, help="rows of the profile table (default: 25)")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.steps, args.solvers, args.rounds = 16, [1, 4], ["euler"], 1
    if args.threads:
        torch.set_num_threads(args.threads)

    print(environment())
    model, tok = build(args.seed, args.stream_layers)
    print(f"model: SmolLM2-135M-Instruct (float32), path {model.get_nb_trainable_parameters()[0]:,d} params, "
          f"stream through {len(model.path.stream_blocks)} of {model.arch.num_layers} layers, "
          f"vocab {model.vocab_size}")
    if not args.profile_only:
        settings = [("base", None, 0), ("l2d", "euler", 0)] + [
            ("l2d", solver, s) for solver in args.solvers for s in args.steps if s > 0]
        print(f"command: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}")
        print(f"{args.new_tokens} new tokens, {args.rounds} rounds, medians\n")
        for batch in args.batch_sizes:
            med, nfe, raw = measure(model, tok, batch, settings, args.new_tokens, args.rounds,
                                    lambda m: print(m, file=sys.stderr, flush=True))
            print(table(batch, settings, med, nfe, raw), "\n", flush=True)
    if args.profile or args.profile_only:
        for batch in args.batch_sizes:
            profile_eval(model, tok, batch, args.profile_rows)


if __name__ == "__main__":
    main()
