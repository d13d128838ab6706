"""The sections of `make gpu-check` (benchmarks/gpu_check.sh) and the report they add up to.

    python benchmarks/gpu_report.py env         --out runs/gpu_check   # exits 2 without a CUDA GPU
    python benchmarks/gpu_report.py train-step  --out runs/gpu_check   # bf16 step, L2D vs LoRA, ~1B Llama
    python benchmarks/gpu_report.py generate    --out runs/gpu_check   # ms per token by steps
    python benchmarks/gpu_report.py device-map  --out runs/gpu_check   # >1 GPU: layers spread, same loss
    python benchmarks/gpu_report.py write       --out runs/gpu_check   # gpu_check.json + gpu_check.md

Each section writes ``<section>.json`` into the output folder; the shell script runs the kernel
tests (junit XML) and the kernel benchmark (its printed tables) itself. ``write`` gathers whatever is
there (a section that failed or timed out is reported with the tail of its log) into one JSON file
and one markdown page. Nothing here needs the network: the bases are random-init configs.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

DEVICE = "cuda"  # the sections run here (a CPU dry run of their code sets it to "cpu")
SECTIONS = ("env", "kernel_tests", "kernel_speed", "train_step", "generate", "device_map")
# A Llama-3.2-1B-shaped config (1.24B parameters with tied embeddings), random weights.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ------------------------------------------------------------------------------ the writer
def markdown_table(rows: list[dict]) -> str:
    """A markdown table; the header is the union of the rows' keys; floats get 4 significant digits."""
    if not rows:
        return "(no rows)"
    headers = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(h)) for h in headers) + " |" for r in rows])


def junit_summary(path: Path) -> dict:
    """Counts of a pytest ``--junitxml`` file, and the names of the tests that failed."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
            "errors": int(suite.get("errors", 0)), "skipped": int(suite.get("skipped", 0)),
            "seconds": float(suite.get("time", 0.0)), "failed": failed}


def gather(out: Path) -> dict:
    """Every section's result from the files in ``out`` (missing ones: failed, with their log's tail)."""
    report = {}
    for name in SECTIONS:
        part = out / f"{name}.json"
        if name == "kernel_tests" and (out / "kernel_tests.xml").is_file():
            summary = junit_summary(out / "kernel_tests.xml")
            ok = summary["failures"] == 0 and summary["errors"] == 0
            report[name] = {"status": "ok" if ok else "failed", **summary}
        elif name == "kernel_speed" and (out / "kernel_speed.txt").is_file():
            report[name] = {"status": "ok", "text": (out / "kernel_speed.txt").read_text()}
        elif part.is_file():
            report[name] = json.loads(part.read_text())
        else:
            log = out / f"{name}.log"
            tail = log.read_text()[-2000:] if log.is_file() else "no output"
            report[name] = {"status": "failed", "log_tail": tail}
    return report


def render_markdown(report: dict) -> str:
    env = report.get("env", {})
    parts = ["# GPU check", f"{env.get('gpu', '?')} x{env.get('gpu_count', '?')} | torch {env.get('torch', '?')} | "
             f"triton {env.get('triton', '?')} | CUDA {env.get('cuda', '?')} | l2d commit {env.get('commit', '?')}",
             "## Summary", markdown_table([{"section": k, "status": v.get("status"),
                                            "seconds": v.get("seconds")} for k, v in report.items()])]
    kt = report.get("kernel_tests", {})
    if kt.get("failed"):
        parts += ["## Kernel tests that failed", "\n".join(f"- {t}" for t in kt["failed"])]
    if "text" in report.get("kernel_speed", {}):
        parts += ["## Kernel benchmark", "```\n" + report["kernel_speed"]["text"].rstrip() + "\n```"]
    for name, title in (("train_step", "Training step, bf16, ~1B random Llama"),
                        ("generate", "Generation by steps"), ("device_map", "Layers spread over GPUs")):
        section = report.get(name, {})
        if section.get("rows"):
            parts += [f"## {title}", markdown_table(section["rows"])]
        elif section.get("status") not in (None, "ok"):
            detail = section.get("reason") or section.get("error") or section.get("log_tail", "")
            parts += [f"## {title}: {section['status']}", "```\n" + str(detail).strip()[-1500:] + "\n```"]
    return "\n\n".join(parts) + "\n"


def write_report(out: Path) -> tuple[Path, Path]:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out`` from the sections' files."""
    report = gather(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(report))
    return out / "gpu_check.json", out / "gpu_check.md"


# ------------------------------------------------------------------------------ the sections
def section_env() -> dict:
    import subprocess

    import torch

    if not torch.cuda.is_available():
        raise SystemExit(2)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    props = torch.cuda.get_device_properties(0)
    return {"status": "ok", "gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "python": platform.python_version(), "commit": commit or None}


def _recipe(**l2d):
    from l2d.recipe import recipe_from_dict

    return recipe_from_dict({"model": {"name_or_path": "random-llama-1b", "dtype": "bfloat16"},
                             "data": {"sources": ["unused.jsonl"]}, "l2d": l2d,
                             "train": {"mixed_precision": "bf16", "seed": 0}})


class ByteTokenizer:
    """Enough of a tokenizer for the generation benchmark on a random base: bytes as token ids."""

    chat_template = None
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        import torch

        return SimpleNamespace(input_ids=torch.tensor([[3 + b for b in text.encode()]]))


def random_llama(recipe, device):
    """A fresh random ~1B Llama in bf16, built on the device (no download)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device(device):
        base = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16)
    return base.eval(), ByteTokenizer()


def section_train_step(batch: int, seq_len: int) -> dict:
    from l2d.bench import run_bench

    result = run_bench(_recipe(), methods=("l2d", "lora"), batch=batch, seq_len=seq_len, response=0.5,
                       repeats=3, warmup=1, device=DEVICE, load=random_llama, progress=False)
    tokens = result["batch"]["tokens"]
    rows = [{"name": r["name"], "trainable": r["trainable"], "ms": 1e3 * r["time"], "tokens/s": tokens / r["time"],
             "peak MiB": None if r["memory"] is None else r["memory"] / 2**20,
             "TFLOP/s": None if not r["flops"] else r["flops"] / r["time"] / 1e12} for r in result["rows"]]
    return {"status": "ok", "batch": result["batch"], "rows": rows, "raw": result}


def section_generate(steps: list[int], new_tokens: int) -> dict:
    from l2d.bench_generate import run_generate_bench

    result = run_generate_bench(_recipe(), steps=steps, solver="euler", batch=1, new_tokens=new_tokens, repeats=2,
                                device=DEVICE, load=random_llama, progress=False)
    rows = [{k: r[k] for k in ("setting", "steps", "ms_per_token", "nfe_per_token", "vs_base")} for r in result["rows"]]
    return {"status": "ok", "rows": rows, "raw": result}


def section_device_map() -> dict:
    """The same tiny-ish random Llama on one GPU and spread over every GPU: equal loss and tokens."""
    import torch

    if torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": f"{torch.cuda.device_count()} GPU visible; needs 2 or more"}
    from transformers import AutoModelForCausalLM, LlamaConfig

    from l2d import L2DConfig, get_l2d_model

    n = torch.cuda.device_count()
    cfg = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": 2 * n, "hidden_size": 512, "intermediate_size": 1024,
                         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000})
    torch.manual_seed(0)
    single = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda().eval()
    layers_per_gpu = cfg.num_hidden_layers // n
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": n - 1, "lm_head": 0}
    device_map.update({f"model.layers.{i}": i // layers_per_gpu for i in range(cfg.num_hidden_layers)})
    from accelerate import dispatch_model

    spread = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    spread.load_state_dict(single.state_dict())
    spread = dispatch_model(spread, device_map=device_map)
    ids = torch.randint(3, 32000, (2, 64), device="cuda:0")
    labels = ids.clone()
    labels[:, :32] = -100
    rows = []
    for name, base in (("one GPU", single), (f"{n} GPUs", spread)):
        torch.manual_seed(1)
        model = get_l2d_model(base, L2DConfig(latent_dim=64, rank=8))
        out = model(ids, labels=labels, t=0.5, noise=torch.zeros(2, 64, 64, device="cuda:0"), self_conditioning=False)
        gen = model.generate(ids[:, :16], max_new_tokens=8, steps=4)
        devices = sorted({str(p.device) for p in model.path.parameters()})
        rows.append({"setting": name, "loss": float(out.loss), "tokens": gen[0, 16:].tolist(), "path devices": devices})
    same = abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-4 and rows[0]["tokens"] == rows[1]["tokens"]
    for r in rows:
        r["tokens"] = " ".join(map(str, r["tokens"]))
        r["path devices"] = ", ".join(r["path devices"])
    return {"status": "ok" if same else "failed", "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["env", "train-step", "generate", "device-map", "write"])
    parser.add_argument("--out", default="runs/gpu_check", help="output folder (default runs/gpu_check)")
    parser.add_argument("--batch", type=int, default=8, help="train-step: sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=1024, help="train-step: tokens per sequence (default 1024)")
    parser.add_argument("--steps", default="0,1,4,16", help="generate: steps to time (default 0,1,4,16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generate: tokens per call (default 32)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.section == "write":
        for path in write_report(out):
            print(f"wrote {path}")
        return 0
    name = args.section.replace("-", "_")
    start = time.perf_counter()
    if name == "env":
        result = section_env()
    elif name == "train_step":
        result = section_train_step(args.batch, args.seq_len)
    elif name == "generate":
        result = section_generate([int(s) for s in args.steps.split(",")], args.new_tokens)
    else:
        result = section_device_map()
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(markdown_table(result["rows"]) if result.get("rows") else json.dumps(result, default=str))
    return 0 if result["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
