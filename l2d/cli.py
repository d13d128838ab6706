"""The `l2d` command. Each subcommand is registered by one small function `add_<name>(subparsers)`
that builds its parser and sets `func`; `COMMANDS` lists them in the order `--help` shows.

    l2d train RECIPE.yaml [--set train.lr=5e-5 ...] [--resume DIR] [--stop-after N]
"""
from __future__ import annotations

import argparse
import logging
import sys

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _recipe_keys_help() -> str:
    from .recipe import describe

    rows = describe()
    width = max(len(k) for k, _, _ in rows)
    lines = ["recipe keys (YAML sections; any can be overridden with --set KEY=VALUE):"]
    lines += [f"  {k:<{width}}  {h} [default: {d}]" for k, d, h in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- train
def run_train(args) -> int:
    from .recipe import load_recipe
    from .train import train

    recipe = load_recipe(args.recipe, args.set)
    summary = train(recipe, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    return EXIT_INTERRUPTED if summary["stopped"] == "interrupted" else 0


def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a diffusion path (or a LoRA / full fine-tune baseline) from a YAML recipe",
        description="Train from a YAML recipe (see recipes/). Run it plainly on one device, or under "
                    "`accelerate launch --config_file recipes/accelerate/<ddp|fsdp2|zero2>.yaml -m l2d train ...` "
                    "on several. Writes OUTPUT_DIR/{l2d_config.json, l2d_model.safetensors (or the peft/full "
                    "weights), recipe.yaml, metrics.jsonl, checkpoints/}.",
        epilog=_recipe_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path of the YAML recipe, e.g. recipes/smollm2-135m/arithmetic.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, value parsed as YAML (repeatable): --set train.lr=5e-5 "
                        "--set train.max_steps=20 --set l2d.rank=16")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run whose output_dir (newest checkpoint) or checkpoint folder is DIR, with "
                        "the same optimizer, schedule, data order and random state; the recipe must match "
                        "(learning rates, micro-batch size, logging and max_steps may change)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N optimizer steps of this invocation and save a checkpoint (a step budget "
                        "that leaves the learning-rate schedule unchanged; continue with --resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that already holds checkpoints (they are deleted)")
    p.set_defaults(func=run_train)


# ------------------------------------------------------------------------ not implemented yet
def _stub(name: str, text: str):
    def add(sub) -> None:
        p = sub.add_parser(name, help=f"{text} (not implemented yet)")
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args: _not_implemented(name))
    return add


def _not_implemented(name: str) -> int:
    print(f"l2d {name}: not implemented yet.", file=sys.stderr)
    return 2


add_generate = _stub("generate", "generate text with a trained adapter")
from .eval.command import add_eval_parser as add_eval  # noqa: E402  (l2d eval lives in l2d/eval/command.py)
add_bench = _stub("bench", "benchmark training and generation speed")

COMMANDS = [add_train, add_generate, add_eval, add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2d", description="LM-to-diffusion: train and use a diffusion path "
                                                             "beside a frozen Hugging Face causal LM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .recipe import RecipeError
    from .train import TrainingError

    try:
        return args.func(args)
    except (RecipeError, TrainingError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"l2d {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
