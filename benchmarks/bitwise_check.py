"""Bitwise regression check for refactors: the same seeds must give the same numbers.

Records, on a tiny random llama and on SmolLM2-135M-Instruct (float32, CPU):
- training losses of a few AdamW steps (fixed seeds) for several path configurations
  (default, paper preset, adapted context with stream_layers, trajectory training), and the
  full ``l2d.train.train`` loop on the tiny model (its metrics.jsonl losses);
- greedy generations at ``steps`` 0, 1 and 4 (expected estimate; the paper protocol's argmax
  estimate with midpoint; classifier-free guidance) with NFE per token.

    python benchmarks/bitwise_check.py out.json            # record
    python benchmarks/bitwise_check.py out.json --compare before.json   # record and compare exactly

Floats are written with ``float.hex`` so that the comparison is bitwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from l2d import L2DConfig, L2DModel  # noqa: E402

CONFIGS = {
    "default": {},
    "paper": "paper",
    "adapted_top": dict(context="adapted", stream_init="main", stream_layers=1),
    "trajectory": dict(trajectory_training=1.0, trajectory_steps=4),
    "open_merge": dict(merge_init="open", stream_init="main"),
}


def _config(spec, small: bool) -> L2DConfig:
    base = dict(latent_dim=16, cond_dim=32, time_features=32, rank=4, alpha=4.0) if small else {}
    if spec == "paper":
        return L2DConfig.paper(**base)
    return L2DConfig(**{**base, **spec})


def _hex(xs) -> list[str]:
    return [float(x).hex() for x in xs]


def train_losses(base, ids, labels, config: L2DConfig, steps: int = 3, seed: int = 0) -> list[str]:
    torch.manual_seed(seed)
    model = L2DModel(base, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = []
    for step in range(steps):
        torch.manual_seed(seed * 100 + step)
        loss = model(ids, labels=labels, class_labels=[0] * ids.shape[0]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return _hex(out), model


def generations(model: L2DModel, ids, mask) -> dict:
    model.eval()
    out = {}
    for steps in (0, 1, 4):
        r = model.generate(ids, mask, max_new_tokens=4, steps=steps, seed=0, return_dict_in_generate=True)
        out[f"expected_steps{steps}"] = [r.sequences.tolist(), r.nfe]
    r = model.generate(ids, mask, max_new_tokens=3, steps=4, seed=0, estimate="argmax", solver="midpoint",
                       return_dict_in_generate=True)
    out["argmax_midpoint4"] = [r.sequences.tolist(), r.nfe]
    if model.config.num_classes:
        r = model.generate(ids, mask, max_new_tokens=3, steps=4, seed=0, class_label=0, guidance_scale=1.5,
                           return_dict_in_generate=True)
        out["guided4"] = [r.sequences.tolist(), r.nfe]
    # the next-step logits as well, for a finer check than the argmax
    with torch.no_grad():
        lg = model(ids, attention_mask=mask, t=0.7, noise=torch.randn(*ids.shape, model.config.latent_dim,
                                                                         generator=torch.Generator().manual_seed(3)))
    out["logits_t07_sum"] = _hex([lg.logits.double().sum(), lg.logits.double().abs().sum()])
    return out


def run_model(name: str, base, ids, labels, mask, small: bool, configs) -> dict:
    res = {}
    for cname in configs:
        cfg = _config(CONFIGS[cname], small)
        losses, model = train_losses(base, ids, labels, cfg)
        entry = {"losses": losses, "generate": generations(model, ids, mask)}
        model.unload()
        res[cname] = entry
        print(name, cname, losses, flush=True)
    return res


def tiny_train_loop() -> list[str]:
    """``l2d.train.train`` on the tiny llama and word-level data of tests/test_train.py."""
    import test_train as tt
    from tiny import tiny_base

    from l2d.recipe import recipe_from_dict
    from l2d.train import train

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "base").mkdir()
        tiny_base("llama").save_pretrained(d / "base")
        tt.tiny_tokenizer().save_pretrained(d / "base")
        rows = [{"prompt": f"what is {a} plus {b}", "completion": tt.NUMS[i + j + 1]}
                for i, a in enumerate(tt.NUMS) for j, b in enumerate(tt.NUMS) if i + j + 1 < len(tt.NUMS)]
        (d / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        train(recipe_from_dict(tt.make_recipe(str(d / "base"), str(d / "sums.jsonl"), d / "out")))
        return _hex(tt.losses(d / "out"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compare")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    from tiny import batch, tiny_base

    result = {}
    base = tiny_base("llama")
    ids, labels = batch(B=2, T=12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    result["tiny"] = run_model("tiny", base, ids, labels, mask, True, CONFIGS)
    result["tiny_train_loop"] = tiny_train_loop()
    print("train loop", result["tiny_train_loop"], flush=True)
    if not args.skip_smollm2:
        from l2d.pretrained import load_smollm2

        base, tok = load_smollm2()
        texts = ["What is 12 plus 7? The answer is 19.", "Write a function that adds two numbers."]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : ids.shape[1] // 2] = -100
        result["smollm2"] = run_model("smollm2", base, ids, labels, mask, False,
                                      ["default", "paper", "adapted_top"])
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        diffs = _diff(before, result, "")
        print("\n".join(diffs) if diffs else "bitwise identical: " + ", ".join(_leaves(result, "")))
        sys.exit(1 if diffs else 0)


def _leaves(d, prefix):
    if isinstance(d, dict):
        return [x for k, v in d.items() for x in _leaves(v, f"{prefix}/{k}")]
    return [prefix]


def _diff(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b)) for x in _diff(a.get(k), b.get(k), f"{prefix}/{k}")]
    return [] if a == b else [f"DIFF {prefix}: {a} != {b}"]


if __name__ == "__main__":
    main()
