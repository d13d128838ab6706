"""The `l2d` command. Each subcommand is registered by one small function `add_<name>(subparsers)`
that builds its parser and sets `func`; `COMMANDS` lists them in the order `--help` shows.

    l2d train RECIPE.yaml [--set train.lr=5e-5 ...] [--resume DIR] [--stop-after N]
    l2d generate ADAPTER --prompt "What is 12 + 30?" --steps 8
    l2d eval ADAPTER --task gsm8k --steps 0,2,4,8,16 --plot steps.png
    l2d bench RECIPE.yaml [--batch 4 --seq-len 256 --response 0.5] [--methods l2d,lora]
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
    try:
        summary = train(recipe, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)
    finally:
        # A process that exits with its process group alive can abort while the communication
        # threads (gloo, DeepSpeed's) are torn down, failing a run that finished.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if args.push_to_hub and not summary["stopped"] and _is_main_process():
        from .hub import push_folder

        info = push_folder(summary["output_dir"], args.push_to_hub, private=args.hub_private or None,
                           commit_message=f"l2d train {args.recipe}")
        print(f"Pushed {summary['output_dir']} to {getattr(info, 'commit_url', None) or args.push_to_hub}", flush=True)
    return EXIT_INTERRUPTED if summary["stopped"] == "interrupted" else 0


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch / torchrun on every process


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
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="after a finished run, upload the weights, recipe.yaml and a generated model card to the "
                        "hub repository REPO (created if needed; log in first: `hf auth login` or HF_TOKEN)")
    p.add_argument("--hub-private", action="store_true", help="create the --push-to-hub repository as private")
    p.set_defaults(func=run_train)


# ---------------------------------------------------------------------------------- generate
def run_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .generation import EarlyStop
    from .loading import load_trained
    from .prompts import render_prompt

    model, tok, kind = load_trained(args.adapter, args.base, args.dtype)
    if kind == "mdm":  # masked diffusion: every new position at once, in --steps forward passes
        text = render_prompt(tok, args.prompt, system_prompt=args.system, chat_template=not args.raw)
        enc = tok(text, return_tensors="pt", add_special_tokens=args.raw)
        out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                             steps=args.steps or None, do_sample=args.sample, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_token_id, seed=args.seed,
                             return_dict_in_generate=True)
        print(tok.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        print(f"[{args.max_new_tokens} positions, {out.forward_passes} forward passes]", file=sys.stderr)
        return 0
    if kind != "l2d" and args.steps != 0:
        raise ValueError(f"{args.adapter!r} is a {kind} model without a diffusion path: use --steps 0.")
    text = render_prompt(tok, args.prompt, system_prompt=args.system, chat_template=not args.raw)
    enc = tok(text, return_tensors="pt", add_special_tokens=args.raw)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, streamer=streamer)
    if kind != "l2d":
        torch.manual_seed(args.seed)
        model.generate(**enc, pad_token_id=tok.pad_token_id, **common)
        return 0
    steps = None if args.solver in ("dopri5", "bosh3", "adaptive_heun") else args.steps
    out = model.generate(enc["input_ids"], enc["attention_mask"], steps=steps, solver=args.solver, grid=args.grid,
                         rtol=args.rtol, atol=args.atol, max_nfe=args.max_nfe, class_label=args.class_label,
                         guidance_scale=args.guidance_scale, seed=args.seed, return_dict_in_generate=True,
                         early_stop=EarlyStop(args.early_stop) if args.early_stop else None, **common)
    print(f"[{len(out.nfe)} tokens, {out.mean_nfe:.1f} evaluations of the diffusion path per token]", file=sys.stderr)
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a trained adapter at a chosen number of steps",
                       description="Answer one prompt with an L2D adapter (or a base/peft model at --steps 0), "
                                   "streaming the tokens as they are final.")
    p.add_argument("adapter", help="adapter folder (l2d, peft or full model), a hub id, or 'base' with --base")
    p.add_argument("--prompt", required=True, help="the user message (rendered with the chat template)")
    p.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--steps", type=int, default=8, help="ODE steps per token; 0 is the base model (default 8); "
                   "for a masked diffusion (mdm) model: forward passes for all new positions (0: one per position)")
    p.add_argument("--solver", default="euler",
                   help="euler | midpoint | heun | rk4, or adaptive dopri5 | bosh3 | adaptive_heun (default euler)")
    p.add_argument("--grid", default="uniform", help="fixed-grid spacing: uniform | cosmap (default uniform)")
    p.add_argument("--rtol", type=float, default=1e-3, help="adaptive solvers' relative tolerance")
    p.add_argument("--atol", type=float, default=1e-3, help="adaptive solvers' absolute tolerance")
    p.add_argument("--max-nfe", type=int, help="cap on path evaluations per token")
    p.add_argument("--early-stop", type=float, metavar="P",
                   help="stop a token's solve once its argmax repeats with probability >= P")
    p.add_argument("--class-label", help="task category for class conditioning (e.g. math, code)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance weight (needs --class-label)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget (default 256)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of sampling")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.set_defaults(func=run_generate)


from .eval.command import add_eval_parser as add_eval  # noqa: E402  (l2d eval lives in l2d/eval/command.py)


# ------------------------------------------------------------------------------------- bench
def run_bench(args) -> int:
    import json

    from .bench import format_table, run_bench as bench
    from .recipe import RecipeError, load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.generate:
        from .bench_generate import format_generate_table, run_generate_bench

        try:
            steps = [int(s) for s in args.steps.split(",") if s.strip()]
        except ValueError:
            raise RecipeError(f"--steps: expected comma-separated integers, e.g. 0,1,8; got {args.steps!r}") from None
        batch = 1 if args.batch is None else args.batch
        result = run_generate_bench(recipe, steps=steps, solver=args.solver, batch=batch, new_tokens=args.new_tokens,
                                    repeats=args.repeats, adapter=args.adapter, device=args.device)
        table = format_generate_table(result)
    else:
        batch = 4 if args.batch is None else args.batch
        result = bench(recipe, methods=[m.strip() for m in args.methods.split(",") if m.strip()], batch=batch,
                       seq_len=args.seq_len, response=args.response, use_data=args.data, repeats=args.repeats,
                       warmup=args.warmup, device=args.device, flops=not args.no_flops, memory=not args.no_memory)
        table = format_table(result)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="time a recipe's training step against its LoRA (and full) baseline, or generation by steps",
        description="Benchmark the training step of a recipe on this machine: forward, backward and AdamW step of "
                    "one micro-batch, with the recipe's base, dtype, mixed precision, frozen parts and gradient "
                    "checkpointing, for each method. Prints step time (median of --repeats), tokens/s, peak "
                    "memory above the step's start (CUDA allocator; on the CPU the C heap in use, or the RSS where "
                    "glibc does not report it), matmul GFLOPs, "
                    "and ratios against LoRA. L2D is timed without and with its self-conditioning pass, and "
                    "their mix at the config's probability is the step training takes on average. With "
                    "--generate: milliseconds per generated token of base.generate and of the adapter at each "
                    "of --steps, and the cost of one path evaluation relative to one base decoding step.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  l2d bench recipes/smollm2-135m/arithmetic.yaml --batch 4 --seq-len 256 --response 0.5\n"
               "  l2d bench recipes/llama-3.2-1b/math-code.yaml --data --batch 8 --methods l2d,lora,full\n"
               "  l2d bench recipes/smollm2-135m/arithmetic.yaml --generate --steps 0,1,4,16 --adapter runs/smollm2-arith")
    p.add_argument("recipe", help="path of the YAML recipe whose model, l2d/lora sections and train settings to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field as in `l2d train` (repeatable), e.g. --set l2d.stream_layers=8")
    p.add_argument("--methods", default="l2d,lora",
                   help="comma-separated methods to run, in order: l2d, lora, full (default l2d,lora)")
    p.add_argument("--batch", type=int, help="sequences per step (default 4), or per generate call (default 1)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="tokens per synthetic sequence (default 256; ignored with --data)")
    p.add_argument("--response", type=float, default=0.5,
                   help="supervised fraction at the end of each synthetic sequence, in (0, 1] (default 0.5; "
                        "the path's cost grows with it, LoRA's barely)")
    p.add_argument("--data", action="store_true",
                   help="use the first --batch examples of the recipe's own data instead of random tokens")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps per variant, or rounds of generate calls; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per variant first (they also create the optimizer state; default 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--no-flops", action="store_true", help="skip the extra step that counts matmul FLOPs")
    p.add_argument("--no-memory", action="store_true", help="skip the extra step that measures peak memory")
    p.add_argument("--json", metavar="PATH", help="also write the results (every timed step) as JSON")
    g = p.add_argument_group("generation (--generate)")
    g.add_argument("--generate", action="store_true",
                   help="time generation instead of training: base.generate against the adapter at each of --steps")
    g.add_argument("--steps", default="0,1,8",
                   help="comma-separated ODE steps per token to time (0, the base's predictions through l2d's "
                        "token loop, is always included; default 0,1,8)")
    g.add_argument("--solver", default="euler", help="fixed-grid solver: euler | midpoint | heun | rk4 (default euler)")
    g.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call (default 64)")
    g.add_argument("--adapter", metavar="DIR",
                   help="a trained l2d adapter folder for the recipe's base (default: a freshly initialised path "
                        "from the recipe's l2d section; the work per evaluation is the same)")
    p.set_defaults(func=run_bench)


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
    try:
        return args.func(args)
    except Exception as e:  # every error is one line; -v shows the traceback
        if args.verbose:
            raise
        print(f"l2d {args.command}: error: {error_line(e)}", file=sys.stderr)
        return EXIT_ERROR


# What a user can fix from the message alone (a recipe, a path, an option, a missing package);
# anything else is reported with its type and a pointer to the traceback.
USER_ERRORS = (ValueError, KeyError, OSError, ImportError)


def error_line(e: BaseException) -> str:
    """One line that says what was wrong (and, through the message, what to do)."""
    from .suggest import one_line

    text = one_line(e.args[0] if isinstance(e, KeyError) and e.args else e)
    if isinstance(e, ImportError) and getattr(e, "name", None) and "pip install" not in text:
        text += f"; install it (pip install {e.name.split('.')[0]})"
    from .train import TrainingError

    if not isinstance(e, USER_ERRORS + (TrainingError,)):
        text = f"{type(e).__name__}: {text} (unexpected; rerun with -v for the traceback and report it)"
    return text


if __name__ == "__main__":
    sys.exit(main())
