"""Decoding a masked diffusion LM: every unknown position starts as [MASK], ``steps`` steps unmask them.

    x = prompt + [MASK] * n   (generate)   or   text with [MASK] anywhere   (infill)
    for s in 0 .. steps-1:
        one forward pass over the whole sequence (bidirectional)
        predict every still-masked position i from the output at i-1 (the AR shift)
        commit the k_s most confident predictions, k_s = floor((s+1) n / steps) - floor(s n / steps)

so ``sum_s k_s = n``: after ``steps`` steps nothing is masked, each step commits about
``n / steps`` tokens, and ``steps = n`` commits one per step. A position's confidence is the
probability of its chosen token (the argmax, or the sampled token under temperature / top-k /
top-p). [MASK] itself is never chosen. Cost: ``steps`` forward passes of the full sequence (no KV
cache: attention is bidirectional), whatever ``n``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.utils import ModelOutput


@dataclass
class MaskedDiffusionGenerateOutput(ModelOutput):
    """``sequences`` [B, T] (prompt and filled positions), ``forward_passes`` (model evaluations of
    the batch, = steps), ``committed`` [steps, B] (tokens committed per step and row); ``texts``
    (infill of text only) the filled texts."""

    sequences: torch.Tensor | None = None
    forward_passes: int | None = None
    committed: torch.Tensor | None = None
    texts: list | None = None


def commit_schedule(n: int, steps: int) -> list[int]:
    """Tokens committed at each step: ``floor((s+1) n / steps) - floor(s n / steps)``, summing to ``n``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (each step is one forward pass), got {steps}")
    if steps > n:
        raise ValueError(f"steps={steps} is more than the {n} positions to fill: every step must commit at "
                         f"least one token; use steps <= {n}.")
    return [(s + 1) * n // steps - s * n // steps for s in range(steps)]


def _filter(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose probability reaches ``top_p``."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p          # mass before this token already reached top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def _choose(logits: torch.Tensor, owners: torch.Tensor, do_sample: bool, temperature: float,
            top_k: int | None, top_p: float | None, generators: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, confidence) per row of ``logits`` [N, V]; ``owners[j]`` is row j's batch row (its generator)."""
    if not do_sample:
        probs = logits.softmax(-1)
        conf, token = probs.max(-1)
        return token, conf
    probs = _filter(logits / temperature, top_k, top_p).softmax(-1)
    token = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    for b in owners.unique().tolist():
        rows = (owners == b).nonzero().squeeze(1)
        token[rows] = torch.multinomial(probs[rows], 1, generator=generators[b]).squeeze(1)
    return token, probs.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def unmask(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, fill: torch.Tensor, steps: int,
           do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | Sequence[int] | None = None) -> MaskedDiffusionGenerateOutput:
    """Fill the positions ``fill`` [B, T] (bool) of ``input_ids`` in ``steps`` steps (see the module doc)."""
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    B, T = input_ids.shape
    fill = fill.bool() & attention_mask.bool()
    if fill[:, 0].any():
        raise ValueError("position 0 cannot be filled: the output before a token predicts it (the AR shift), so "
                         "every row needs at least one given token (e.g. BOS) before its first [MASK].")
    counts = fill.sum(1).tolist()
    if not any(counts):
        raise ValueError("nothing to fill: the input holds no [MASK] position")
    plans = [commit_schedule(n, steps) if n else [0] * max(steps, 1) for n in counts]
    plan = torch.tensor(plans, dtype=torch.long).T                     # [steps, B]
    seeds = [seed] * B if seed is None or isinstance(seed, int) else list(seed)
    if len(seeds) != B:
        raise ValueError(f"seed: {len(seeds)} seeds for {B} rows")
    generators = [torch.Generator(device=input_ids.device) for _ in range(B)]
    for g, s in zip(generators, seeds):
        if s is None:
            g.seed()
        else:
            g.manual_seed(int(s))
    was_training = model.training
    model.eval()
    mask_id = model.mask_token_id
    x = input_ids.masked_fill(fill, mask_id)
    remaining = fill.clone()
    try:
        for s in range(steps):
            hidden = model.hidden_states(x, attention_mask)
            target = remaining[:, 1:]                                   # position i is read at row i - 1
            logits = model.head(hidden[:, :-1][target]).float()
            logits[:, mask_id] = float("-inf")
            owner, pos = target.nonzero(as_tuple=True)
            token, conf = _choose(logits, owner, do_sample, temperature, top_k, top_p, generators)
            for b in range(B):
                k = int(plan[s, b])
                if not k:
                    continue
                rows = (owner == b).nonzero().squeeze(1)
                best = rows[torch.topk(conf[rows], k).indices]
                x[b, pos[best] + 1] = token[best]
                remaining[b, pos[best] + 1] = False
    finally:
        model.train(was_training)
    assert not remaining.any()
    return MaskedDiffusionGenerateOutput(sequences=x, forward_passes=steps, committed=plan)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, steps: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int | Sequence[int] | None = None, return_dict_in_generate: bool = False):
    """Continue each (left-padded) prompt with ``max_new_tokens`` tokens decoded in ``steps`` steps.

    ``steps`` (default ``max_new_tokens``) forward passes in all; ``1 <= steps <= max_new_tokens``.
    Greedy, or sampled (``do_sample``) at ``temperature`` with ``top_k`` / ``top_p``; ``seed`` an
    int or one per row. Every new position is decoded at once, so an end-of-sequence token may come
    anywhere: after the first ``eos_token_id`` of a row its tokens become ``pad_token_id`` (default:
    that eos), as a transformers ``generate`` leaves a finished row. Returns the sequences [B, T +
    max_new_tokens], or with ``return_dict_in_generate`` a :class:`MaskedDiffusionGenerateOutput`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.shape[1] < 1:
        raise ValueError("generate needs a prompt of at least one token (e.g. BOS): the output before a "
                         "position predicts it")
    steps = max_new_tokens if steps is None else steps
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    new = torch.full((B, max_new_tokens), model.mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([input_ids, new], 1)
    mask = torch.cat([attention_mask, torch.ones_like(new, dtype=attention_mask.dtype)], 1)
    fill = torch.zeros_like(ids, dtype=torch.bool)
    fill[:, input_ids.shape[1]:] = True
    if not attention_mask[:, -1].bool().all():
        raise ValueError("generate wants left-padded prompts (every row's last column a real token)")
    out = unmask(model, ids, mask, fill, steps, do_sample, temperature, top_k, top_p, seed)
    if eos_token_id is not None:
        eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                              device=ids.device)
        pad = pad_token_id if pad_token_id is not None else int(eos[0])
        gen = out.sequences[:, input_ids.shape[1]:]
        ended = torch.isin(gen, eos).long().cumsum(1)
        after = (ended - torch.isin(gen, eos).long()) > 0             # strictly after the first eos
        out.sequences[:, input_ids.shape[1]:] = gen.masked_fill(after, pad)
    return out if return_dict_in_generate else out.sequences


def infill(model, inputs, attention_mask: torch.Tensor | None = None, *, steps: int | None = None,
           tokenizer=None, placeholder: str | None = None, do_sample: bool = False, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
           return_dict_in_generate: bool = False):
    """Fill every [MASK] of ``inputs``, given the context on both sides, in ``steps`` steps.

    ``inputs``: token ids [B, T] holding ``model.mask_token_id`` where a token is unknown (given
    tokens are kept as they are), or a text (or list of texts, one per row, of equal token length
    after tokenizing) with ``placeholder`` (default: the [MASK] token's text) once per unknown token;
    texts need ``tokenizer`` and come back as texts. ``steps`` defaults to the number of masks.
    """
    texts = None
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        if tokenizer is None:
            raise ValueError("infill of text needs tokenizer=")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        rows = [_encode_with_masks(t, tokenizer, model.mask_token_id, placeholder) for t in texts]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("texts of different token lengths: infill them one at a time or pass padded ids")
        single, inputs = isinstance(inputs, str), torch.tensor(rows, device=model.device)
    ids = torch.as_tensor(inputs)
    if ids.dim() == 1:
        ids = ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    fill = (ids == model.mask_token_id) & attention_mask.bool()
    n = int(fill.sum(1).min())
    out = unmask(model, ids, attention_mask, fill, n if steps is None else steps, do_sample, temperature,
                 top_k, top_p, seed)
    if texts is None:
        return out if return_dict_in_generate else out.sequences
    decoded = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    if return_dict_in_generate:
        out.texts = decoded
        return out
    return decoded[0] if single else decoded


def _encode_with_masks(text: str, tokenizer, mask_id: int, placeholder: str | None) -> list[int]:
    """Token ids of ``text`` with ``mask_id`` for each ``placeholder``; the pieces between are
    tokenized apart (special tokens such as BOS only before the first)."""
    placeholder = placeholder or tokenizer.convert_ids_to_tokens(mask_id)
    pieces = text.split(placeholder)
    if len(pieces) == 1:
        raise ValueError(f"the text holds no {placeholder!r}: mark each unknown token with it")
    ids = tokenizer(pieces[0])["input_ids"]
    for piece in pieces[1:]:
        ids.append(mask_id)
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
    return ids
