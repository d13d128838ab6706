"""Masked-diffusion adaptation of SmolLM2-135M-Instruct on 2-term arithmetic, offline, on the CPU.

    python -m l2d.mdm.demo                          # ~10 min on 2 CPU cores
    python -m l2d.mdm.demo --train-steps 20 --n 40  # a smoke run

1. Train with the same data, recipe and budget (recipes/smollm2-135m/arithmetic.yaml, reasoning-gym
   `basic_arithmetic`, answers only supervised, full fine-tuning at one learning rate):
   `method: mdm` (the model becomes a masked diffusion LM, bidirectional after `--anneal` steps)
   and `method: full` (the same model fine-tuned autoregressively, the AR baseline).
2. Evaluate on held-out problems (another seed; questions that occur in training removed), greedy:
   the AR base, the AR fine-tune, and the MDM at steps 1, 2, 4, ..., positions (all answer
   positions decoded at once in that many forward passes).
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


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def train_run(method: str, out: Path, args) -> dict:
    from ..recipe import load_recipe
    from ..train import train

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


def _per_answer(row: dict, passes_per_answer: float) -> dict:
    return {"method": row["method"], "steps": row["steps"], "n": row["n"],
            "accuracy %": round(100 * row["accuracy"], 1),
            "95% CI": f"[{100 * row['low']:.1f}, {100 * row['high']:.1f}]",
            "forward passes/answer": round(passes_per_answer, 2),
            "ms/answer": round(1000 * row["seconds"] / row["n"], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2d.mdm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mdm-demo", help="output folder")
    parser.add_argument("--recipe", default=str(RECIPE), help="training recipe (data, model)")
    parser.add_argument("--train-steps", type=int, default=60, help="optimizer steps per training run")
    parser.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (full fine-tuning)")
    parser.add_argument("--warmup", type=int, default=5, help="warmup steps")
    parser.add_argument("--anneal", type=int, default=0, help="mdm.anneal_steps (0: bidirectional from the start)")
    parser.add_argument("--n", type=int, default=100, help="held-out problems")
    parser.add_argument("--positions", type=int, default=4,
                        help="answer positions the MDM decodes (answers of 2-term 2-digit arithmetic: <= 3 "
                             "tokens plus the end of turn)")
    parser.add_argument("--ar-max-new-tokens", type=int, default=8, help="AR generation budget per answer")
    parser.add_argument("--batch-size", type=int, default=25, help="evaluation batch size")
    parser.add_argument("--skip-train", action="store_true", help="reuse the runs already in --out")
    parser.add_argument("--no-ar-finetune", action="store_true",
                        help="train and evaluate the MDM and the AR base only (half the training time)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..data import reasoning_gym_dataset
    from ..eval.command import load_for_eval
    from ..eval.metrics import format_table
    from ..eval.runner import evaluate, write_json
    from ..eval.tasks import HELD_OUT_SEED
    from ..pretrained import load_smollm2
    from ..recipe import load_recipe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = load_recipe(args.recipe).data.sources[0]
    base, tok = load_smollm2()

    runs = {"mdm": out / "mdm", "ar-full": out / "ar-full"}
    trained = (("mdm", "mdm"),) if args.no_ar_finetune else (("mdm", "mdm"), ("ar-full", "full"))
    summaries = {}
    if not args.skip_train:
        for name, method in trained:
            _say(f"training {name} (method {method}): {args.train_steps} steps x {args.batch} sequences, lr {args.lr}")
            summaries[name] = s = train_run(method, runs[name], args)
            curve = s["losses"]
            marks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
            print(f"  loss by step: " + ", ".join(f"{i + 1}: {curve[i]:.3f}" for i in marks)
                  + f"  ({s['seconds']:.0f} s, {s['seconds'] / len(curve):.2f} s/step)")

    _say("held-out problems")
    train_questions = set(reasoning_gym_dataset(source.name.split(":", 1)[-1], source.n, seed=source.seed,
                                                **source.generator_kwargs)["prompt"])
    task, removed = heldout_task(source, args.n, HELD_OUT_SEED, train_questions)
    print(f"  {len(task)} problems (seed {HELD_OUT_SEED}; {removed} that occur in training removed)")
    kw = dict(batch_size=args.batch_size, seed=0, prompt_format="chat", progress=False)

    rows, table = [], []
    for name, model in (("base", base),) + ((("ar-full", None),) if not args.no_ar_finetune else ()):
        if model is None:
            model, _, _ = load_for_eval(str(runs[name]))
        row = evaluate(model, tok, task, [0], method=name, max_new_tokens=args.ar_max_new_tokens, **kw)[0]
        rows.append(row)
        # an AR answer costs one forward pass per generated token (cached keys/values)
        table.append(_per_answer(row, row["generated_tokens"] / row["n"]))
    mdm, mdm_tok, _ = load_for_eval(str(runs["mdm"]))
    steps = sorted({2 ** k for k in range(args.positions.bit_length()) if 2 ** k <= args.positions} | {args.positions})
    for row in evaluate(mdm, mdm_tok, task, steps, method="mdm", max_new_tokens=args.positions, **kw):
        rows.append(row)
        table.append(_per_answer(row, row["steps"]))
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
