"""``l2d bench --generate``: time per generated token of ``L2DModel.generate(steps=N)`` against the
base's own ``generate``, on the user's base and device.

Settings are ``(kind, solver, steps)``: ``("base", None, 0)`` is ``base.generate``; ``("l2d",
solver, steps)`` is the adapter at that many fixed-grid steps (``steps=0``: l2d's token loop with
the base's predictions). They run in rounds, each running every setting once in an order rotated
from round to round, so a load change on a shared machine hits every setting alike; times are
medians over the rounds. Every call generates exactly ``new_tokens`` tokens (end of sequence
suppressed), greedy, from one chat prompt repeated over the batch.

Without a trained adapter the path is freshly initialised and its zero-initialised weights are
set to small random values: the work per evaluation does not depend on the weights, but exact
zeros could let a code path skip something a trained adapter would not.
"""
from __future__ import annotations

import statistics
import time

import torch

from .bench import synchronize
from .recipe import Recipe, RecipeError

PROMPT = "Write a short Python function that checks whether a number is prime, and explain it."


def prompt_ids(tok, batch: int, prompt: str = PROMPT):
    """``(input_ids, attention_mask)`` of ``prompt`` (chat-rendered when the tokenizer has a
    template) repeated ``batch`` times."""
    templated = bool(getattr(tok, "chat_template", None))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True) if templated else prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=not templated).input_ids  # the template has its own
    return ids.repeat(batch, 1), torch.ones(batch, ids.shape[1], dtype=torch.long)


def label(setting) -> str:
    kind, solver, steps = setting
    if kind == "base":
        return "base.generate"
    return "l2d steps=0" if steps == 0 else f"{solver} steps={steps}"


def make_runner(model, tok, setting, ids, mask, new_tokens: int):
    """A zero-argument function running one generate call; returns (new tokens, mean NFE per token)."""
    kind, solver, steps = setting
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if kind == "base":
        def run():
            out = model.base_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            return out.shape[1] - ids.shape[1], 0.0
    else:
        def run():
            out = model.generate(ids, mask, max_new_tokens=new_tokens, steps=steps, solver=solver,
                                 eos_token_id=[], return_dict_in_generate=True)
            return out.sequences.shape[1] - ids.shape[1], out.mean_nfe
    return run


def measure(model, tok, batch: int, settings, new_tokens: int, rounds: int, log=None, prompt: str = PROMPT):
    """Median seconds per token of each setting, its NFE per token, and every round's time."""
    device = model.device
    ids, mask = (x.to(device) for x in prompt_ids(tok, batch, prompt))
    runners = {s: make_runner(model, tok, s, ids, mask, new_tokens) for s in settings}
    for s in settings:  # warm-up on a few tokens (allocator, kernel selection)
        make_runner(model, tok, s, ids, mask, min(4, new_tokens))()
    times = {s: [] for s in settings}
    nfe = {}
    for r in range(rounds):
        k = r % len(settings)
        for s in settings[k:] + settings[:k]:
            synchronize(device)
            t0 = time.perf_counter()
            n, mean_nfe = runners[s]()
            synchronize(device)
            dt = time.perf_counter() - t0
            if n != new_tokens:
                raise RuntimeError(f"{label(s)} generated {n} tokens, not {new_tokens}")
            times[s].append(dt / n)
            nfe[s] = mean_nfe
        if log:
            log(f"  batch {batch}: round {r + 1}/{rounds} done")
    return {s: statistics.median(v) for s, v in times.items()}, nfe, times


def randomize_zero_parameters(model, std: float = 1e-3) -> None:
    """Give the path's all-zero tensors (gates, heads at init) small random values."""
    with torch.no_grad():
        for p in model.path.parameters():
            if not bool(p.any()):
                p.normal_(0.0, std)


def run_generate_bench(recipe: Recipe, steps=(0, 1, 8), solver: str = "euler", batch: int = 1, new_tokens: int = 64,
                       repeats: int = 3, adapter: str | None = None, device: str | None = None, load=None,
                       progress: bool = True) -> dict:
    """Time ``base.generate`` and the adapter at each of ``steps`` (``steps=0`` always included);
    ``adapter``: a trained l2d folder, else a fresh path from ``recipe.l2d``. ``load(recipe,
    device) -> (base, tokenizer)`` as in :func:`l2d.bench.run_bench`."""
    from .bench import _load_for
    from .model import L2DModel, get_l2d_model
    from .solvers import FIXED_SOLVERS

    if solver not in FIXED_SOLVERS:
        raise RecipeError(f"--generate: --solver must be a fixed-grid solver ({', '.join(FIXED_SOLVERS)}); "
                          f"got {solver!r}")
    steps = sorted({0, *steps})
    if steps[0] < 0:
        raise RecipeError(f"--generate: --steps must be >= 0, got {steps[0]}")
    if batch < 1 or new_tokens < 1 or repeats < 1:
        raise RecipeError(f"--generate: need --batch, --new-tokens and --repeats >= 1 "
                          f"(got {batch}, {new_tokens}, {repeats})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(recipe.train.seed)
    base, tok = (load or _load_for)(recipe, dev)
    if adapter:
        model = L2DModel.from_pretrained(base, adapter)
    else:
        model = get_l2d_model(base, recipe.l2d)
        randomize_zero_parameters(model)
    model = model.to(dev).eval()
    settings = [("base", None, 0)] + [("l2d", solver, s) for s in steps]
    log = (lambda m: print(m, flush=True)) if progress else None
    med, nfe, raw = measure(model, tok, batch, settings, new_tokens, repeats, log)
    rows = [{"setting": label(s), "steps": s[2], "ms_per_token": 1e3 * med[s], "nfe_per_token": nfe[s],
             "vs_base": med[s] / med[settings[0]], "ms_per_token_rounds": [1e3 * x for x in raw[s]]}
            for s in settings]
    return {"device": str(dev), "model": recipe.model.name_or_path, "adapter": adapter, "batch": batch,
            "new_tokens": new_tokens, "prompt_tokens": int(prompt_ids(tok, 1)[0].shape[1]), "rows": rows}


def format_generate_table(result: dict) -> str:
    """Markdown table of :func:`run_generate_bench`'s result. ``eval / base step``: the cost of
    one evaluation of the path relative to one base decoding step, ``(t(N) - t(0)) / NFE / t(base)``."""
    rows = result["rows"]
    base = rows[0]["ms_per_token"]
    zero = next(r["ms_per_token"] for r in rows if r["setting"] == "l2d steps=0")
    head = (f"{result['model']}{' + ' + result['adapter'] if result['adapter'] else ' + a fresh path'} on "
            f"{result['device']}: batch {result['batch']}, {result['new_tokens']} new tokens after a "
            f"{result['prompt_tokens']}-token prompt, greedy")
    lines = [head, "", "| setting | ms/token | x base | NFE/token | eval / base step |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        per_eval = f"{(r['ms_per_token'] - zero) / r['nfe_per_token'] / base:.3f}" if r["nfe_per_token"] else ""
        lines.append(f"| {r['setting']} | {r['ms_per_token']:.1f} | {r['vs_base']:.2f} | {r['nfe_per_token']:.0f} "
                     f"| {per_eval} |")
    return "\n".join(lines)
