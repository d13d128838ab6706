"""Score a trained adapter on the demo's VALIDATION problems at a few step counts, under one protocol.

    python benchmarks/score_steps.py runs/ablate21/steps-heads-traj --n 48 --protocol greedy --steps 1,16

The validation problems are the demo's (seed ``l2d.demo.VALIDATION_SEED``, any question that occurs
in the recipe's training data removed, prompted as in training); the held-out ones are never used.
Prints one JSON line per step count (correct of n, accuracy %, NFE per token, seconds). With
``--early-stop off,0.5 --repeats 2`` the settings alternate in one process, so that their seconds
compare side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="an l2d train output folder (or a LoRA folder with --steps 0)")
    p.add_argument("--n", type=int, default=48, help="validation problems")
    p.add_argument("--protocol", default="greedy", choices=("greedy", "paper"), help="decoding protocol")
    p.add_argument("--steps", default="1,16", help="comma-separated step counts")
    p.add_argument("--recipe", default="recipes/smollm2-135m/arithmetic.yaml", help="the recipe it was trained on")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generation budget per answer")
    p.add_argument("--batch-size", type=int, default=48, help="prompts per generate call")
    p.add_argument("--grid", default="uniform", choices=("uniform", "cosmap"),
                   help="greedy only: the solver grid's spacing (cosmap puts more steps near t = 1)")
    p.add_argument("--estimate", default="expected", choices=("expected", "argmax", "sample"),
                   help="greedy only: the velocity's clean-latent estimate")
    p.add_argument("--readout", default="final", choices=("final", "last"),
                   help="greedy only: the token from one more evaluation at t = 1 (final) or from the "
                        "solve's last evaluation (last)")
    p.add_argument("--early-stop", default="off", metavar="P[,P...]",
                   help="greedy only: end a token's solve once its argmax holds with probability >= P "
                        "(l2d.generation.EarlyStop, patience 2); comma-separated, 'off' for none")
    p.add_argument("--repeats", type=int, default=1, help="rounds over every setting (for timings)")
    args = p.parse_args(argv)
    try:
        stops = [None if x.strip() == "off" else float(x) for x in args.early_stop.split(",")]
    except ValueError:
        p.error(f"--early-stop takes probabilities or 'off', comma-separated, got {args.early_stop!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from l2d.demo import validation_task
    from l2d.eval.command import load_for_eval
    from l2d.eval.runner import evaluate
    from l2d.generation import EarlyStop

    val_task = validation_task(args.recipe, args.n)
    model, tok, _ = load_for_eval(args.adapter)
    settings = [(steps, stop) for _ in range(args.repeats) for steps in (int(s) for s in args.steps.split(","))
                for stop in stops]
    for steps, stop in settings:
        t0 = time.perf_counter()
        greedy = ({"grid": args.grid, "estimate": args.estimate, "readout": args.readout}
                  if args.protocol == "greedy" else {})
        if greedy and stop is not None:
            greedy["early_stop"] = EarlyStop(stop, 2)
        r = evaluate(model, tok, val_task, [steps], method=args.adapter, protocol=args.protocol, **greedy,
                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=0,
                     prompt_format="chat", progress=False)[0]
        shown = {k: (v if k != "early_stop" else v.threshold) for k, v in greedy.items()}
        print(json.dumps({"adapter": args.adapter, "protocol": args.protocol, **shown, "steps": steps, "n": r["n"],
                          "correct": r["correct"], "accuracy %": round(100 * r["accuracy"], 1),
                          "nfe_per_token": round(r["nfe_per_token"], 1),
                          "seconds": round(time.perf_counter() - t0)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
