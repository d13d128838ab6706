"""Generation: autoregressive over tokens, an ODE over each new token's latent.

For every new token: (1) the frozen main path runs once on the last token, updating its KV
cache and keeping its pre-norm hidden state; (2) from ``x ~ N(0, sigma^2 I)`` at ``t = 0`` a solver
integrates ``dx/dt = v(t, x)`` to ``t = 1``, where each evaluation (NFE) runs only the diffusion
path for that one position against the cached keys/values (nothing is written to the cache);
(3) the logits of the final evaluation pick the token. With ``context="adapted"`` a second cache
holds the keys/values of the base with the path's deltas on; it grows by one forward per token.

What ``steps`` counts: steps of a fixed-grid solver over ``[0, 1]``. A token then costs
``steps * k + 1`` evaluations, ``k`` = 1 (euler), 2 (midpoint, heun), 4 (rk4), the ``+ 1``
being the read-out at ``t = 1`` on the integrated latent (``readout="final"``). With
``readout="last"`` the token comes from the last evaluation inside the solve (no extra NFE; with
euler and one step that evaluation is at ``t = 0``, i.e. the base model). ``steps=0`` skips the
path entirely: the base model, token for token. Adaptive solvers take ``steps=None``; their NFE
is whatever reaches ``rtol``/``atol``, capped by ``max_nfe``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .latent import OPEN_GATE_T0
from .main_path import positions_from_mask
from .sampling import multinomial, pick_token, randn, row_generators
from .solvers import (ADAPTIVE_SOLVERS, FIXED_SOLVERS, StopIntegration, check_solver,
                      integrate_adaptive, integrate_fixed)

if TYPE_CHECKING:  # the model drives nothing here: the token loop drives the model through its methods
    from .model import L2DModel

ESTIMATES = ("argmax", "sample", "expected")

# How a token is decoded, as ``generate`` keyword arguments (``generate(ids, steps=7, **DECODING_PROTOCOLS["paper"])``).
# greedy: the expected latent drives the ODE and the final logits' argmax is the token.
# paper: the reference's protocol: the argmax token's latent drives the ODE, the midpoint solver
#   (7 steps on linspace(0, 1, 8) = 15 NFE with the read-out), the token *sampled* at temperature 1.
DECODING_PROTOCOLS = {
    "greedy": {"estimate": "expected", "do_sample": False},
    "paper": {"estimate": "argmax", "solver": "midpoint", "do_sample": True, "temperature": 1.0},
}


def decoding_protocol(name: str) -> dict:
    """The ``generate`` keyword arguments of a named decoding protocol (a fresh dict)."""
    if name not in DECODING_PROTOCOLS:
        raise ValueError(f"unknown decoding protocol {name!r}; choose one of {', '.join(DECODING_PROTOCOLS)}.")
    return dict(DECODING_PROTOCOLS[name])


@dataclass
class L2DGenerateOutput:
    """``sequences``: [B, prompt + new]; ``nfe``: the path evaluations run for each generated token
    (batched calls); ``row_nfe``: [B, new] those each row took part in. They differ only under
    :class:`EarlyStop`, which drops each row from its token's solve once that row has settled."""

    sequences: torch.Tensor
    nfe: list[int] = field(default_factory=list)
    row_nfe: torch.Tensor | None = None

    @property
    def mean_nfe(self) -> float:
        return sum(self.nfe) / max(1, len(self.nfe))


@dataclass
class EarlyStop:
    """Stop integrating a token once its prediction has settled: the argmax unchanged over
    ``patience`` consecutive evaluations with probability at least ``threshold``.

    Row by row: a settled row leaves the batch (its latent frozen, its token read from the
    evaluation where it settled) and the solve goes on for the others, so a row's result and its
    evaluations do not depend on what it is batched with."""

    threshold: float = 0.9
    patience: int = 2


@dataclass(frozen=True)
class SolverSettings:
    """How each token's latent is integrated: ``generate``'s solver arguments (see its docstring)."""

    steps: int | None = 0
    solver: str = "euler"
    grid: str = "uniform"
    rtol: float = 1e-3
    atol: float = 1e-3
    max_nfe: int | None = None
    estimate: str = "expected"
    estimate_temperature: float | str = 1.0  # the estimate's temperature (a number or "1-t")
    readout: str = "final"
    early_stop: EarlyStop | None = None
    guidance_scale: float | None = None


class TokenField:
    """The velocity of one token's latent, ``v(t, x) = (x1_hat - x) / (1 - t)``.

    ``x1_hat`` is the latent of the argmax token, of a token sampled at the estimate's temperature
    ``tau`` (a number, or ``"1-t"`` as the reference uses for code), or the expected latent
    ``softmax(logits / tau) @ Z``. Each evaluation feeds the previous one's expected latent as
    ``z_hat`` (self-conditioning; zeros for an adapter trained with ``self_conditioning=0``,
    which never saw anything else there). With guidance the conditional and unconditional passes run
    as one batch and the *velocities* mix, ``v = w v_cond + (1 - w) v_uncond`` (DESIGN.md, as the
    paper); the logits kept for the read-out and early stopping are the conditional ones. The
    state and the velocity are float64 whatever the model's dtype. The denominator is floored at
    ``min_gap``: adaptive solvers evaluate slightly beyond ``t = 1``.

    With ``merge_init="open"`` the gate jumps from 0 at ``t = 0`` (the base, by construction) to
    about 1 just after, so the field is evaluated no earlier than ``t = OPEN_GATE_T0``, its right
    limit: evaluated at 0 itself, every trajectory's first step would head for the base's guess,
    and with one step the read-out at ``t = 1`` would find that guess as its clean latent.

    ``ctx``: the stream's context for the ``B`` rows (doubled here for guidance). ``cond_cache``: a
    :class:`ConditioningCache` shared by the tokens of one ``generate`` call (what depends on ``t``
    alone is computed once per distinct ``t``); a fresh one by default.
    """

    def __init__(self, model: "L2DModel", ctx, h_main, class_labels, latent_table, estimate: str,
                 guidance_scale, temperature, generator, max_nfe, early_stop: EarlyStop | None,
                 min_gap: float = 1e-3, cond_cache: "ConditioningCache | None" = None, h_start=None):
        self.model, self.h_main, self.cls = model, h_main, class_labels
        self.Z = latent_table
        self.estimate, self.w = estimate, guidance_scale
        self.temperature, self.generator = temperature, generator
        self.max_nfe, self.early_stop, self.min_gap = max_nfe, early_stop, min_gap
        self.t_floor = OPEN_GATE_T0 if model.config.merge_init == "open" else 0.0
        B = h_main.shape[0]
        self.nfe = 0            # evaluations run (batched)
        self.row_nfe = torch.zeros(B, dtype=torch.long)  # evaluations each row took part in
        self.logits = None      # conditional logits of each row's last evaluation [B, 1, V]
        self._all_logits = None  # with guidance: conditional and unconditional halves [2B, 1, V]
        self.z_hat = None
        # EarlyStop: the rows still being solved (None: all) and each row's run of settled evaluations
        self.active = None
        self._streak, self._last_argmax = torch.zeros(B, dtype=torch.long), None
        self._subset = None     # (active rows, their ctx, h_main, h_start): rebuilt when rows settle
        self._h_start = h_start
        if guidance_scale is None:
            self.ctx, self._h_main, self._cls = ctx, h_main, class_labels
        else:  # cond and uncond as one batch: the rows twice, the second half with the null class
            self.ctx, self._h_main = ctx.doubled(), h_main.repeat(2, 1, 1)
            self._cls = with_null_class(class_labels, model.config.num_classes)
            self._h_start = None if h_start is None else h_start.repeat(2, 1, 1)
        self.cond = cond_cache if cond_cache is not None else ConditioningCache(model, self._cls)
        # With the expected latent at temperature 1, x1_hat is the self-conditioning estimate itself.
        self._x1_is_z_hat = estimate == "expected" and temperature == 1.0 and guidance_scale is None

    def _halves(self, rows: torch.Tensor) -> torch.Tensor:
        """Indices of ``rows`` in the evaluated batch: the rows, then (guidance) their unconditional twins."""
        return rows if self.w is None else torch.cat([rows, rows + self.row_nfe.shape[0]])

    def _parts(self):
        """(ctx, h_main, h_start) of the rows still being solved."""
        if self.active is None:
            return self.ctx, self._h_main, self._h_start
        if self._subset is None or self._subset[0] is not self.active:
            idx = self._halves(self.active).to(self._h_main.device)
            ctx = self.ctx.batch_rows(idx, first_layer=self.model.path.stream_start)
            self._subset = (self.active, ctx, self._h_main.index_select(0, idx),
                            None if self._h_start is None else self._h_start.index_select(0, idx))
        return self._subset[1:]

    def _hidden(self, t: float, x: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
        """The path's merged hidden state at ``(t, x)`` for the rows still being solved, with the
        ``t``-only parts from the cache."""
        cond = self.cond.get(t, self.row_nfe.shape[0] * (1 if self.w is None else 2), x.device)
        if self.active is not None:
            cond = cond.batch_rows(self._halves(self.active).to(x.device))
        if self.w is not None:
            x = x.repeat(2, 1, 1)
            z_hat = z_hat if z_hat.shape[0] == x.shape[0] else z_hat.repeat(2, 1, 1)
        ctx, h_main, h_start = self._parts()
        return self.model.path(self.model.arch, ctx, h_main, x, None, z_hat, None, h_start=h_start, cond=cond)

    def _update(self, full: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
        """``full`` with the rows being solved replaced by ``part`` (settled rows keep theirs)."""
        if self.active is None or full is None:
            return part
        return full.index_copy(0, self._halves(self.active).to(part.device), part)

    def evaluate(self, t: float, x: torch.Tensor, need_z_hat: bool = True) -> torch.Tensor:
        """Logits [B, 1, V] of the path at ``(t, x)`` (guidance applied); updates ``z_hat``
        (skipped with ``need_z_hat=False``, for the read-out that no evaluation follows). Only the
        rows still being solved are evaluated; settled rows keep their last logits."""
        rows = self.active
        xa = x if rows is None else x.index_select(0, rows.to(x.device))
        # An adapter trained without the self-conditioning pass never saw a non-zero z_hat: it gets
        # zeros, as in training (self.z_hat still serves as the expected-latent estimate of x1).
        fed = self.z_hat is not None and self.model.config.self_conditioning > 0
        if fed:
            z_hat = self.z_hat if rows is None else self.z_hat.index_select(0, self._halves(rows).to(x.device))
        else:
            z_hat = torch.zeros(xa.shape, dtype=torch.float32, device=x.device)
        logits = self.model.head_logits(self._hidden(min(max(t, self.t_floor), 1.0), xa.float(), z_hat))
        self.nfe += 1
        self.row_nfe[slice(None) if rows is None else rows] += 1
        self._all_logits = self._update(self._all_logits, logits)
        full = self._all_logits
        self.logits = full if self.w is None else full[: full.shape[0] // 2]
        if need_z_hat:  # each half (cond, uncond) feeds its own previous estimate
            self.z_hat = self._update(self.z_hat, torch.softmax(logits, -1) @ self.Z)
        return self.logits

    def x1_hat(self, logits: torch.Tensor, t: float, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The clean-latent estimate from logits [R, 1, V] at time ``t`` (``rows``: the batch rows
        they belong to, whose random streams a sampled estimate draws from; None: all)."""
        if self.estimate == "argmax":
            return self.Z[logits.argmax(-1)]
        tau = self.temperature if self.temperature != "1-t" else max(1.0 - t, 1e-3)
        if self.estimate == "expected":
            return torch.softmax(logits / tau, -1) @ self.Z
        rngs = self.generator
        if isinstance(rngs, list) and rows is not None:
            rngs = [rngs[i] for i in rows.tolist()]
        if isinstance(rngs, list) and logits.shape[0] != len(rngs):  # guidance: both halves, same streams
            rngs = rngs * (logits.shape[0] // len(rngs))
        return self.Z[multinomial(torch.softmax(logits[:, 0] / tau, -1), rngs)]

    def __call__(self, t: float, x: torch.Tensor) -> torch.Tensor:
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise StopIntegration("max_nfe")
        logits = self.evaluate(t, x)
        if self.early_stop is not None and self._settle(logits):
            raise StopIntegration("settled")
        gap = max(1.0 - t, self.min_gap)
        if self.active is None:
            return self._velocity(t, x, gap, None)
        rows = self.active.to(x.device)  # settled rows stay where they are: zero velocity
        v_rows = self._velocity(t, x.index_select(0, rows), gap, self.active)
        return torch.zeros_like(x).index_copy(0, rows, v_rows.to(x.dtype))

    def _velocity(self, t: float, x: torch.Tensor, gap: float, rows: torch.Tensor | None) -> torch.Tensor:
        """``(x1_hat - x) / (1 - t)`` for ``rows`` (None: all) at their states ``x``, from the last
        evaluation (guidance: ``w v_cond + (1 - w) v_uncond``)."""
        def pick(full, index):  # the rows' part of a whole-batch tensor
            return full if rows is None else full.index_select(0, index.to(x.device))

        if self.w is None:
            x1 = pick(self.z_hat, rows) if self._x1_is_z_hat else self.x1_hat(pick(self.logits, rows), t, rows)
            return (x1.to(x.dtype) - x) / gap
        logits = pick(self._all_logits, None if rows is None else self._halves(rows))
        v = (self.x1_hat(logits, t, rows).to(x.dtype) - x.repeat(2, 1, 1)) / gap
        v_cond, v_uncond = v.chunk(2)
        return self.w * v_cond + (1 - self.w) * v_uncond

    def _settle(self, logits) -> bool:
        """Count each solved row's settled evaluations; rows at ``patience`` leave the solve.
        True once every row has."""
        rows = self.active if self.active is not None else torch.arange(logits.shape[0])
        top_p, top = torch.softmax(logits[:, 0].float(), -1).max(-1)
        top_p, top = top_p.cpu()[rows], top.cpu()[rows]
        confident = top_p >= self.early_stop.threshold
        same = torch.zeros_like(confident) if self._last_argmax is None else top == self._last_argmax[rows]
        self._streak[rows] = torch.where(same & confident, self._streak[rows] + 1, confident.long())
        if self._last_argmax is None:
            self._last_argmax = torch.zeros(logits.shape[0], dtype=torch.long)
        self._last_argmax[rows] = top
        still = rows[self._streak[rows] < self.early_stop.patience]
        if len(still) == len(rows):
            return False
        self.active = still
        return len(still) == 0


def with_null_class(class_labels: torch.Tensor, null: int) -> torch.Tensor:
    """Guidance's class labels: the rows' own [B], then the null class for each [B] -> [2B]."""
    return torch.cat([class_labels, torch.full_like(class_labels, null)])


class ConditioningCache:
    """What one evaluation needs from ``t`` alone, computed once per distinct ``t`` and reused.

    The conditioning ``c``, every block's adaLN modulation, the merge gate ``m(c_t) - m(c_0)``
    and ``s(t)`` depend on ``t`` and the class labels only, not on the latent. A fixed grid
    visits the same times for every token, so a ``generate`` call computes them once per grid
    time instead of once per evaluation (the same ops on the same inputs: identical results).
    Adaptive solvers visit new times each token; the cache is emptied past ``max_entries``.
    """

    def __init__(self, model: "L2DModel", class_labels: torch.Tensor, max_entries: int = 256):
        self.model, self.cls, self.max_entries = model, class_labels, max_entries
        self._store: dict = {}

    def get(self, t: float, rows: int, device):
        key = (t, rows)
        entry = self._store.get(key)
        if entry is None:
            if len(self._store) >= self.max_entries:
                self._store.clear()
            entry = self._store[key] = self._build(t, rows, device)
        return entry

    def _build(self, t: float, rows: int, device):
        tt = torch.full((rows, 1), t, device=device)
        return self.model.path.time_conditioning(tt, self.cls, modulations=True)


def _check_inputs(model: "L2DModel", input_ids, attention_mask, max_new_tokens, settings: SolverSettings,
                  class_label, temperature, top_k, top_p):
    check_solver(settings.solver, settings.steps, settings.rtol, settings.atol, settings.max_nfe)
    if settings.estimate not in ESTIMATES:
        raise ValueError(f"unknown estimate {settings.estimate!r}; choose one of {ESTIMATES}.")
    if temperature <= 0:
        raise ValueError("temperature must be positive (use do_sample=False for greedy decoding).")
    tau = settings.estimate_temperature
    if tau != "1-t" and not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"estimate_temperature must be a positive number or '1-t', got {tau!r}.")
    if settings.readout not in ("final", "last"):
        raise ValueError(f"readout must be 'final' or 'last', got {settings.readout!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be a positive integer.")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError("top_p must lie in (0, 1].")
    if settings.guidance_scale is not None and class_label is None:
        raise ValueError("guidance_scale needs class_label: guidance contrasts the class-conditional "
                         "velocity with the unconditional one.")
    model.check_inputs(input_ids, attention_mask, None)
    limit = getattr(model.base_model.config, "max_position_embeddings", None) or \
        getattr(model.base_model.config, "n_positions", None)
    if limit is not None:
        if input_ids.shape[1] > limit:
            raise ValueError(f"the prompt has {input_ids.shape[1]} tokens, longer than the model's context "
                             f"of {limit}: truncate it.")
        if input_ids.shape[1] + max_new_tokens > limit:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {limit}: lower max_new_tokens.")


def _hit_stop_string(tokenizer, generated: torch.Tensor, stop_strings) -> torch.Tensor:
    """Rows whose generated text so far contains a stop string."""
    texts = tokenizer.batch_decode(generated.tolist(), skip_special_tokens=False)
    return torch.tensor([any(s in text for s in stop_strings) for text in texts], device=generated.device)


def _eos_and_pad(model, eos_token_id, pad_token_id) -> tuple[set, int]:
    """The end-of-sequence ids (the base's generation config by default) and the id that pads
    finished rows (the config's pad id, else the smallest eos id, else 0)."""
    config = model.base_model.generation_config
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    eos = set() if eos_token_id is None else {
        int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])}
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        pad_token_id = min(eos) if pad_token_id is None and eos else (pad_token_id or 0)
    return eos, pad_token_id


@torch.no_grad()
def generate(model: "L2DModel", input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 64, steps: int | None = 0, solver: str = "euler", grid: str = "uniform",
             rtol: float = 1e-3, atol: float = 1e-3, max_nfe: int | None = None,
             estimate: str = "expected", estimate_temperature=None, readout: str = "final",
             early_stop: EarlyStop | None = None, class_label=None, guidance_scale: float | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, generator: torch.Generator | None = None,
             eos_token_id=None, pad_token_id: int | None = None, stop_strings=None, tokenizer=None,
             streamer=None, return_dict_in_generate: bool = False):
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (left-padded for batches).

    Args:
        steps: fixed-grid steps per token (0 = the base model); None with an adaptive solver.
        solver: euler | midpoint | heun | rk4 | dopri5 | bosh3 | adaptive_heun.
        grid: fixed-grid spacing, ``uniform`` or ``cosmap``.
        rtol, atol, max_nfe: adaptive tolerances and the evaluation cap per token (also caps fixed grids).
        estimate: the velocity's clean-latent estimate, ``argmax``, ``sample`` or ``expected``.
        estimate_temperature: the estimate's own temperature for ``sample``/``expected`` (a number, or
            ``"1-t"``, the reference's choice for code); None: ``temperature``.
        readout: ``final`` (one evaluation at t=1 on the integrated latent) or ``last``.
        early_stop: an :class:`EarlyStop` to end a token's solve once its prediction settles.
        class_label, guidance_scale: class conditioning and classifier-free guidance weight ``w``.
        do_sample, temperature, top_k, top_p: token choice from the final logits.
        seed: int (row i uses seed + i) or one per row; makes noise and sampling reproducible and
            independent of batching. generator: one torch.Generator for the whole batch instead.
        eos_token_id, pad_token_id, stop_strings (with ``tokenizer``), streamer: as in transformers.
    Returns:
        ``sequences`` [B, prompt + new], or an :class:`L2DGenerateOutput` with NFE per token.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    settings = SolverSettings(steps, solver, grid, rtol, atol, max_nfe, estimate,
                              temperature if estimate_temperature is None else estimate_temperature,
                              readout, early_stop, guidance_scale)
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, settings, class_label, temperature, top_k, top_p)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need tokenizer= to decode the generated text.")
    B = input_ids.shape[0]
    rngs = row_generators(seed, generator, B, input_ids.device)
    eos, pad_token_id = _eos_and_pad(model, eos_token_id, pad_token_id)
    cls = model.class_tensor(class_label, B)
    use_path = steps != 0 and not model.adapter_disabled
    latent_table, cond_cache = _per_call_parts(model, cls, guidance_scale) if use_path else (None, None)
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])

    sequences, mask = input_ids, attention_mask
    main = model.run_main_path(input_ids, mask)
    adapted = use_path and model.config.context == "adapted"  # a second cache: the context pass's K/V
    context = _context_step(model, main, input_ids, mask, main.position_ids) if adapted else None
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    nfe_log, row_nfe_log = [], []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(max_new_tokens):
        h_last = main.hidden[:, -1:]
        if use_path:
            logits, nfe, row_nfe = _solve_token(model, main, h_last, cls, latent_table, settings, rngs, cond_cache,
                                                context)
        else:
            logits, nfe, row_nfe = model.head_logits(h_last), 0, torch.zeros(B, dtype=torch.long)
        nfe_log.append(nfe)
        row_nfe_log.append(row_nfe)
        nxt = pick_token(logits[:, -1].float(), do_sample, temperature, top_k, top_p, rngs)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        sequences = torch.cat([sequences, nxt[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        finished |= _finished_rows(nxt, eos, stop_strings, tokenizer, sequences[:, input_ids.shape[1]:])
        if bool(finished.all()):
            break
        pos = positions_from_mask(mask)[:, -1:]
        main = model.run_main_path(nxt[:, None], mask, position_ids=pos, cache=main.cache)
        if context is not None:
            context = _context_step(model, main, nxt[:, None], mask, pos, cache=context)
    if streamer is not None:
        streamer.end()
    if return_dict_in_generate:
        return L2DGenerateOutput(sequences=sequences, nfe=nfe_log, row_nfe=torch.stack(row_nfe_log, 1))
    return sequences


def _per_call_parts(model, cls, guidance_scale):
    """What a ``generate`` call computes once, never per step: the latent table, and a cache for the
    path's ``t``-only parts (filled once per grid time)."""
    labels = cls if guidance_scale is None else with_null_class(cls, model.config.num_classes)
    return model.latent_table().float(), ConditioningCache(model, labels)


def _finished_rows(nxt, eos: set, stop_strings: list, tokenizer, generated) -> torch.Tensor:
    """Rows that just produced an end-of-sequence token or whose text now holds a stop string."""
    done = torch.zeros_like(nxt, dtype=torch.bool)
    if eos:
        done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
    if stop_strings:
        done |= _hit_stop_string(tokenizer, generated, stop_strings)
    return done


def _context_step(model, main, ids, mask, position_ids, cache=None):
    """The adapted context pass over ``ids`` (appended to ``cache``); the stream then starts from
    what its first layer receives there, so ``main.stream_input`` is replaced by the pass's own."""
    cache, start = model.context_pass(ids, mask, position_ids, cache)
    if start is not None:
        main.stream_input = start
    return cache


def token_field(model, main, h_last, cls, latent_table, settings: SolverSettings, rngs=None, cond_cache=None,
                context=None) -> TokenField:
    """The velocity field of the next token's latent, for every row of ``main`` (the main path's
    state after the last token; ``context``: the adapted context pass's cache, if any)."""
    B, T = h_last.shape[0], main.attention_mask.shape[1]
    query_index = torch.full((B, 1), T - 1, dtype=torch.long, device=h_last.device)
    ctx = model.stream_context(main, query_index, context)
    h_start = None if main.stream_input is None else main.stream_input[:, -1:]
    s = settings
    return TokenField(model, ctx, h_last, cls, latent_table, s.estimate, s.guidance_scale, s.estimate_temperature,
                      rngs, s.max_nfe, s.early_stop, cond_cache=cond_cache, h_start=h_start)


def _solve_token(model, main, h_last, cls, latent_table, settings: SolverSettings, rngs, cond_cache=None,
                 context=None):
    """Integrate one token's latent from noise to t=1; returns (logits [B, 1, V], the evaluations run,
    those each row took part in [B])."""
    B = h_last.shape[0]
    s = settings
    fld = token_field(model, main, h_last, cls, latent_table, s, rngs, cond_cache, context)
    x0 = model.config.sigma * randn(rngs, (B, 1, latent_table.shape[-1]), h_last.device).double()
    stopped = None
    try:
        if s.solver in FIXED_SOLVERS:
            x1 = integrate_fixed(fld, x0, s.steps, s.solver, s.grid)
        else:
            x1 = integrate_adaptive(fld, x0, s.solver, s.rtol, s.atol)
    except StopIntegration as why:
        stopped = str(why)
        if stopped == "max_nfe":
            warnings.warn(f"{s.solver}: this token's solve hit max_nfe={s.max_nfe} before t=1; it is read out "
                          "from its last evaluation.", RuntimeWarning, stacklevel=3)
    if stopped is None and (s.readout == "final" or fld.logits is None):
        fld.evaluate(1.0, x1, need_z_hat=False)
    return fld.logits, fld.nfe, fld.row_nfe


__all__ = ["generate", "L2DGenerateOutput", "EarlyStop", "SolverSettings", "ADAPTIVE_SOLVERS", "FIXED_SOLVERS", "ESTIMATES",
           "DECODING_PROTOCOLS", "decoding_protocol"]
