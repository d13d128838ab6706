"""Run a task through a model at several step counts and score it.

    rows = evaluate(model, tokenizer, get_task("gsm8k", limit=200), steps_list=[0, 2, 4, 8])
    print(format_table(summary_rows(rows)))
    write_json("results.json", {"l2d": rows})

One runner for every row of a comparison table: an :class:`~l2d.model.L2DModel` (any ``steps``;
``steps=0`` is its frozen base) and a plain transformers / peft model (``steps=0`` only, through its
own ``generate``), so base, LoRA and L2D rows are produced by the same prompts, batching, decoding
and scoring. Per step count a row holds accuracy with a Wilson interval (pass@k for code with
``samples > 1``), diffusion-path evaluations (NFE) per generated token, and time per generated
token.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Sequence

import torch

from ..generation import decoding_protocol
from .code import STOP_SEQUENCES, truncate_at_stop
from .metrics import accuracy, mean_pass_at_k, plot_steps
from .tasks import Example, Task

__all__ = ["render_prompts", "generate_completions", "evaluate", "summary_rows", "write_json",
           "plot_rows", "PLAIN_MATH_STOPS"]

# Few-shot plain prompts read "Question: ...\nAnswer: ...\n\n": the answer ends where the model
# starts to write the next question.
PLAIN_MATH_STOPS = ("\nQuestion:",)


def _is_l2d(model) -> bool:
    from ..model import L2DModel

    return isinstance(model, L2DModel)


def _is_mdm(model) -> bool:
    from ..mdm import MaskedDiffusionModel

    return isinstance(model, MaskedDiffusionModel)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompts(tokenizer, examples: Sequence[Example], prompt_format: str = "auto") -> list[str]:
    """Prompt texts: ``chat`` (the example's messages through the tokenizer's chat template, with
    the generation prompt), ``plain`` (the example's few-shot plain-text prompt), or ``auto``
    (chat when the tokenizer has a template)."""
    from ..data import render_prompt

    fmt = _resolve_format(tokenizer, prompt_format)
    if fmt == "chat":
        return [render_prompt(tokenizer, ex.messages) for ex in examples]
    return [ex.prompt for ex in examples]


def _resolve_format(tokenizer, prompt_format: str) -> str:
    if prompt_format not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt_format must be auto, chat or plain, got {prompt_format!r}")
    if prompt_format == "auto":
        return "chat" if _has_chat_template(tokenizer) else "plain"
    return prompt_format


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    base = model.base_model if _is_l2d(model) else model
    gen_eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if e is None:
            continue
        ids.update(int(x) for x in (e if isinstance(e, (list, tuple)) else [e]))
    return sorted(ids)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[str], *, steps: int | None = 0,
                         batch_size: int = 16, max_new_tokens: int = 256, solver: str = "euler",
                         do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                         seeds: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
                         add_special_tokens: bool = False, progress: bool = True, desc: str = "generate",
                         **generate_kwargs) -> dict:
    """Batched, left-padded generation of one completion per prompt.

    Prompts are sorted by length (less padding) and the results put back in order. With an L2D
    model every row gets its own seed (``seeds[i]``, default ``seed + i``), so a row's noise does
    not depend on what it is batched with. Returns ``completions`` (decoded, cut at the stop
    strings), ``generated_tokens`` (per prompt, up to and including EOS), ``nfe`` (diffusion-path
    evaluations summed over the generated tokens of every row) and ``seconds`` (generation wall
    time, tokenization and decoding excluded).
    """
    from tqdm.auto import tqdm

    l2d, mdm = _is_l2d(model), _is_mdm(model)
    if mdm and not steps:
        raise ValueError("a masked diffusion model decodes in steps >= 1 forward passes (steps=0 has no meaning).")
    if not (l2d or mdm) and steps not in (0, None):
        raise ValueError(f"steps={steps} needs an L2D model: a plain model has no diffusion path (use steps=0).")
    if seeds is None:
        seeds = [seed + i for i in range(len(prompts))]
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = model.device
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    completions: list[str | None] = [None] * len(prompts)
    n_generated = [0] * len(prompts)
    total_nfe, seconds = 0.0, 0.0
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        ids, mask = _left_padded([encoded[i] for i in idx], pad, device)
        width = ids.shape[1]
        t0 = time.perf_counter()
        row_nfe = None  # [B, new] each row's path evaluations per token (L2D only)
        if mdm:  # every new position decoded at once in `steps` forward passes (l2d.mdm.generation)
            out = model.generate(ids, mask, max_new_tokens=max_new_tokens, steps=steps, do_sample=do_sample,
                                 temperature=temperature, seed=[int(seeds[i]) for i in idx],
                                 eos_token_id=eos or None, pad_token_id=pad, return_dict_in_generate=True)
            sequences = out.sequences
        elif l2d:
            out = model.generate(ids, mask, max_new_tokens=max_new_tokens, steps=steps, solver=solver,
                                 do_sample=do_sample, temperature=temperature, seed=[int(seeds[i]) for i in idx],
                                 eos_token_id=eos or None, pad_token_id=pad, stop_strings=stop_strings or None,
                                 tokenizer=tokenizer if stop_strings else None, return_dict_in_generate=True,
                                 **generate_kwargs)
            sequences, row_nfe = out.sequences, out.row_nfe  # each row's own (EarlyStop)
        else:
            if do_sample:
                torch.manual_seed(int(seeds[idx[0]]))
            kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad,
                      eos_token_id=eos or None)
            if do_sample:
                kw["temperature"] = temperature
            else:  # silence the sampling defaults some generation configs carry
                kw.update(temperature=None, top_p=None, top_k=None)
            if stop_strings:
                kw.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
            sequences = model.generate(input_ids=ids, attention_mask=mask, **kw, **generate_kwargs)
        seconds += time.perf_counter() - t0
        new = sequences[:, width:].tolist()
        for r, i in enumerate(idx):
            row = new[r]
            n = len(row)
            for j, tok in enumerate(row):
                if tok in eos:
                    n = j + 1
                    break
            n_generated[i] = n
            # A row that stopped early spent no evaluations after its end, but the batch loop
            # kept going for the others: count each row's own tokens only.
            # (masked diffusion: the row's forward passes, whatever its length)
            if mdm:
                total_nfe += steps
            elif row_nfe is not None:
                total_nfe += int(row_nfe[r, :n].sum())
            text = tokenizer.decode(row[:n], skip_special_tokens=True)
            completions[i] = truncate_at_stop(text, stop_strings or ())
    return {"completions": completions, "generated_tokens": n_generated, "nfe": total_nfe, "seconds": seconds}


def _left_padded(rows: list[list[int]], pad: int, device):
    """``(input_ids, attention_mask)`` [B, longest]: the last prompt token sits at the end of every row."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _default_stops(task: Task, fmt: str) -> list[str] | None:
    if fmt != "plain":
        return None
    return list(STOP_SEQUENCES) if task.kind == "code" else list(PLAIN_MATH_STOPS)


def evaluate(model, tokenizer, task: Task, steps_list: Sequence[int] = (0,), *, n: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 256, solver: str | None = None, samples: int = 1,
             temperature: float = 0.8, seed: int = 0, prompt_format: str = "auto", protocol: str = "greedy",
             stop_strings: Sequence[str] | None = None, method: str | None = None,
             keep_completions: bool = False, progress: bool = True, workers: int = 2,
             **generate_kwargs) -> list[dict]:
    """Evaluate ``task`` at each number of steps in ``steps_list``; one result row per entry.

    Args:
        model: an L2DModel (any steps) or a plain transformers / peft model (steps 0 only).
        task: an :class:`~l2d.eval.tasks.Task`; its first ``n`` examples are used.
        samples: completions per example. 1: one completion, accuracy with a 95% Wilson
            interval. More: sampling at ``temperature``, pass@1 (as ``accuracy``, the interval
            over all samples) plus pass@k for k in 1, 10, samples (those <= samples).
        solver: the ODE solver (default: the protocol's, else euler).
        protocol: ``greedy`` (argmax tokens; the expected latent drives the ODE) or ``paper``
            (``l2d.generation.DECODING_PROTOCOLS``: the argmax token's latent drives a midpoint
            solve and every token is sampled at temperature 1; a LoRA or base model is sampled
            at temperature 1 too).
        prompt_format: ``chat`` (chat template), ``plain`` (few-shot text) or ``auto``.
        stop_strings: where a completion ends (default: none for chat, the next few-shot
            question or top-level statement for plain prompts).
        generate_kwargs: passed to ``generate`` (grid, readout, estimate, max_nfe, ...).
    Returns:
        rows with ``method, task, steps, solver, n, samples, correct, accuracy, low, high,
        nfe_per_token, ms_per_token, tokens_per_s, generated_tokens, seconds`` (+ ``pass@k``).
        ``nfe_per_token`` counts diffusion-path evaluations (0 for a base or LoRA model);
        ``ms_per_token`` is generation wall time over generated tokens, batched (amortised).
    """
    if samples < 1:
        raise ValueError("samples must be at least 1")
    if not steps_list:
        raise ValueError("steps_list is empty")
    examples = task.examples if n is None else task.examples[:n]
    if not examples:
        raise ValueError(f"task {task.name} has no examples")
    fmt = _resolve_format(tokenizer, prompt_format)
    prompts = render_prompts(tokenizer, examples, fmt)
    stops = list(stop_strings) if stop_strings is not None else _default_stops(task, fmt)
    method = method or ("l2d" if _is_l2d(model) else "mdm" if _is_mdm(model) else "model")
    decoding = decoding_protocol(protocol)
    solver = solver or decoding.pop("solver", "euler")
    decoding.pop("solver", None)
    do_sample = decoding.pop("do_sample", False) or samples > 1
    temperature = decoding.pop("temperature", temperature)
    if _is_l2d(model):  # the estimate that drives the ODE (explicit generate_kwargs win)
        generate_kwargs = {**decoding, **generate_kwargs}
    rows = []
    for steps in steps_list:
        all_completions, outcomes = [], []  # outcomes[s][i]: sample s of example i passed
        tokens = nfe = seconds = 0.0
        for s in range(samples):
            out = generate_completions(
                model, tokenizer, prompts, steps=steps, batch_size=batch_size, max_new_tokens=max_new_tokens,
                solver=solver, do_sample=do_sample, temperature=temperature,
                seeds=[seed + 1_000_003 * s + i for i in range(len(prompts))], stop_strings=stops,
                add_special_tokens=fmt == "plain", progress=progress,
                desc=f"{method} {task.name} steps={steps}" + (f" sample {s + 1}/{samples}" if samples > 1 else ""),
                **generate_kwargs)
            outcomes.append(task.score_all(examples, out["completions"], workers=workers))
            all_completions.append(out["completions"])
            tokens += sum(out["generated_tokens"])
            nfe += out["nfe"]
            seconds += out["seconds"]
        flat = [o for per_sample in outcomes for o in per_sample]
        acc = accuracy(flat)
        row = {"method": method, "task": task.name, "steps": steps, "solver": solver if _is_l2d(model) else None,
               "protocol": protocol,
               "n": len(examples), "samples": samples, "correct": acc.correct, "accuracy": acc.value,
               "low": acc.low, "high": acc.high,
               "nfe_per_token": nfe / tokens if tokens else 0.0,
               "ms_per_token": 1000 * seconds / tokens if tokens else None,
               "tokens_per_s": tokens / seconds if seconds else None,
               "generated_tokens": int(tokens), "seconds": seconds}
        _add_samples(row, examples, outcomes, all_completions if keep_completions else None)
        rows.append(row)
    return rows


def _add_samples(row: dict, examples, outcomes: list, all_completions: list | None) -> None:
    """pass@k for several samples per example (``accuracy`` is then pass@1); each example's
    completions and outcomes when ``all_completions`` are kept."""
    samples = len(outcomes)
    if samples > 1:
        counts = [(samples, sum(outcomes[s][i] for s in range(samples))) for i in range(len(examples))]
        for k in sorted({1, 10, samples}):
            if k <= samples:
                row[f"pass@{k}"] = mean_pass_at_k(counts, k)
        row["accuracy"] = row["pass@1"]
    if all_completions is not None:
        row["completions"] = [{"id": ex.id, "gold": ex.gold,
                               "completions": [all_completions[s][i] for s in range(samples)],
                               "passed": [bool(outcomes[s][i]) for s in range(samples)]}
                              for i, ex in enumerate(examples)]


def summary_rows(rows: Sequence[dict], extra: dict | None = None) -> list[dict]:
    """Rows for :func:`~l2d.eval.metrics.format_table`: percentages and rounded timings."""
    out = []
    for r in rows:
        line = {"method": r["method"], "protocol": r.get("protocol", "greedy"), "steps": r["steps"],
                "n": r["n"] * r.get("samples", 1),
                "accuracy %": round(100 * r["accuracy"], 1),
                "95% CI": f"[{100 * r['low']:.1f}, {100 * r['high']:.1f}]"}
        for key in sorted(k for k in r if k.startswith("pass@")):
            line[key + " %"] = round(100 * r[key], 1)
        line["NFE/token"] = round(r["nfe_per_token"], 2)
        line["ms/token"] = None if r["ms_per_token"] is None else round(r["ms_per_token"], 1)
        line["tokens/s"] = None if r["tokens_per_s"] is None else round(r["tokens_per_s"], 1)
        if extra and r["method"] in extra:
            line.update(extra[r["method"]])
        out.append(line)
    return out


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def write_json(path: str | os.PathLike, results: dict) -> str:
    """Write ``results`` (rows grouped by method, plus any metadata) as indented JSON, atomically."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(results), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def plot_rows(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> str:
    """Accuracy (with its interval) and NFE per token against steps, one line per method."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    return plot_steps(by_method, os.fspath(path), title=title)
