"""lm-evaluation-harness model ``l2d``: run the harness's tasks on an L2D adapter.

    python -m l2d.eval.lm_eval_harness run --model l2d \\
        --model_args adapter=runs/adapter,steps=8,solver=euler --tasks gsm8k --batch_size 16

(`python -m l2d.eval.lm_eval_harness` is lm-eval's own command line with this model registered;
in Python, ``import l2d.eval.lm_eval_harness`` then ``lm_eval.simple_evaluate(model="l2d", ...)``.)

Model arguments: ``adapter`` (an L2D adapter folder; omitted: the base alone), ``base`` (default:
the adapter's recipe or config), ``steps`` (default 0), ``solver``, ``grid``, ``readout``,
``dtype``, ``seed``, ``batch_size``, ``max_gen_toks``, ``max_length``.

What ``steps`` changes, and why: ``generate_until`` tasks (gsm8k, humaneval, ...) generate with
the diffusion path at ``steps``. ``loglikelihood`` and ``loglikelihood_rolling`` (multiple-choice
and perplexity tasks) are scored teacher-forced by the frozen base, i.e. at ``steps=0``: the
path's logits for a token are defined only given a noisy latent of that very token, so a
teacher-forced likelihood would have to choose a time and a noise draw (at ``t = 1`` the clean
latent gives the answer away), and the ODE that generation integrates has no teacher-forced
counterpart. Those tasks therefore measure the base model whatever ``steps`` is.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .runner import generate_completions

logger = logging.getLogger(__name__)

__all__ = ["L2DLM"]


def _as_bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")


@register_model("l2d")
class L2DLM(LM):
    """The harness's view of an L2D model (or of a plain causal LM, for a same-harness baseline)."""

    def __init__(self, adapter: str | None = None, base: str | None = None, steps: int = 0, solver: str = "euler",
                 grid: str = "uniform", readout: str = "final", dtype: str = "float32", seed: int = 0,
                 batch_size: int | str = 8, max_gen_toks: int = 256, max_length: int | None = None,
                 model=None, tokenizer=None, progress: bool | str = True, **_ignored):
        super().__init__()
        if model is None:
            from .command import load_for_eval

            model, tokenizer, _ = load_for_eval(adapter or "base", base, dtype)
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with model=")
        from ..model import L2DModel

        self.model, self.tokenizer = model, tokenizer
        self.is_l2d = isinstance(model, L2DModel)
        self.steps = int(steps)
        if self.steps and not self.is_l2d:
            raise ValueError("steps > 0 needs an L2D adapter (adapter=PATH)")
        self.solver, self.grid, self.readout = solver, grid, readout
        self.seed = int(seed)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = _as_bool(progress)
        self.name = adapter or base or getattr(self.base.config, "_name_or_path", "model")
        cfg = self.base.config
        self._max_length = int(max_length or getattr(cfg, "max_position_embeddings", None)
                               or getattr(cfg, "n_positions", None) or 2048)
        self._warned = False

    # --- what the harness reads ---------------------------------------------------------------
    @property
    def base(self):
        return self.model.base_model if self.is_l2d else self.model

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    @property
    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
            if t is not None:
                return int(t)
        return 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- likelihoods: the frozen base, teacher-forced ------------------------------------------
    def _warn_steps(self) -> None:
        if self.steps and not self._warned:
            logger.warning("loglikelihood requests are scored by the frozen base (steps=0); steps=%d applies to "
                           "generate_until only (see l2d.eval.lm_eval_harness)", self.steps)
            self._warned = True

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields it) per pair."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        device = self.base.get_input_embeddings().weight.device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs = []
            for i in idx:
                ctx, cont = pairs[i]
                whole = (ctx + cont)[-(self.max_length + 1):]
                seqs.append(whole[:-1])  # the last token is predicted, never an input
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, s in enumerate(seqs):  # right padding: positions start at 0 in every row
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            logits = self.base(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = F.log_softmax(logits, -1)
            for r, i in enumerate(idx):
                cont = pairs[i][1]
                n = len(seqs[r])
                rows = logp[r, n - len(cont):n]
                target = torch.tensor(cont, device=rows.device)
                total = float(rows.gather(1, target[:, None]).sum())
                greedy = bool((rows.argmax(-1) == target).all())
                out[i] = (total, greedy)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._warn_steps()
        pairs = []
        for req in requests:
            context, continuation = req.args
            # Word-boundary spaces belong to the continuation; tokenize the whole and split it
            # where the context's own tokens end, as tokenizers merge across the boundary.
            n_space = len(context) - len(context.rstrip())
            if n_space:
                context, continuation = context[:-n_space], context[-n_space:] + continuation
            whole = self._encode(context + continuation)
            ctx = self._encode(context) if context else []
            ctx = ctx[:len(whole) - 1] if len(ctx) >= len(whole) else ctx
            if not ctx:
                ctx, cont = [self._prefix_token()], whole
            else:
                cont = whole[len(ctx):]
            pairs.append((ctx, cont))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._warn_steps()
        results = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self._encode(text), self._prefix_token(), self.max_length, context_len=1)]
            results.append(sum(lp for lp, _ in self._score(windows)))
        return results

    # --- generation: the diffusion path at `steps` ---------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for ids in groups.values():
            kwargs = dict(requests[ids[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0) or 0.0)
            if temperature == 0.0:
                do_sample, temperature = False, 1.0
            prompts = [requests[i].args[0] for i in ids]
            prompt_lens = [len(self._encode(p)) for p in prompts]
            room = self.max_length - max(prompt_lens)
            if room < 1:
                raise ValueError(f"a prompt of {max(prompt_lens)} tokens leaves no room to generate within "
                                 f"max_length={self.max_length}")
            gen_kw = {"grid": self.grid, "readout": self.readout} if self.is_l2d else {}
            res = generate_completions(
                self.model, self.tokenizer, prompts, steps=self.steps if self.is_l2d else 0,
                batch_size=self.batch_size, max_new_tokens=min(max_new, room), solver=self.solver,
                do_sample=do_sample, temperature=temperature, seeds=[self.seed + i for i in ids],
                stop_strings=until or None, progress=self.progress and not disable_tqdm,
                desc=f"l2d steps={self.steps}", **gen_kw)
            for i, text in zip(ids, res["completions"]):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's command line, with the ``l2d`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
