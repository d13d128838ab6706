"""`l2d eval`: evaluate an adapter (or the base) on a task at several step counts.

    l2d eval runs/adapter --task gsm8k --steps 0,2,4,8,16 --plot steps.png
    l2d eval runs/adapter --task humaneval --steps 8 --samples 10      # pass@1, pass@10
    l2d eval base --base smollm2-135m-instruct --task basic_arithmetic --n 100

ADAPTER is an L2D adapter folder (l2d_config.json), a peft adapter folder (adapter_config.json,
e.g. the LoRA baseline of `l2d train`), a full model folder (config.json), or `base` for the
base model alone. The base comes from --base, else the adapter's recipe.yaml, else its config.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..loading import BASE_ONLY, adapter_kind, default_base  # noqa: F401  (as l2d.eval.command's before)
from ..loading import load_trained as load_for_eval  # noqa: F401


def _parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated integers, got {text!r}") from None
    if not steps or any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"--steps takes non-negative integers, got {text!r}")
    return steps


def check_task(name: str) -> None:
    """An unknown task name fails before any model loads, naming the closest known one."""
    from ..suggest import did_you_mean
    from .tasks import TASKS

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}{did_you_mean(name, TASKS)}; pass --task with one of "
                         f"{', '.join(sorted(TASKS))}.")


def _task_kwargs(args) -> dict:
    kw = {}
    if args.data:
        kw["path"] = args.data
    if args.task in ("basic_arithmetic", "chain_sum", "gsm_symbolic"):
        kw["size"] = args.n or 200
        if args.task_seed is not None:
            kw["seed"] = args.task_seed
    elif args.n:
        kw["limit"] = args.n
    if args.num_shots is not None:
        if args.task != "gsm8k":
            raise ValueError("--num-shots applies to gsm8k only")
        kw["num_shots"] = args.num_shots
    return kw


def check_solver_args(args) -> None:
    """Unknown solvers and tolerances fail before any model loads, with the closest known solver."""
    from ..solvers import FIXED_SOLVERS, SOLVERS
    from ..suggest import did_you_mean

    if args.solver not in SOLVERS:
        raise ValueError(f"unknown solver {args.solver!r}{did_you_mean(args.solver, SOLVERS)}; pass --solver "
                         f"with one of {', '.join(SOLVERS)}.")
    if args.solver not in FIXED_SOLVERS and not (0 < args.rtol < 1 and 0 < args.atol < 1):
        raise ValueError(f"--rtol and --atol must lie in (0, 1), got {args.rtol} and {args.atol}.")
    if args.max_nfe is not None and args.max_nfe < 1:
        raise ValueError(f"--max-nfe must be a positive integer, got {args.max_nfe}.")
    if args.early_stop is not None and not 0 < args.early_stop <= 1:
        raise ValueError(f"--early-stop is a probability in (0, 1], got {args.early_stop}.")


def steps_for_solver(steps: list[int], solver: str) -> list[int | None]:
    """An adaptive solver picks its own steps: every non-zero entry of --steps becomes one adaptive
    row (``steps=None``); 0 stays the base."""
    from ..solvers import FIXED_SOLVERS

    if solver in FIXED_SOLVERS:
        return steps
    return list(dict.fromkeys(0 if s == 0 else None for s in steps))


def solver_kwargs(args) -> dict:
    """What ``generate`` takes beyond the step count: grid, read-out, tolerances, NFE cap, early stop."""
    from ..generation import EarlyStop

    kw = {"grid": args.grid, "readout": args.readout, "rtol": args.rtol, "atol": args.atol,
          "max_nfe": args.max_nfe}
    if args.early_stop is not None:
        kw["early_stop"] = EarlyStop(args.early_stop, args.early_stop_patience)
    return kw


def run_eval(args) -> int:
    from .metrics import format_table
    from .runner import evaluate, plot_rows, summary_rows, write_json
    from .tasks import get_task

    check_task(args.task)
    if args.solver is None:  # the protocol's solver
        args.solver = "midpoint" if args.protocol == "paper" else "euler"
    check_solver_args(args)
    kind = adapter_kind(args.adapter)
    if kind == "mdm" and any(s < 1 for s in args.steps):
        raise ValueError(f"{args.adapter!r} is a masked diffusion model: it decodes in --steps >= 1 forward passes "
                         "(at most --max-new-tokens).")
    if kind not in ("l2d", "mdm") and any(s != 0 for s in args.steps):
        raise ValueError(f"{args.adapter!r} is a {kind} model without a diffusion path: only --steps 0 applies.")
    task = get_task(args.task, **_task_kwargs(args))
    model, tok, kind = load_for_eval(args.adapter, args.base, args.dtype)
    method = args.name or {"base": "base", "peft": "lora", "full": "full", "l2d": "l2d", "mdm": "mdm"}[kind]
    gen_kw = solver_kwargs(args) if kind == "l2d" else {}
    steps = args.steps if kind == "mdm" else steps_for_solver(args.steps, args.solver)
    rows = evaluate(model, tok, task, steps, n=args.n, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, solver=args.solver, samples=args.samples,
                    temperature=args.temperature, seed=args.seed, prompt_format=args.prompt_format,
                    protocol=args.protocol,
                    method=method, keep_completions=bool(args.json), progress=not args.no_progress,
                    workers=args.workers, **gen_kw)
    # an adaptive row's steps read as its solver's name
    print(format_table([{**r, "steps": args.solver if r["steps"] is None else r["steps"]} for r in summary_rows(rows)]))
    if args.json:
        write_json(args.json, {"adapter": args.adapter, "base": args.base or default_base(args.adapter, kind),
                               "task": args.task, "args": {k: v for k, v in vars(args).items() if k != "func"},
                               "rows": rows})
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        if any(r["steps"] is None for r in rows):  # no step count to put on the x axis
            print("the plot shows the fixed-step rows only (an adaptive solve has no step count)", file=sys.stderr)
        plot_rows([r for r in rows if r["steps"] is not None], args.plot,
                  title=f"{args.task}: {os.path.basename(os.path.normpath(args.adapter))}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Register `l2d eval` on an argparse subparsers object."""
    p = sub.add_parser(
        "eval", help="evaluate an adapter on math/code tasks at several step counts",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="L2D adapter folder, peft adapter folder, full model folder, or `base`")
    p.add_argument("--base", help="base model (hub id, local folder, smollm2-135m-instruct); default: the "
                                  "adapter's recipe.yaml or config")
    p.add_argument("--task", required=True,
                   help="gsm8k, math, basic_arithmetic, chain_sum, gsm_symbolic, humaneval or mbpp")
    p.add_argument("--data", help="local jsonl for the task instead of the hub (gsm8k, math, mbpp, humaneval)")
    p.add_argument("--n", type=int, help="evaluate the first N examples (reasoning-gym tasks: generate N; default 200)")
    p.add_argument("--task-seed", type=int, help="seed of generated reasoning-gym problems (default: the held-out seed)")
    p.add_argument("--num-shots", type=int, help="few-shot examples in the prompt (gsm8k; default 8)")
    p.add_argument("--steps", type=_parse_steps, default=[0], help="comma-separated step counts, e.g. 0,2,4,8,16")
    p.add_argument("--protocol", default="greedy", choices=("greedy", "paper"),
                   help="decoding: greedy (argmax tokens, the expected latent drives the ODE) or paper (the "
                        "reference's: the argmax token's latent drives a midpoint solve, 7 steps in the paper, "
                        "and each token is sampled at temperature 1; base/LoRA models sampled at 1 too)")
    p.add_argument("--solver", default=None,
                   help="ODE solver (default: euler, or midpoint with --protocol paper): euler, midpoint, heun, "
                        "rk4 (fixed grids), or dopri5, bosh3, adaptive_heun "
                        "(adaptive: each non-zero --steps entry becomes one row whose steps --rtol/--atol choose)")
    p.add_argument("--rtol", type=float, default=1e-3, help="adaptive solvers' relative tolerance (default 1e-3)")
    p.add_argument("--atol", type=float, default=1e-3, help="adaptive solvers' absolute tolerance (default 1e-3)")
    p.add_argument("--max-nfe", type=int, help="cap on diffusion-path evaluations per token (any solver)")
    p.add_argument("--early-stop", type=float, metavar="P",
                   help="end a token's solve once its argmax repeats with probability >= P (EarlyStop)")
    p.add_argument("--early-stop-patience", type=int, default=2, metavar="N",
                   help="evaluations the argmax must hold for --early-stop (default 2)")
    p.add_argument("--grid", default="uniform", help="time grid of fixed solvers: uniform or cosmap")
    p.add_argument("--readout", default="final", help="final (one evaluation at t=1) or last")
    p.add_argument("--samples", type=int, default=1, help="completions per problem; >1 samples at --temperature "
                                                          "and reports pass@1 and pass@k")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget per completion")
    p.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "plain"),
                   help="chat template, few-shot plain text, or auto (chat when the tokenizer has a template)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the base is loaded in")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise and of sampling")
    p.add_argument("--workers", type=int, default=2, help="parallel sandboxes for code tasks")
    p.add_argument("--name", help="method name in the table and JSON (default: base, lora, full or l2d)")
    p.add_argument("--json", metavar="PATH", help="write rows and completions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of accuracy and NFE per token against steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)
    return p
