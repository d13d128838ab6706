"""Masked-diffusion adaptation of SmolLM2-135M-Instruct on 2-term arithmetic, offline, on the CPU.

    python -m l2d.mdm.demo                          # ~35 min on 2 CPU cores
    python -m l2d.mdm.demo --l2d-from runs/demo/l2d # reuse make demo's L2D adapter (same data, 80 x 32)
    python -m l2d.mdm.demo --train-steps 20 --n 40 --no-l2d            # a smoke run

1. Train with the same data, recipe and budget (recipes/smollm2-135m/arithmetic.yaml, reasoning-gym
   `basic_arithmetic`, answers only supervised, the same optimizer steps of the same batch):
   `method: mdm` (the model becomes a masked diffusion LM, bidirectional after `--anneal` steps)
   and `method: full` (the same model fine-tuned autoregressively, the AR baseline), both full
   fine-tuning at ``--lr``; and the L2D adapter at the recipe's own hyper-parameters (as `make
   demo` trains it; ``--l2d-from`` reuses one trained on the same data and budget).
2. Evaluate on held-out problems (another seed; questions that occur in training removed), greedy:
   the AR base, the AR fine-tune, the L2D adapter at ``--l2d-steps`` solver steps, and the MDM at
   steps 1, 2, 4, ..., positions (all answer positions decoded at once in that many forward passes).
3. Print the loss curve and the table (accuracy, forward passes and milliseconds per answer) and
   write them to --out (results.json, table.txt).

What it shows and does not: a few minutes of CPU training cannot convert a general LM into a good
diffusion LM (the paper adapts with billions of tokens). The loss falls, and the table shows what
`steps` costs and buys at this budget on a narrow task with answers of at most `--positions`
tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..demo import RECIPE, SYSTEM_PROMPT, _machine, heldout_task
from ..demo import train_run as demo_train_run


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def train_run(method: str, out: Path, args) -> dict:
    from ..recipe import load_recipe
    from ..train import train

    if method == "l2d":  # the adapter as `make demo` trains it: the recipe's own optimizer settings
        overrides = [f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}", "train.progress_bar=false"]
        summary = demo_train_run(Path(args.recipe), "l2d", out, args.train_steps, overrides=overrides)
        summary["losses"] = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
        return summary
    overrides = [f"method={method}", f"train.output_dir={out}", f"train.max_steps={args.train_steps}",
                 f"train.batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
                 f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}", f"train.warmup_steps={args.warmup}",
                 "train.loraplus_lr_ratio=1.0", "train.save_every=0", "train.keep_last=1",
                 "train.progress_bar=false", f"data.system_prompt={SYSTEM_PROMPT}",
                 f"mdm.anneal_steps={args.anneal}"]
    recipe = load_recipe(args.recipe, overrides)
    t0 = time.perf_counter()
    summary = train(recipe, overwrite=True)
    summary["seconds"] = time.perf_counter() - t0
    summary["losses"] = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return summary


def _steps_list(parser, text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--l2d-steps {text!r}: give comma-separated integers, e.g. 1,4,16")
    if any(s < 1 for s in steps):
        parser.error(f"--l2d-steps {text!r}: steps must be at least 1 (0 is the AR base, already in the table)")
    return steps


def _per_answer(row: dict, passes_per_answer: float) -> dict:
    return {"method": row["method"], "steps": row["steps"], "n": row["n"],
            "accuracy %": round(100 * row["accuracy"], 1),
            "95% CI": f"[{100 * row['low']:.1f}, {100 * row['high']:.1f}]",
            "forward passes/answer": round(passes_per_answer, 2),
            "ms/answer": round(1000 * row["seconds"] / row["n"], 1)}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[int]]:
    """The flags, checked before any work; returns them and the L2D adapter's step counts."""
    parser = argparse.ArgumentParser(prog="python -m l2d.mdm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mdm-demo", help="output folder")
    parser.add_argument("--recipe", default=str(RECIPE), help="training recipe (data, model)")
    parser.add_argument("--train-steps", type=int, default=80,
                        help="optimizer steps per training run (80: make demo's quick budget)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (full fine-tuning)")
    parser.add_argument("--warmup", type=int, default=5, help="warmup steps")
    parser.add_argument("--anneal", type=int, default=0, help="mdm.anneal_steps (0: bidirectional from the start)")
    parser.add_argument("--n", type=int, default=100, help="held-out problems")
    parser.add_argument("--positions", type=int, default=4,
                        help="answer positions the MDM decodes (answers of 2-term 2-digit arithmetic: <= 3 "
                             "tokens plus the end of turn)")
    parser.add_argument("--ar-max-new-tokens", type=int, default=8, help="AR generation budget per answer")
    parser.add_argument("--batch-size", type=int, default=100, help="prompts per generate call")
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs already in --out")
    parser.add_argument("--no-ar-finetune", action="store_true",
                        help="train and evaluate the MDM and the AR base only (half the training time)")
    parser.add_argument("--no-l2d", action="store_true", help="leave the L2D adapter out of the comparison")
    parser.add_argument("--l2d-from", metavar="DIR",
                        help="an L2D adapter trained on the same data and budget (e.g. runs/demo/l2d after "
                             "`make demo --train-steps` = --train-steps) instead of training one here")
    parser.add_argument("--l2d-steps", default="1,4,16", help="comma-separated solver steps for the L2D adapter")
    args = parser.parse_args(argv)
    l2d_steps = _steps_list(parser, args.l2d_steps)
    if args.l2d_from and not (Path(args.l2d_from) / "l2d_config.json").is_file():
        parser.error(f"--l2d-from {args.l2d_from}: no l2d_config.json there; give an `l2d train` output folder.")
    return args, l2d_steps


def train_all(args, runs: dict[str, Path]) -> dict[str, dict]:
    """Step 1: the MDM, the AR fine-tune and the L2D adapter, each unless left out or reused."""
    trained = (("mdm", "mdm"),) if args.no_ar_finetune else (("mdm", "mdm"), ("ar-full", "full"))
    if not args.no_l2d and not args.l2d_from:
        trained += (("l2d", "l2d"),)
    summaries = {}
    for name, method in () if args.skip_train else trained:
        lr = "the recipe's" if method == "l2d" else args.lr
        _say(f"training {name} (method {method}): {args.train_steps} steps x {args.batch} sequences, lr {lr}")
        summaries[name] = s = train_run(method, runs[name], args)
        curve = s["losses"]
        marks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
        print("  loss by step: " + ", ".join(f"{i + 1}: {curve[i]:.3f}" for i in marks)
              + f"  ({s['seconds']:.0f} s, {s['seconds'] / len(curve):.2f} s/step)")
    return summaries


def evaluate_all(args, task, base, tok, runs: dict[str, Path], l2d_steps: list[int]) -> tuple[list, list]:
    """Step 2: every model on the held-out problems, greedy; the rows and the cost table."""
    from ..eval.command import load_for_eval
    from ..eval.runner import evaluate

    kw = dict(batch_size=args.batch_size, seed=0, prompt_format="chat", progress=False)
    rows, table = [], []
    for name, model in (("base", base),) + ((("ar-full", None),) if not args.no_ar_finetune else ()):
        if model is None:
            model, _, _ = load_for_eval(str(runs[name]))
        row = evaluate(model, tok, task, [0], method=name, max_new_tokens=args.ar_max_new_tokens, **kw)[0]
        rows.append(row)
        # an AR answer costs one forward pass per generated token (cached keys/values)
        table.append(_per_answer(row, row["generated_tokens"] / row["n"]))
    if not args.no_l2d:
        l2d, l2d_tok, _ = load_for_eval(str(runs["l2d"]))
        for row in evaluate(l2d, l2d_tok, task, l2d_steps, method="l2d", max_new_tokens=args.ar_max_new_tokens, **kw):
            rows.append(row)
            # one main-path pass per generated token, plus `steps` evaluations of the diffusion path (its
            # stream: the recipe's top 8 of 30 layers) and the read-out
            table.append(_per_answer(row, row["generated_tokens"] / row["n"]) | {"NFE/token": row["nfe_per_token"]})
        del l2d
    mdm, mdm_tok, _ = load_for_eval(str(runs["mdm"]))
    steps = sorted({2 ** k for k in range(args.positions.bit_length()) if 2 ** k <= args.positions} | {args.positions})
    for row in evaluate(mdm, mdm_tok, task, steps, method="mdm", max_new_tokens=args.positions, **kw):
        rows.append(row)
        table.append(_per_answer(row, row["steps"]))
    return rows, table


def main(argv=None) -> int:
    args, l2d_steps = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..data import reasoning_gym_dataset
    from ..eval.metrics import format_table
    from ..eval.runner import write_json
    from ..eval.tasks import HELD_OUT_SEED
    from ..pretrained import load_smollm2
    from ..recipe import load_recipe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = load_recipe(args.recipe).data.sources[0]
    base, tok = load_smollm2()
    runs = {"mdm": out / "mdm", "ar-full": out / "ar-full", "l2d": Path(args.l2d_from or out / "l2d")}
    summaries = train_all(args, runs)

    _say("held-out problems")
    train_questions = set(reasoning_gym_dataset(source.name.split(":", 1)[-1], source.n, seed=source.seed,
                                                **source.generator_kwargs)["prompt"])
    task, removed = heldout_task(source, args.n, HELD_OUT_SEED, train_questions)
    print(f"  {len(task)} problems (seed {HELD_OUT_SEED}; {removed} that occur in training removed)")
    rows, table = evaluate_all(args, task, base, tok, runs, l2d_steps)

    text = format_table(table)
    header = (f"basic_arithmetic (2 terms, +/-), {len(task)} held-out problems, greedy; "
              f"{args.train_steps} steps x {args.batch} sequences per trained model, lr {args.lr}\n"
              f"machine: {_machine()}\ndemo wall time: {(time.perf_counter() - started) / 60:.1f} min")
    print("\n" + header + "\n\n" + text)
    (out / "table.txt").write_text(header + "\n\n" + text + "\n")
    write_json(out / "results.json", {"args": vars(args), "rows": rows, "table": table,
                                      "training": {k: {kk: v for kk, v in s.items() if kk != "data_reports"}
                                                   for k, s in summaries.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
