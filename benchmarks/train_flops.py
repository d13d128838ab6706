"""Matmul FLOPs of one training step, L2D against a peft LoRA (rank 32, all linear layers), by part
and by response fraction: what the step costs independent of the machine.

    python benchmarks/train_flops.py [--batches 32x~40,4x256] [--fractions 0.1,0.25,0.5,0.75,1]

The same steps as benchmarks/train_step.py (SmolLM2-135M-Instruct, the batches of
``make_batch``: random tokens, the response the last fraction of each sequence), counted with
``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products and attention
(forward and backward) and nothing elementwise (norms, softmax, AdamW), so the counts bound the
compute a step needs, not its time.

Parts of an L2D step (default ``L2DConfig``; the heads-frozen model is the SmolLM2 recipe's):
  main        the frozen main path over every token, no grad
  path fwd    the diffusion path at the supervised positions, with the head's cross-entropy
  path bwd    its backward (through the frozen weights to the deltas; the adaLN heads' weight
              gradients when they train)
  sc pass     the no-grad self-conditioning pass (run with probability ``self_conditioning``,
              0.5 by default: the expected step counts half of it)
LoRA: forward over every token (head and cross-entropy at supervised positions only, as
``l2d train`` runs it) and backward.

Ratios: the expected L2D step over the LoRA step. A step whose time follows its FLOPs (large
batches on an accelerator) cannot run faster than this ratio; a CPU's times also follow matrix
shapes (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import make_batch  # noqa: E402  (the same batches as the timed benchmark)

from l2d import L2DConfig, get_l2d_model  # noqa: E402
from l2d.pretrained import load_smollm2  # noqa: E402
from l2d.train import batch_loss, freeze_parts  # noqa: E402


def flops(fn) -> tuple[int, object]:
    """(matmul FLOPs of ``fn()``, its result)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def l2d_parts(model, batch, p_sc: float) -> dict:
    """GFLOPs of each part of one L2D step, and the expected step."""
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def forward(sc: bool):
        torch.manual_seed(0)  # the same t and noise in both forwards
        return model(input_ids=ids, attention_mask=mask, labels=batch["labels"], class_labels=batch["class_labels"],
                     reduction="sum", self_conditioning=sc)

    main, _ = flops(lambda: model.run_main_path(ids, mask))
    fwd, out = flops(lambda: forward(False))
    bwd, _ = flops(lambda: (out.loss / out.num_tokens).backward())
    model.zero_grad(set_to_none=True)
    fwd_sc, _ = flops(lambda: forward(True))
    model.zero_grad(set_to_none=True)
    parts = {"main": main, "path fwd": fwd - main, "path bwd": bwd, "sc pass": fwd_sc - fwd}
    parts = {k: v / 1e9 for k, v in parts.items()}
    parts["step"] = parts["main"] + parts["path fwd"] + parts["path bwd"] + p_sc * parts["sc pass"]
    parts["rows"] = int(out.num_tokens)
    return parts


def lora_parts(model, batch) -> dict:
    fwd, (loss, n) = flops(lambda: batch_loss(model, "lora", batch))
    bwd, _ = flops(lambda: (loss / n).backward())
    model.zero_grad(set_to_none=True)
    return {"fwd": fwd / 1e9, "bwd": bwd / 1e9, "step": (fwd + bwd) / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="32x~40,4x256",
                    help="comma-separated batch kinds of benchmarks/train_step.py without a fraction: "
                         "4x256 (4 sequences of 256 tokens), 32x~40 (32 of 34-46 tokens) and arith32 (32 "
                         "examples of the SmolLM2 arithmetic recipe, answer-only labels; no fractions)")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,0.75,1",
                    help="comma-separated response fractions: the last fraction F of each sequence is "
                         "supervised (0.5: the timed benchmark's default)")
    ap.add_argument("--stream-layers", type=int, default=None, metavar="K",
                    help="also count the default L2D with its diffusion stream in the top K decoder layers only")
    args = ap.parse_args()
    torch.manual_seed(0)

    from peft import LoraConfig, get_peft_model

    base, _ = load_smollm2()
    vocab = base.get_input_embeddings().weight.shape[0]
    models = {"L2D": get_l2d_model(base, L2DConfig()).train()}
    frozen = get_l2d_model(load_smollm2()[0], L2DConfig()).train()
    freeze_parts(frozen, ["heads"])
    models["L2D, heads frozen"] = frozen
    if args.stream_layers:
        models[f"L2D, stream in the top {args.stream_layers}"] = get_l2d_model(
            load_smollm2()[0], L2DConfig(stream_layers=args.stream_layers)).train()
    lora = get_peft_model(load_smollm2()[0], LoraConfig(r=32, lora_alpha=32, target_modules="all-linear",
                                                        task_type="CAUSAL_LM")).train()
    p_sc = models["L2D"].config.self_conditioning

    print("Matmul GFLOPs per training step, SmolLM2-135M-Instruct (torch FlopCounterMode; elementwise "
          f"ops not counted); expected L2D step = main + path fwd + path bwd + {p_sc} x sc pass\n")
    print("| batch | response | supervised rows | model | main | path fwd | path bwd | sc pass | expected step "
          "| LoRA fwd | LoRA bwd | LoRA step | L2D / LoRA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs = [(kind, None) if kind == "arith32" else (kind, fraction)
            for kind in args.batches.split(",") for fraction in args.fractions.split(",")]
    for kind, fraction in dict.fromkeys(runs):
        batch = make_batch(kind if fraction is None else f"{kind}:{fraction}", vocab)
        response = "answers" if fraction is None else f"{float(fraction):g}"
        ref = lora_parts(lora, batch)
        for name, model in models.items():
            p = l2d_parts(model, batch, p_sc)
            print(f"| {kind} | {response} | {p['rows']} | {name} | {p['main']:.1f} | {p['path fwd']:.1f} "
                  f"| {p['path bwd']:.1f} | {p['sc pass']:.1f} | {p['step']:.1f} | {ref['fwd']:.1f} "
                  f"| {ref['bwd']:.1f} | {ref['step']:.1f} | **{p['step'] / ref['step']:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
