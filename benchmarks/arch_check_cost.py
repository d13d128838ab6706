"""What the wrap-time architecture check costs on SmolLM2-135M, against loading the model.

Each round times, one after the other (so the ratios share the machine's load of that moment):
loading SmolLM2 from the offline safetensors cache (``l2d.pretrained.load_smollm2``); the
hand-written path as users get it for llama (``ArchAdapter`` without the check, and
``get_l2d_model`` of the default ``L2DConfig``); the check forced on the hand-written spec
(``l2d.arch_check.check``: one forward of the frozen model on 2 x 6 tokens running only the checked
layers, those layers rebuilt); and the derived path with llama's hand-written spec hidden, as for
an unknown family (``l2d.arch_derive.derive_spec``: one traced forward, the probes, then the
check; and ``get_l2d_model`` on it). Reported: the median of ``--repeats`` rounds after one
warm-up round, and each step's median ratio to the load of its own round.

    .venv/bin/python benchmarks/arch_check_cost.py [--repeats 7] [--threads 1] [--dtype float32]
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
import transformers

import l2d.arch
from l2d import L2DConfig, arch_check, get_l2d_model
from l2d.arch import ArchAdapter
from l2d.arch_check import check, checked_layers
from l2d.arch_derive import derive_spec
from l2d.pretrained import load_smollm2


@contextlib.contextmanager
def hidden_spec(family: str):
    """The family's hand-written spec hidden (derived instead), and the once-per-model memo
    cleared so that every call pays the check."""
    spec = l2d.arch.SPECS.pop(family)
    try:
        yield
    finally:
        l2d.arch.SPECS[family] = spec


def fresh(fn):
    def run(model):
        arch_check._VERIFIED.pop(model, None)
        return fn(model)
    return run


STEPS = {  # in this order each round: the wraps last (they hook the model)
    "hand-written: ArchAdapter, no check": lambda m: ArchAdapter(m),
    "hand-written + check forced": lambda m: check(ArchAdapter(m, verify=False)),
    "derived (spec hidden): derive_spec + check": fresh(lambda m: derive_spec(m)),
    "derived (spec hidden): get_l2d_model": fresh(lambda m: get_l2d_model(m, L2DConfig())),
    "hand-written: get_l2d_model": lambda m: get_l2d_model(m, L2DConfig()),
}
DERIVED = {name for name in STEPS if name.startswith("derived")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    times = {name: [] for name in ("load_smollm2 (offline cache)", *STEPS)}
    ratios = {name: [] for name in STEPS}  # to the load of the same round
    notes = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        start = time.perf_counter()
        model, _ = load_smollm2(dtype=dtype)
        load_s = time.perf_counter() - start
        if round_:
            times["load_smollm2 (offline cache)"].append(load_s)
        for name, fn in STEPS.items():
            with hidden_spec("llama") if name in DERIVED else contextlib.nullcontext():
                start = time.perf_counter()
                out = fn(model)
                seconds = time.perf_counter() - start
            if round_:
                times[name].append(seconds)
                ratios[name].append(seconds / load_s)
            if name == "hand-written + check forced":
                notes[name] = f"max rel. error {out:.1e}"
            elif name.startswith("derived (spec hidden): derive"):
                notes[name] = f"derived: q {out.q_layout}, {out.norm_kind}"

    layers = checked_layers(model.model.layers, model.config)
    cpu = platform.processor() or platform.machine()
    print(f"SmolLM2-135M-Instruct, {args.dtype}, {args.threads} thread(s), {cpu}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; median of {args.repeats} rounds; "
          f"check rebuilds layers {layers} of {len(model.model.layers)}")
    print(f"{'step':<44} {'seconds':>8} {'/ load':>7}  note")
    for name, values in times.items():
        ratio = statistics.median(ratios[name]) if name in STEPS else 1.0
        print(f"{name:<44} {statistics.median(values):8.3f} {ratio:7.3f}  {notes.get(name, '')}")


if __name__ == "__main__":
    main()
