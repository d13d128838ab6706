"""Ablations for the sample-efficiency question (issue 7), on the VALIDATION split only.

Each setting trains an adapter on the demo's recipe (SmolLM2-135M-Instruct, 2-term arithmetic,
same data, seed and step budget) with some overrides, then scores it on validation problems (a
seed of their own, no question shared with training) at several step counts. Held-out numbers
come once, from the demo, with the defaults chosen here.

    python benchmarks/ablate.py --steps 100 --n 128 --eval-steps 0,1,2,4,16 paper main-open-head0 lora
    python benchmarks/ablate.py --list       # every setting and its overrides
    python benchmarks/ablate.py --table      # results.jsonl as a markdown table
    python benchmarks/ablate.py --n 512 --curve benchmarks/sample_efficiency.png   # accuracy vs time
    python benchmarks/ablate.py --steps 80 --n 512 --no-loss --seed 1 recipe-loraplus4 lora-loraplus4  # another seed
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

# Every setting starts from the paper's method (whatever the recipe now says), then changes one
# thing at a time on top of its parent's overrides.
PAPER = ["l2d.stream_init=encoder", "l2d.merge_init=zero", "train.head_lr_scale=1.0", "l2d.context=frozen",
         "train.encoder_lr_scale=1.0", "l2d.stream_layers=null", "l2d.self_conditioning=0.5"]
MAIN = ["l2d.stream_init=main"]                      # the stream starts as the main path
MAIN_RAMP = MAIN + ["l2d.merge_init=ramp"]           # merge gate t + m(c_t) - m(c_0)
RAMP_HEAD0 = MAIN_RAMP + ["train.head_lr_scale=0.0"]  # conditioning heads frozen
OPEN_HEAD0 = MAIN + ["l2d.merge_init=open", "train.head_lr_scale=0.0"]  # the new defaults
ADAPTED = OPEN_HEAD0 + ["l2d.context=adapted"]       # the SmolLM2 recipe's path
RECIPE = ADAPTED + ["train.encoder_lr_scale=0.1", "l2d.stream_layers=8", "l2d.self_conditioning=0.0"]  # the recipe's now
RECIPE_LP4 = RECIPE + ["train.loraplus_lr_ratio=4"]
# the recipe's data source, as a YAML mapping missing its closing brace (for `n`)
ARITH = ("{name: 'rg:basic_arithmetic', seed: 0, generator_kwargs: {min_terms: 2, max_terms: 2, min_digits: 1, "
         "max_digits: 2, operators: ['+', '-'], allow_negation: false}")
ONLORA = ["model.name_or_path=runs/demo/lora-merged"]
HEADS_TRAJ = RECIPE_LP4 + ["train.head_lr_scale=1.0", "l2d.trajectory_training=0.5", "train.encoder_lr_scale=1.0"]
# the setting that made the path read its latent: encoder and latent map at 20x, sigma 8, uniform t
ENC20 = ["train.encoder_lr_scale=20.0", "l2d.sigma=8.0", "l2d.schedule=uniform"]
LORA_QO_MLP = ["method=lora", "lora.target_modules=[q_proj,o_proj,gate_proj,up_proj,down_proj]"]
SETTINGS = {
    "paper": [],                                   # the method as in DESIGN.md (and the defaults before)
    "main": MAIN,
    "main-sigma8": MAIN + ["l2d.sigma=8.0"],
    "main-nosc": MAIN + ["l2d.self_conditioning=0.0"],
    "main-lr3e-3": MAIN + ["train.lr=3e-3"],
    "paper-sigma8": ["l2d.sigma=8.0"],
    "paper-lr3e-4": ["train.lr=3e-4"],
    "main-lr3e-4": MAIN + ["train.lr=3e-4"],
    "paper-ramp": ["l2d.merge_init=ramp"],         # merge gate open from the first step
    "main-ramp": MAIN_RAMP,
    "main-ramp-nosc": MAIN_RAMP + ["l2d.self_conditioning=0.0"],
    "main-ramp-sigma8": MAIN_RAMP + ["l2d.sigma=8.0"],
    "main-ramp-uniform": MAIN_RAMP + ["l2d.schedule=uniform"],
    "main-ramp-head0.1": MAIN_RAMP + ["train.head_lr_scale=0.1"],
    "main-ramp-head0": RAMP_HEAD0,
    "main-ramp-head0-uniform": RAMP_HEAD0 + ["l2d.schedule=uniform"],
    "main-ramp-head0-ln1": RAMP_HEAD0 + ["l2d.schedule=logit_normal", "l2d.logit_normal_mean=1.0"],
    "main-ramp-head0-lr3e-3": RAMP_HEAD0 + ["train.lr=3e-3"],
    "main-ramp-head0-nosc": RAMP_HEAD0 + ["l2d.self_conditioning=0.0"],
    "main-ramp-head0-full": RAMP_HEAD0 + ["l2d.path_variant=full", "train.lr=3e-4"],
    "main-ramp-head0-r128": RAMP_HEAD0 + ["l2d.rank=128", "l2d.alpha=128"],
    # (settings of options removed after l2d 0.1.0 -- kv_rank, encoder_input, context_layers,
    # latent_init, loss_weighting -- are gone; their rows: benchmarks/README.md, "Removed options")
    "main-open-head0": OPEN_HEAD0,
    "main-open-head0-nosc": OPEN_HEAD0 + ["l2d.self_conditioning=0.0"],
    "main-open-head0-sigma8": OPEN_HEAD0 + ["l2d.sigma=8.0"],
    "main-open-head0-enc0": OPEN_HEAD0 + ["train.encoder_lr_scale=0.0"],
    # the deltas also run over every context position (a second pass of the base) and the queries
    # read that pass's keys/values: the path can change the context it reads, as a LoRA does
    "main-open-head0-adapted": ADAPTED,
    "main-open-head0-adapted-enc0": ADAPTED + ["train.encoder_lr_scale=0.0"],
    "main-open-head0-adapted-nosc": ADAPTED + ["l2d.self_conditioning=0.0"],
    "main-open-head0-adapted-enc0.1": ADAPTED + ["train.encoder_lr_scale=0.1"],  # reads x_t, learns it slowly
    "main-open-head0-adapted-lr2e-3": ADAPTED + ["train.lr=2e-3"],
    "main-open-head0-adapted-sigma16": ADAPTED + ["l2d.sigma=16.0"],
    # the recipe's path with the diffusion stream in the top k layers only (`stream_layers`): the
    # deltas of every layer still act in the context pass, the latent enters at layer 30 - k
    "main-open-head0-adapted-enc0.1-stream15": ADAPTED + ["train.encoder_lr_scale=0.1", "l2d.stream_layers=15"],
    "main-open-head0-adapted-enc0.1-stream8": ADAPTED + ["train.encoder_lr_scale=0.1", "l2d.stream_layers=8"],
    "main-open-head0-adapted-enc0.1-stream4": ADAPTED + ["train.encoder_lr_scale=0.1", "l2d.stream_layers=4"],
    "main-open-head0-adapted-enc0.1-stream8-nosc": ADAPTED + ["train.encoder_lr_scale=0.1", "l2d.stream_layers=8",
                                                              "l2d.self_conditioning=0.0"],
    # the frozen context with the stream in the top 8 layers: the deltas of the layers below are gone
    "main-open-head0-stream8": OPEN_HEAD0 + ["l2d.stream_layers=8"],
    "main-open-head0-adapted-enc0.1-stream8-lr2e-3": ADAPTED + ["train.encoder_lr_scale=0.1", "l2d.stream_layers=8",
                                                                "train.lr=2e-3"],
    # LoRA+: the B of every low-rank delta at a higher rate than A (`train.loraplus_lr_ratio`), for the
    # recipe's path and for the LoRA baseline alike
    "recipe": RECIPE,
    "recipe-loraplus4": RECIPE_LP4,
    "recipe-loraplus16": RECIPE + ["train.loraplus_lr_ratio=16"],
    "recipe-loraplus4-r64": RECIPE_LP4 + ["l2d.rank=64", "l2d.alpha=64"],
    # what was left of issue 7's list, on the recipe with LoRA+ 4 (the recipe as it now is)
    "recipe-lp4-warmup0": RECIPE_LP4 + ["train.warmup_steps=0"],
    "recipe-lp4-warmup30": RECIPE_LP4 + ["train.warmup_steps=30"],
    "recipe-lp4-n1000": RECIPE_LP4 + [f"data.sources=[{ARITH}, n: 1000}}]"],  # 2.6 epochs in 80 steps
    "recipe-lp4-mix": RECIPE_LP4 + [f"data.sources=[{ARITH}, n: 4000}}, {{name: 'rg:chain_sum', n: 2000, seed: 0}}]"],
    "main-open-head0-enc0-lr3e-3": OPEN_HEAD0 + ["train.encoder_lr_scale=0.0", "train.lr=3e-3"],
    "main-open-head0-lr3e-3-enc0.33": OPEN_HEAD0 + ["train.lr=3e-3", "train.encoder_lr_scale=0.33"],
    # L2D on top of the demo's LoRA (80 steps, merged: `make demo` writes runs/demo/lora-merged);
    # its steps=0 row is that LoRA model itself
    "onlora-main-open-head0": ONLORA + OPEN_HEAD0,
    "onlora-main-open-head0-lr3e-4": ONLORA + OPEN_HEAD0 + ["train.lr=3e-4"],
    "onlora-main-open-head0-adapted": ONLORA + ADAPTED,
    "paper-ramp-head0.1": ["l2d.merge_init=ramp", "train.head_lr_scale=0.1"],
    # the steps issue (21): the recipe's path with trainable conditioning heads (adaLN outputs x0.1,
    # the new default) and the zero merge gate, so that the path can condition on t and read x_t;
    # then training on the solver's own trajectories, and self-conditioning
    "steps-heads": RECIPE_LP4 + ["train.head_lr_scale=1.0", "l2d.merge_init=zero", "train.encoder_lr_scale=1.0"],
    "steps-heads-traj": RECIPE_LP4 + ["train.head_lr_scale=1.0", "l2d.merge_init=zero", "train.encoder_lr_scale=1.0",
                                      "l2d.trajectory_training=0.5"],
    "steps-heads-traj-sc": RECIPE_LP4 + ["train.head_lr_scale=1.0", "l2d.merge_init=zero",
                                         "train.encoder_lr_scale=1.0", "l2d.trajectory_training=0.5",
                                         "l2d.self_conditioning=0.5"],
    "steps-open-traj": RECIPE_LP4 + ["l2d.trajectory_training=0.5"],
    # open gate (fast to learn) with trainable heads (conditions on t) and the encoder at the full rate
    # (reads x_t), then trained on its own trajectories
    "steps-open-heads": RECIPE_LP4 + ["train.head_lr_scale=1.0", "train.encoder_lr_scale=1.0"],
    "steps-open-heads-traj": RECIPE_LP4 + ["train.head_lr_scale=1.0", "train.encoder_lr_scale=1.0",
                                           "l2d.trajectory_training=0.5"],
    "steps-open-heads-traj-sigma8": RECIPE_LP4 + ["train.head_lr_scale=1.0", "train.encoder_lr_scale=1.0",
                                                  "l2d.trajectory_training=0.5", "l2d.sigma=8.0"],
    # the levers left on that path (third session): the encoder at 5x (on the probe, the open gate
    # read its latent only with it), the t-schedule (uniform and logit-normal toward t = 1 at sigma 8,
    # so that most draws have a legible latent), self-conditioning
    "steps-open-heads-traj-enc5": HEADS_TRAJ[:-1] + ["train.encoder_lr_scale=5.0"],
    "steps-open-heads-traj-sigma8-uniform": HEADS_TRAJ + ["l2d.sigma=8.0", "l2d.schedule=uniform"],
    "steps-open-heads-traj-sigma8-ln1": HEADS_TRAJ + ["l2d.sigma=8.0", "l2d.schedule=logit_normal",
                                                      "l2d.logit_normal_mean=1.0"],
    "steps-open-heads-traj-sc": HEADS_TRAJ + ["l2d.self_conditioning=0.5"],
    # both levers that raised the latent's share of the stream at once, without trajectory training
    # (which trains the path to override its own wrong estimates, i.e. to ignore them)
    "steps-open-heads-enc20-sigma8-uniform": RECIPE_LP4 + ["train.head_lr_scale=1.0"] + ENC20,
    # the path that reads its latent, trained on its own trajectories as well (so that later steps
    # learn to repair what the earlier ones fed it)
    "steps-open-heads-traj-enc20-sigma8-uniform": HEADS_TRAJ[:-1] + ENC20,
    # trajectory training on the 16-step grid only (fourth session; TRAJECTORY_GRID below): every
    # evaluation of a 16-step solve, its read-out included, trained on equally often
    "steps-open-heads-traj16": HEADS_TRAJ,
    "steps-open-heads-traj16-enc20-sigma8-uniform": HEADS_TRAJ[:-1] + ENC20,
    # the same with half the draws at the read-out state (k = N): the 16-grid's evaluations improved
    # along the solve (59 -> 67% of answer tokens) and its read-out, trained on 1/16 of the draws, fell back
    "steps-open-heads-traj16r-enc20-sigma8-uniform": HEADS_TRAJ[:-1] + ENC20,
    "steps-open-traj-sc": RECIPE_LP4 + ["l2d.trajectory_training=0.5", "l2d.self_conditioning=0.5"],
    "steps-open-traj-uniform": RECIPE_LP4 + ["l2d.trajectory_training=0.5", "l2d.schedule=uniform"],
    "lora": ["method=lora"],
    "lora-lr2e-3": ["method=lora", "train.lr=2e-3"],
    "lora-loraplus4": ["method=lora", "train.loraplus_lr_ratio=4"],
    "lora-loraplus16": ["method=lora", "train.loraplus_lr_ratio=16"],
    # LoRA on the modules the path has deltas on (q, o, MLP): no change to the keys/values
    "lora-qo-mlp": LORA_QO_MLP,
    # the same LoRA acting only where the path does (benchmarks/answer_only_lora.py): context frozen
    "lora-qo-mlp-answer-only": LORA_QO_MLP,
}
# (every setting pins one rate for A and B, the recipe's before LoRA+, so that earlier rows reproduce)
SETTINGS = {name: ["train.loraplus_lr_ratio=1"] + (overrides if name.startswith("lora") else PAPER + overrides)
            for name, overrides in SETTINGS.items()}


LOSS_TIMES = (0.0, 0.5, 0.9, 0.98, 1.0)
# settings whose trajectory training always draws the grid N given here, and the share of draws
# that stop at the read-out state k = N (None: k uniform in 1..N; see trajectory_grid)
TRAJECTORY_GRID = {"steps-open-heads-traj16": (16, None), "steps-open-heads-traj16-enc20-sigma8-uniform": (16, None),
                   "steps-open-heads-traj16r-enc20-sigma8-uniform": (16, 0.5)}


@contextlib.contextmanager
def trajectory_grid(steps: int, readout_share: float | None = None):
    """Patch trajectory training to draw ``N = steps`` always and the stop ``k`` uniform in ``1..N``
    (with ``readout_share``: ``k = N`` with that probability, else uniform in ``1..N-1``).

    l2d's own draw (``l2d/trajectory.py``) takes ``N`` uniformly among the powers of two up to
    ``trajectory_steps``, so the one-step read-out state gets 1/5 of the draws and the 16-step
    read-out 1/80: training weighs the first step's correction, not the later steps'. Here every
    evaluation of an ``N``-step solve is trained on equally often. An experiment that did not pay
    (benchmarks/README.md, "Training on the late steps of the solve"), so it stays out of the
    library."""
    import torch

    import l2d.model as model_mod

    original = model_mod.draw_trajectory

    def draw(max_steps, generator=None):
        if readout_share is not None and steps > 1:
            if float(torch.rand((), generator=generator)) < readout_share:
                return steps, steps
            return steps, 1 + int(torch.randint(steps - 1, (), generator=generator))
        return steps, 1 + int(torch.randint(steps, (), generator=generator))

    model_mod.draw_trajectory = draw
    try:
        yield
    finally:
        model_mod.draw_trajectory = original


def loss_by_t(model, tokenizer, task, times=LOSS_TIMES, batch_size: int = 32) -> dict:
    """Teacher-forced cross-entropy of the gold answers (+ end of turn) at fixed ``t``, same noise
    for every ``t``: how much the path predicts from the context alone (mid ``t``, the latent is
    almost pure noise at sigma 64) and how much it reads from the latent (``t`` near 1)."""
    import torch

    from l2d.data import render_prompt

    eos = tokenizer.eos_token_id
    rows = []
    for ex in task.examples:
        prompt = tokenizer(render_prompt(tokenizer, ex.messages), add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.gold, add_special_tokens=False)["input_ids"] + [eos]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    totals = {t: 0.0 for t in times}
    count = 0
    g = torch.Generator().manual_seed(0)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = torch.tensor([i + [pad] * (T - len(i)) for i, _ in chunk])   # right padding: positions 0..n-1
        labels = torch.tensor([l + [-100] * (T - len(l)) for _, l in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in chunk])
        with torch.no_grad():
            if not hasattr(model, "path"):  # a peft or plain model: one teacher-forced loss, no t
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                         ignore_index=-100, reduction="sum")
                for t in times:
                    totals[t] += loss.item()
                count += int((labels[:, 1:] != -100).sum())
                continue
            noise = torch.randn(len(chunk), T, model.config.latent_dim, generator=g)
            for t in times:
                out = model(ids, attention_mask=mask, labels=labels, t=t, noise=noise, reduction="sum",
                            self_conditioning=False)
                totals[t] += out.loss.item()
        count += int((labels[:, 1:] != -100).sum())
    return {str(t): round(v / count, 3) for t, v in totals.items()}


def markdown_table(path: Path) -> str:
    """One row per setting (its latest record): accuracy by steps, validation loss by t, time."""
    latest = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        latest[(r["setting"], r["train_steps"], r.get("seed"))] = r
    keys = {str(s) for r in latest.values() for s in r["val_accuracy"]}
    steps = sorted(keys, key=lambda s: (not s.isdigit(), s.split("@")[0], int(s.split("@")[-1])))
    times = [str(t) for t in LOSS_TIMES]
    head = (["setting", "train steps", "train s"] + [f"acc @{s}" if s.isdigit() else f"acc {s}" for s in steps]
            + [f"loss t={t}" for t in times])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in latest.values():
        acc = [str(r["val_accuracy"].get(str(s), "")) for s in steps]
        loss = r.get("val_loss_by_t") or {}
        name = r["setting"] if r.get("seed") is None else f"{r['setting']} (seed {r['seed']})"
        cells = [name, str(r["train_steps"]), str(r["train_s"])] + acc + [str(loss.get(t, "")) for t in times]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_points(outs: list[Path], n: int, demo: Path) -> dict:
    """Validation accuracy (``n`` problems) against training seconds, per method.

    Seconds and steps come from each folder's results.jsonl (the training runs); accuracies from
    any record scored on ``n`` problems (results.jsonl or rescored.jsonl). The LoRA that the
    ``onlora-*`` settings stack on is the demo's (its seconds from ``demo``/results.json); it is
    their steps=0 row, and the stacked runs are placed at its seconds plus their own.
    """
    demo_lora_s = json.loads((demo / "results.json").read_text())["training"]["lora"]["seconds"]
    series = {"LoRA": [], "L2D (16 steps)": [], "L2D on the 80-step LoRA (16 steps)": []}
    for out in outs:
        if not (out / "results.jsonl").exists():
            continue
        trained = {}
        for line in (out / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            trained[r["setting"]] = (r["train_steps"], r["train_s"])
        for name in ("results.jsonl", "rescored.jsonl"):
            if not (out / name).exists():
                continue
            for line in (out / name).read_text().splitlines():
                r = json.loads(line)
                if r["n"] != n or r["setting"] not in trained:
                    continue
                steps, seconds = trained[r["setting"]]
                acc = r["val_accuracy"]
                if r["setting"] == "lora":
                    series["LoRA"].append((seconds, acc["0"], steps))
                elif r["setting"] == "main-open-head0":
                    series["L2D (16 steps)"].append((seconds, acc["16"], steps))
                elif r["setting"] == "onlora-main-open-head0":
                    series["LoRA"].append((demo_lora_s, acc["0"], 80))
                    series["L2D on the 80-step LoRA (16 steps)"].append((demo_lora_s + seconds, acc["16"], 80 + steps))
    return {k: sorted(set(v)) for k, v in series.items() if v}


def plot_curve(series: dict, path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, points), marker in zip(series.items(), "osD"):
        xs, ys, steps = zip(*points)
        ax.plot(xs, ys, marker=marker, label=label)
        for x, y, k in points:
            ax.annotate(f"{k}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("training seconds (2-core CPU; labels: optimizer steps of 32)")
    ax.set_ylabel(f"validation accuracy % (n = {n})")
    ax.set_title("SmolLM2-135M, 2-term arithmetic: accuracy against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", help=f"settings to run, from {sorted(SETTINGS)}")
    parser.add_argument("--list", action="store_true", help="print the settings and their overrides, then exit")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per training run")
    parser.add_argument("--n", type=int, default=128, help="validation problems")
    parser.add_argument("--eval-steps", default="0,1,4,16", help="comma-separated step counts to score")
    parser.add_argument("--solver", default="euler", help="ODE solver for scoring")
    parser.add_argument("--out", default="runs/ablate", help="output folder (adapters and results.jsonl)")
    parser.add_argument("--table", action="store_true",
                        help="print results.jsonl under --out as a markdown table (latest record per setting), then exit")
    parser.add_argument("--eval-only", action="store_true",
                        help="score adapters already trained under --out instead of training them again")
    parser.add_argument("--recipe", default="recipes/smollm2-135m/arithmetic.yaml", help="base recipe")
    parser.add_argument("--curve", metavar="PNG",
                        help="plot validation accuracy against training seconds for LoRA, L2D and L2D on LoRA "
                             "from the folders in --curve-outs (records scored on --n problems), then exit")
    parser.add_argument("--curve-outs",
                        default="runs/ablate,runs/ablate200,runs/ablate400,runs/ablate180,runs/ablate240",
                        help="comma-separated output folders for --curve")
    parser.add_argument("--seed", type=int, default=None,
                        help="train with this train.seed (path/LoRA init, data order, noise) instead of the "
                             "recipe's; the run folder gets a -seedN suffix")
    parser.add_argument("--estimate", default="expected", choices=("expected", "argmax", "sample"),
                        help="the velocity's clean-latent estimate when scoring L2D (generate's `estimate`)")
    parser.add_argument("--protocols", default="greedy",
                        help="comma-separated decoding protocols to score (greedy, paper: see l2d eval --protocol)")
    parser.add_argument("--no-loss", action="store_true",
                        help="skip the teacher-forced loss by t (the slow part of scoring)")
    parser.add_argument("--demo", default="runs/demo", help="the demo's folder (the LoRA the onlora-* runs stack on)")
    args = parser.parse_args(argv)
    if args.curve:
        series = curve_points([Path(p) for p in args.curve_outs.split(",")], args.n, Path(args.demo))
        for label, points in series.items():
            print(label + ": " + ", ".join(f"{k} steps {x:.0f} s {y}%" for x, y, k in points))
        plot_curve(series, Path(args.curve), args.n)
        return 0
    if args.list:
        for name, overrides in SETTINGS.items():
            print(f"{name:14s} {' '.join(overrides) or '(recipe as is)'}")
        return 0
    if args.table:
        print(markdown_table(Path(args.out) / "results.jsonl"))
        return 0
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown or not args.settings:
        parser.error(f"choose settings from {sorted(SETTINGS)} (unknown: {unknown})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from l2d.data import reasoning_gym_dataset
    from l2d.demo import SYSTEM_PROMPT, VALIDATION_SEED, heldout_task
    from l2d.eval.command import load_for_eval
    from l2d.eval.runner import evaluate
    from l2d.recipe import load_recipe
    from l2d.train import train

    from answer_only_lora import PositionGate, answer_only_training

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps_list = [int(s) for s in args.eval_steps.split(",")]
    recipe = load_recipe(args.recipe)
    source = recipe.data.sources[0]
    train_questions = set(reasoning_gym_dataset(source.name.split(":", 1)[-1], source.n, seed=source.seed,
                                                **source.generator_kwargs)["prompt"])
    val_task, _ = heldout_task(source, args.n, VALIDATION_SEED, train_questions)
    for name in args.settings:
        seed = [] if args.seed is None else [f"train.seed={args.seed}"]
        run_dir = out / (name if args.seed is None else f"{name}-seed{args.seed}")
        overrides = SETTINGS[name] + seed + [f"train.output_dir={run_dir}", f"train.max_steps={args.steps}",
                                      "train.save_every=0", "train.keep_last=1",
                                      f"data.system_prompt={SYSTEM_PROMPT}"]  # as the demo trains and scores
        answer_only = name.endswith("answer-only")
        t0 = time.perf_counter()
        if args.eval_only:
            summary = {"loss": None}
        else:
            if answer_only:
                patch = answer_only_training()
            elif name in TRAJECTORY_GRID:
                patch = trajectory_grid(*TRAJECTORY_GRID[name])
            else:
                patch = contextlib.nullcontext()
            with patch:
                summary = train(load_recipe(args.recipe, overrides), overwrite=True)
        seconds = None if args.eval_only else round(time.perf_counter() - t0)
        model, tok, _ = load_for_eval(str(run_dir))
        if answer_only:
            PositionGate().attach(model)
        lora = name.startswith("lora")
        acc = {}
        for protocol in args.protocols.split(","):
            greedy = protocol == "greedy"
            rows = evaluate(model, tok, val_task, [0] if lora else steps_list, method=name, protocol=protocol,
                            solver=args.solver if greedy else None, batch_size=64, max_new_tokens=16, seed=0,
                            prompt_format="chat", **({} if lora or not greedy else {"estimate": args.estimate}))
            acc.update({(r["steps"] if greedy else f"{protocol}@{r['steps']}"): round(100 * r["accuracy"], 1)
                        for r in rows})
        # (the answer-only LoRA's gate needs labels for a teacher-forced loss: none reported)
        val_loss = loss_by_t(model, tok, val_task, times=() if answer_only or args.no_loss
                             else (1.0,) if lora else LOSS_TIMES)
        trained_steps = args.steps
        if args.eval_only and (run_dir / "metrics.jsonl").exists():  # the steps it was trained for
            trained_steps = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        record = {"setting": name, "overrides": SETTINGS[name] + seed, "train_steps": trained_steps,
                  "final_loss": summary.get("loss"), "train_s": seconds, "val_accuracy": acc,
                  "val_loss_by_t": val_loss,
                  "n": len(val_task), "solver": args.solver, "seed": args.seed,
                  "estimate": None if lora else args.estimate}
        with open(out / ("rescored.jsonl" if args.eval_only else "results.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
