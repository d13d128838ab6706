"""L2DModel: a frozen causal LM with a trainable diffusion path beside it.

Data flow of one forward: main path (frozen, no grad, KV cache) -> per-layer keys/values and the
last hidden state -> diffusion path at the query positions -> merge -> frozen final norm and
``lm_head`` -> response-only cross-entropy.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

import l2d_kernels

from . import __version__
from .arch import ArchAdapter
from .config import CONFIG_NAME, WEIGHTS_NAME, L2DConfig
from .device_map import is_dispatched, place_blocks
from .latent import add_noise, loss_weights, sample_timesteps
from .path import DiffusionPath, StreamContext
from .trajectory import draw_trajectory, solver_state

IGNORE_INDEX = -100


@dataclass
class L2DOutput(ModelOutput):
    """loss: mean (or summed) cross-entropy over supervised tokens; logits: [B, T, V] when computed
    at every position; num_tokens: supervised tokens in the loss; t: timesteps used [B, Tq]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    t: torch.Tensor | None = None


@dataclass
class MainPathState:
    """What the frozen main path leaves for the diffusion path."""

    cache: DynamicCache          # per layer keys/values [B, kv_heads, T, head_dim], post-rotary
    hidden: torch.Tensor         # [B, T, H] last decoder layer output, before the final norm
    position_ids: torch.Tensor   # [B, T] rotary positions (cumsum of the mask, as generate does)
    attention_mask: torch.Tensor  # [B, T]
    # [B, T, H] what the stream's first layer (path.stream_start; 0 by default, where it is the token
    # embeddings as the layers see them) receives: from the main path, or from the adapted context pass
    stream_input: torch.Tensor | None = None
    attn_inputs: list | None = None     # per layer [B, T, H]: what its attention module received (kv_rank > 0)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that ignore left padding, the same rule transformers' ``generate`` uses."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


class L2DModel(nn.Module):
    """A frozen base ``*ForCausalLM`` plus a trainable :class:`DiffusionPath`.

    The base keeps ``requires_grad=False`` and ``eval()`` mode for good (the path reuses modules
    that hold dropout). Only ``self.path`` is trained and saved. ``init_weights=False`` skips the
    data-dependent init (``config.latent_init``) for a path whose weights are loaded next.
    """

    # What transformers' Trainer reads off a model: the loss shifts labels as a causal LM's does (so
    # num_items_in_batch counts labels[:, 1:]) and forward takes that count (l2d.trainer).
    main_input_name = "input_ids"
    loss_type = "ForCausalLM"
    accepts_loss_kwargs = True
    supports_gradient_checkpointing = True

    def __init__(self, base_model: nn.Module, config: L2DConfig | None = None, init_weights: bool = True):
        super().__init__()
        config = config or L2DConfig()
        self.arch = ArchAdapter(base_model)   # raises for unsupported families, before any work
        self.base_model = base_model
        self.config = config
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model.config, "_name_or_path", None) or None
        base_model.requires_grad_(False)
        base_model.eval()
        device = base_model.get_input_embeddings().weight.device
        self.path = DiffusionPath(self.arch, config).to(device)
        if is_dispatched(base_model):  # device_map / offload: each block on its layer's device
            self._device_hooks = place_blocks(self)
        if init_weights and config.latent_init != "random":  # (from_pretrained loads the weights instead)
            self.path.latent.init_from_embeddings(base_model.get_input_embeddings().weight, config.latent_init)
        self._disabled = False
        self.gradient_checkpointing = False

    # --- peft-like conveniences ------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.base_model.eval()
        return self

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside this context the model is exactly the base model (the path is skipped)."""
        prev, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = prev

    def gradient_checkpointing_enable(self, **_):
        """Recompute each diffusion block in backward instead of storing its activations."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    # transformers 5 names (the gradient_* ones go in v6)
    activation_checkpointing_enable = gradient_checkpointing_enable
    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.get_input_embeddings().weight.dtype

    def add_model_tags(self, tags) -> None:
        """Tags a trainer adds (TRL's "trl", "sft"); push_to_hub puts them on the model card."""
        tags = [tags] if isinstance(tags, str) else list(tags)
        self.model_tags = list(dict.fromkeys(getattr(self, "model_tags", []) + tags))

    @property
    def generation_config(self):
        """The base's generation config (``steps=0`` is the base; trainers mirror token ids onto it)."""
        return self.base_model.generation_config

    @property
    def vocab_size(self) -> int:
        return self.base_model.get_input_embeddings().weight.shape[0]

    def unload(self) -> nn.Module:
        """Detach the path (its hooks) and return the untouched base model."""
        self.path.remove_hooks()
        return self.base_model

    # --- validation ----------------------------------------------------------------------------
    def _check_ids(self, input_ids: torch.Tensor, attention_mask, labels):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty.")
        V = self.vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids contain token ids outside [0, {V}) (min {lo}, max {hi}): "
                             "was this tokenized with the base model's tokenizer?")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}.")
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}; "
                                 "labels follow the transformers convention (same shape, -100 to ignore).")
            real = labels[labels != IGNORE_INDEX]
            if real.numel() and (int(real.min()) < 0 or int(real.max()) >= V):
                raise ValueError(f"labels contain ids outside [0, {V}) other than {IGNORE_INDEX}.")
            if not (labels[:, 1:] != IGNORE_INDEX).any():
                raise ValueError("labels supervise no token: every label after the first position is -100 "
                                 "(labels are shifted inside the model; mask only the prompt and padding).")

    def class_tensor(self, class_labels, batch: int) -> torch.Tensor:
        """Class labels as a [B] tensor; ``None``/-1/unknown-free names map to the null class."""
        null = self.config.num_classes
        if class_labels is None:
            return torch.full((batch,), null, dtype=torch.long, device=self.device)
        if isinstance(class_labels, (str, int)):
            class_labels = [class_labels] * batch
        if isinstance(class_labels, (list, tuple)):
            ids = []
            for c in class_labels:
                if isinstance(c, str):
                    if c not in self.config.class_names:
                        raise ValueError(f"class label {c!r} is not one this adapter knows: "
                                         f"{list(self.config.class_names)}.")
                    c = self.config.class_names.index(c)
                ids.append(null if c is None or c < 0 else int(c))
            class_labels = torch.tensor(ids, dtype=torch.long)
        labels = class_labels.to(self.device, torch.long).view(-1)
        if labels.numel() != batch:
            raise ValueError(f"class_labels has {labels.numel()} entries for a batch of {batch}.")
        labels = torch.where(labels < 0, torch.full_like(labels, null), labels)
        if int(labels.max()) > null:
            raise ValueError(f"class label id {int(labels.max())} out of range: this adapter has "
                             f"{self.config.num_classes} classes {list(self.config.class_names)} (+ null).")
        return labels

    # --- the main path ---------------------------------------------------------------------------
    @torch.no_grad()
    def run_main_path(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> MainPathState:
        """Run the frozen base once (no grad) and keep its cache and pre-norm last hidden state.

        The cache is a fresh ``DynamicCache()`` without a config: one built from the config drops
        old keys in sliding-window layers, which the diffusion stream masks itself.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        captured = {}
        hooks = [self.arch.final_norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))]
        if self.config.stream_init == "main" and self.config.context == "frozen":  # (adapted: the context pass's)
            hooks.append(_keep_input(self.arch.layers[self.path.stream_start], captured, "e"))
        if self.config.kv_rank:
            inputs = [None] * self.arch.num_layers
            hooks += [_keep_input(self.arch.attn(i), inputs, i) for i in range(self.arch.num_layers)]
            captured["a"] = inputs
        try:
            cache = self.arch.run_backbone(input_ids, attention_mask, position_ids, cache)
        finally:
            for hook in hooks:
                hook.remove()
        start = captured.get("e")  # (moved home: with a device map the layers may sit elsewhere)
        return MainPathState(cache, captured["h"].to(self.device), position_ids, attention_mask,
                             None if start is None else start.to(self.device), captured.get("a"))

    def run_context_pass(self, input_ids, attention_mask, position_ids, cache=None) -> DynamicCache:
        """``context="adapted"``: the frozen layers with the path's q/o/MLP deltas on, over every
        position of ``input_ids`` (appended to ``cache`` when decoding); returns the cache whose
        keys/values the queries read. Runs under the caller's grad mode: in training the deltas
        get gradients through these keys/values."""
        return self._context_pass(input_ids, attention_mask, position_ids, cache)[0]

    def _context_pass(self, input_ids, attention_mask, position_ids, cache=None):
        """:meth:`run_context_pass`, plus what the stream's first layer receives in it [B, T, H]
        (``stream_init="main"``; else None): the stream then takes up the context pass there."""
        captured = {}
        keep = self.config.stream_init == "main"
        hook = _keep_input(self.arch.layers[self.path.stream_start], captured, "e") if keep else None
        try:
            with self.path.switch.context_pass():
                # only its keys/values are read: the forward ends once the last layer has cached them
                cache = self.arch.run_backbone(input_ids, attention_mask, position_ids, cache, kv_only=True)
        finally:
            if hook is not None:
                hook.remove()
        return cache, captured.get("e")

    def _merge_passes_stream(self, t_q: torch.Tensor) -> bool:
        """True when the merge returns the stream itself at every query: ``stream_init="main"``
        (``h = h_main + g (h_f - h_main)``), ``merge_init="open"`` with a frozen all-zero merge head
        (as when the conditioning heads are frozen) and ``t > 0``, so that ``g = 1`` exactly and
        ``h = h_f``: the main path's hidden states are then not needed."""
        merge = self.path.merge[-1]
        return (self.config.stream_init == "main" and self.config.merge_init == "open"
                and not merge.weight.requires_grad and not bool(merge.weight.any()) and bool((t_q > 0).all()))

    def kv_deltas(self, main: MainPathState, previous: list | None = None) -> list | None:
        """The path's key/value deltas at the positions ``main`` just ran (``kv_rank > 0``), appended
        to ``previous`` (the earlier positions', when decoding token by token)."""
        new = self.path.kv_deltas(self.arch, main.attn_inputs, main.position_ids) if main.attn_inputs else None
        if new is None or previous is None:
            return new
        return [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(previous, new)]

    def stream_context(self, main: MainPathState, query_index: torch.Tensor, kv_deltas=None,
                       context: DynamicCache | None = None, rows: torch.Tensor | None = None) -> StreamContext:
        """What the blocks read for ``query_index``; ``kv_deltas`` default to those of ``main``'s
        own positions (the whole sequence in a teacher-forced forward). ``context``: the cache of
        :meth:`run_context_pass` (``context="adapted"``), read instead of the main path's.
        ``rows``: run the stream on these flat query slots only (see :class:`StreamContext`)."""
        if self.config.context == "adapted" and context is None:
            raise ValueError("context='adapted' reads the keys/values of run_context_pass; pass its cache as context=.")
        cache = main.cache if context is None else context
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        pos = main.position_ids
        if pos.shape[1] != main.attention_mask.shape[1]:  # incremental decoding: positions of the new tokens only
            pos = positions_from_mask(main.attention_mask)
        if kv_deltas is None:
            kv_deltas = self.kv_deltas(main)
        if kv_deltas is not None and kv_deltas[0][0].shape[2] != keys[0].shape[2]:
            raise ValueError(f"kv_deltas cover {kv_deltas[0][0].shape[2]} positions, the cache {keys[0].shape[2]}: "
                             "pass the deltas of every position (model.kv_deltas(main, previous)).")
        return StreamContext(keys, values, query_index, pos.gather(1, query_index), main.attention_mask, self.dtype,
                             kv_deltas, rows)

    # --- the head ------------------------------------------------------------------------------
    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Frozen final norm, ``lm_head`` and the family's logit transforms, in float32."""
        head = self.base_model.get_output_embeddings()
        logits = F.linear(self.arch.final_norm(h), head.weight, getattr(head, "bias", None))
        return self.arch.logits_postprocess(logits.float())

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the head over rows ``h`` [N, H] without materialising [N, V] at once."""
        head = self.base_model.get_output_embeddings()
        return l2d_kernels.linear_cross_entropy(self.arch.final_norm(h), head.weight, targets,
                                                bias=getattr(head, "bias", None), reduction=reduction,
                                                **self.arch.head_kwargs())

    @torch.no_grad()
    def expected_latent(self, h: torch.Tensor, latent_table: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """``softmax(logits) @ Z`` for rows of ``h`` [..., H], chunked over rows."""
        flat = h.reshape(-1, h.shape[-1])
        out = []
        for part in flat.split(chunk):
            logits = self.head_logits(part)  # a fresh [chunk, V] float32 tensor: softmax in place
            probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
            out.append((probs @ latent_table) / probs.sum(-1, keepdim=True))
        return torch.cat(out).view(*h.shape[:-1], -1)

    def latent_table(self) -> torch.Tensor:
        """The ``V x d`` table of all latents."""
        return self.path.latent.table(self.base_model.get_input_embeddings().weight)

    # --- training / teacher-forced forward -------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None, class_labels=None, t=None,
                noise=None, position_ids=None, output_logits: bool | None = None,
                self_conditioning: bool | None = None, reduction: str = "mean", num_items_in_batch=None,
                trajectory: bool | None = None, **_) -> L2DOutput:
        """Teacher-forced forward: position ``i`` predicts token ``i+1`` from its noisy latent.

        With ``labels`` the path runs only at supervised positions (diffusion positions never see
        each other, so the loss is the same as running everywhere), all N of the batch as one row
        list, so its cost follows N rather than batch size x longest response; ``logits`` is None
        unless ``output_logits=True``. Without labels it runs at every position, the targets being the
        next input tokens; the last position has none and sees pure noise scaled for its ``t``.

        Args:
            t: optional timesteps, a float or a tensor broadcastable to [B, T]; default drawn
                from ``config.schedule`` per position.
            noise: optional ``eps`` [B, T, d] (for reproducible tests).
            self_conditioning: force the self-conditioning pass on/off (default: with probability
                ``config.self_conditioning`` in training, off in eval).
            trajectory: force training on the solver's own trajectory on/off (default: with
                probability ``config.trajectory_training`` in training, off in eval); the loss is
                then taken where ``k`` Euler steps from noise reach (``l2d/trajectory.py``).
            reduction: ``mean`` over supervised tokens, ``sum`` (for exact gradient accumulation),
                or ``none`` (one loss per supervised token, in packed order).
            num_items_in_batch: supervised tokens of the whole accumulated batch (transformers'
                Trainer passes it): the summed loss is divided by it instead of this batch's count.
        """
        if num_items_in_batch is not None and labels is not None and reduction == "mean":
            out = self.forward(input_ids, attention_mask, labels, class_labels, t, noise, position_ids,
                               output_logits, self_conditioning, reduction="sum")
            out.loss = out.loss / num_items_in_batch
            return out
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_ids(input_ids, attention_mask, labels)
        B, T = input_ids.shape
        cls = self.class_tensor(class_labels, B)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(B, device=cls.device) < self.config.class_dropout
            cls = torch.where(drop, torch.full_like(cls, self.config.num_classes), cls)
        if self._disabled:
            main = self.run_main_path(input_ids, attention_mask, position_ids)
            logits = self.head_logits(main.hidden)
            loss = None
            if labels is not None:
                tgt = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
                loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction=reduction)
                if reduction == "none":  # supervised tokens only, as the path's branch returns them
                    loss = loss[tgt.flatten() != IGNORE_INDEX]
            return L2DOutput(loss=loss, logits=logits)

        all_positions = labels is None or bool(output_logits)
        next_tokens = labels if labels is not None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        targets = F.pad(next_tokens[:, 1:], (0, 1), value=IGNORE_INDEX)  # position i predicts token i+1
        if all_positions:
            query_index = torch.arange(T, device=input_ids.device).expand(B, T)
            query_targets = targets
        else:
            query_index, query_targets = _pack_supervised(targets)

        # Packed supervised queries: the stream runs on the N supervised rows alone, not on the
        # [B, Tq] slots padded to the longest response (identical results, less work).
        rows = None if all_positions else (query_targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        t_q = self._timesteps(t, B, T, query_index)
        z = self.path.latent.lookup(self.base_model.get_input_embeddings().weight, query_targets.clamp(min=0))
        z = z * (query_targets != IGNORE_INDEX).unsqueeze(-1)  # no target: the input is pure noise
        if noise is not None:
            noise = noise.to(z.device, z.dtype).gather(1, query_index.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
        x_t = add_noise(z, t_q, self.config.sigma, noise)

        context = None
        if self.config.context == "adapted" and not all_positions and self._merge_passes_stream(t_q.flatten()[rows]):
            # The merge passes h_f through as it is, so the frozen main pass (a third of an adapted
            # step) is skipped; its hidden states stand in as zeros: 0 + 1 * (h_f - 0) = h_f exactly.
            position_ids = positions_from_mask(attention_mask) if position_ids is None else position_ids
            context, start = self._context_pass(input_ids, attention_mask, position_ids)
            hidden = torch.zeros(B, T, self.arch.hidden_size, device=input_ids.device, dtype=self.dtype)
            main = MainPathState(context, hidden, position_ids, attention_mask, start)
        else:
            main = self.run_main_path(input_ids, attention_mask, position_ids)
            if self.config.context == "adapted":
                context, main.stream_input = self._context_pass(input_ids, attention_mask, main.position_ids)
        ctx = self.stream_context(main, query_index, context=context, rows=rows)
        at_queries = query_index.unsqueeze(-1).expand(-1, -1, main.hidden.shape[-1])
        h_main = ctx.select_rows(main.hidden.gather(1, at_queries))
        h_start = None if main.stream_input is None else ctx.select_rows(main.stream_input.gather(1, at_queries))
        x_t, t_rows, query_targets = ctx.select_rows(x_t), ctx.select_rows(t_q), ctx.select_rows(query_targets)
        if rows is not None:
            cls = ctx.select_rows(cls.unsqueeze(1).expand_as(query_index))
        z_hat = torch.zeros_like(x_t)
        use_sc = self_conditioning if self_conditioning is not None else (
            self.training and torch.rand(()) < self.config.self_conditioning)
        if trajectory if trajectory is not None else (
                self.training and torch.rand(()) < self.config.trajectory_training):
            # train where the solver's own trajectory is (l2d/trajectory.py); z_hat is its last estimate
            x_t, t_rows, z_hat = self._solver_state(ctx, h_main, h_start, cls, x_t)
            use_sc = False
        if use_sc:
            with torch.no_grad():
                h_first = self.path(self.arch, ctx, h_main, x_t, t_rows, z_hat, cls, h_start=h_start)
                z_hat = self.expected_latent(h_first, self.latent_table())
        h = self.path(self.arch, ctx, h_main, x_t, t_rows, z_hat, cls, checkpoint=self.gradient_checkpointing,
                      h_start=h_start)

        loss = num_tokens = None
        if labels is not None:
            sup = query_targets != IGNORE_INDEX
            num_tokens = sup.sum()
            if self.training and self.config.loss_weighting != "none":
                ce = self.head_loss(h[sup], query_targets[sup], reduction="none")
                loss = loss_weights(t_rows[sup], self.config.loss_weighting) * ce
                if reduction != "none":
                    loss = loss.sum() / (num_tokens.clamp(min=1) if reduction == "mean" else 1)
            else:
                loss = self.head_loss(h[sup], query_targets[sup], reduction=reduction)
            if not bool(torch.isfinite(loss).all()):
                raise FloatingPointError(f"non-finite L2D loss ({loss.sum().item()}); check the learning rate "
                                         "and the inputs (fp16 overflow?).")
        logits = self.head_logits(h) if all_positions and (labels is None or output_logits) else None
        return L2DOutput(loss=loss, logits=logits, num_tokens=num_tokens, t=t_q)

    def _solver_state(self, ctx, h_main, h_start, cls, like: torch.Tensor):
        """``(x_t, t, z_hat)`` after ``k`` of ``N`` no-grad Euler steps from noise (l2d/trajectory.py)."""
        n, k = draw_trajectory(self.config.trajectory_steps)
        with torch.no_grad():
            Z = self.latent_table().float()

        def evaluate(t, x, z_hat):
            tt = torch.full(x.shape[:-1], t, device=x.device)
            h = self.path(self.arch, ctx, h_main, x, tt, z_hat, cls, h_start=h_start)
            return self.expected_latent(h, Z)

        x0 = self.config.sigma * torch.randn(like.shape, device=like.device)
        x, t, z_hat = solver_state(evaluate, x0, n, k, self.config.merge_init == "open",
                                   self.config.self_conditioning > 0)
        return x.to(like.dtype), torch.full(like.shape[:-1], t, device=like.device), z_hat.to(like.dtype)

    def _timesteps(self, t, B: int, T: int, query_index: torch.Tensor) -> torch.Tensor:
        if t is None:
            cfg = self.config
            return sample_timesteps(query_index.shape, cfg.schedule, device=query_index.device,
                                    mean=cfg.logit_normal_mean, std=cfg.logit_normal_std)
        t = torch.as_tensor(t, dtype=torch.float32, device=query_index.device)
        if bool((t < 0).any()) or bool((t > 1).any()):
            raise ValueError("t must lie in [0, 1] (0 = pure noise, 1 = clean data).")
        return t.expand(B, T).gather(1, query_index)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Token loop with an ODE per token; ``steps=0`` is the base model. See :func:`l2d.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # --- save / load -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, state_dict: dict | None = None, is_main_process: bool = True,
                        **_) -> None:
        """Write ``l2d_config.json`` and ``l2d_model.safetensors`` (the path only), atomically.

        ``state_dict``: the weights to write instead of the live ones, as transformers and peft take
        it: a whole-model state dict (keys ``path.*``, e.g. ``accelerator.get_state_dict(model)``,
        which gathers weights that FSDP or DeepSpeed shard) or the path's own. ``is_main_process=False``
        (as transformers' Trainer passes on other ranks) writes nothing."""
        from safetensors.torch import save_file

        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        if state_dict is None:
            state_dict = self.path.state_dict()
        elif any(k.startswith("path.") for k in state_dict):
            state_dict = {k[len("path."):]: v for k, v in state_dict.items() if k.startswith("path.")}
        missing = sorted(set(self.path.state_dict()) - set(state_dict))
        if missing:
            raise ValueError(f"state_dict lacks path weights {missing[:5]}: pass the whole model's state dict "
                             "(keys 'path.*') or the path's own.")
        state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        weights = os.path.join(save_directory, WEIGHTS_NAME)
        tmp = weights + ".tmp"
        save_file(state, tmp, metadata={"format": "pt", "l2d_version": __version__})
        os.replace(tmp, weights)
        extra = {"l2d_version": __version__, "base_fingerprint": self.arch.fingerprint()}
        revision = getattr(self.base_model.config, "_commit_hash", None)
        if revision and not self.config.base_model_revision:
            self.config.base_model_revision = revision
        self.config.save(save_directory, extra)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, **kwargs):
        """Upload the adapter files and a generated model card (:mod:`l2d.hub`); ``recipe=`` and
        ``eval_results=`` add the training recipe and the evaluation table. Returns the commit info."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message, **kwargs)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter: str, revision: str | None = None,
                        is_trainable: bool = False, **hub_kwargs) -> "L2DModel":
        """Attach a saved path to ``base_model``; ``adapter`` is a local folder or a hub repo id."""
        directory = _resolve_adapter(adapter, revision, **hub_kwargs)
        config, extra = L2DConfig.load(directory)
        arch = ArchAdapter(base_model)
        _check_fingerprint(extra.get("base_fingerprint"), arch.fingerprint(), directory)
        weights = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory!r}; the adapter is incomplete.")
        from safetensors.torch import load_file

        try:
            state = load_file(weights)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{weights} could not be read as safetensors ({e}); the file is corrupt "
                             "or truncated: re-save or re-download the adapter.") from e
        model = cls(base_model, config, init_weights=False)
        expected = model.path.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"{weights} does not fit this base and config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}.")
        model.path.load_state_dict(state)
        model.path.requires_grad_(is_trainable)
        if not is_trainable:
            model.eval()
        return model


def get_l2d_model(base_model: nn.Module, config: L2DConfig | None = None) -> L2DModel:
    """Freeze ``base_model`` and attach a fresh diffusion path (the peft ``get_peft_model`` analogue)."""
    return L2DModel(base_model, config or L2DConfig())


def _keep_input(module: nn.Module, store, key):
    """A forward pre-hook that keeps what ``module`` receives (its hidden states) in ``store[key]``."""
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: store.__setitem__(key, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)


def _pack_supervised(targets: torch.Tensor):
    """Supervised positions of each row packed to the left: ([B, Tq] index, [B, Tq] targets or -100)."""
    sup = targets != IGNORE_INDEX
    counts = sup.sum(1)
    Tq = int(counts.max())
    # Stable sort puts supervised positions first, in order.
    order = torch.sort((~sup).to(torch.int8), dim=1, stable=True).indices[:, :Tq]
    valid = torch.arange(Tq, device=targets.device) < counts.unsqueeze(1)
    query_index = torch.where(valid, order, torch.zeros_like(order))
    query_targets = torch.where(valid, targets.gather(1, order), torch.full_like(order, IGNORE_INDEX))
    return query_index, query_targets


def _resolve_adapter(adapter: str, revision=None, **hub_kwargs) -> str:
    if os.path.isdir(adapter):
        return adapter
    if os.path.exists(adapter):
        raise ValueError(f"{adapter!r} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(adapter, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **hub_kwargs)
    except Exception as e:
        raise FileNotFoundError(f"No local folder {adapter!r} and it could not be fetched from the hub ({e}).") from e


def _check_fingerprint(saved: dict | None, current: dict, directory: str) -> None:
    if not saved:
        return
    diffs = [f"{k}: adapter {saved[k]!r} vs base {current.get(k)!r}" for k in saved if saved[k] != current.get(k)]
    if diffs:
        raise ValueError(f"The adapter in {directory!r} was trained for another base model ("
                         + "; ".join(diffs) + "). Load it onto the base it was trained with.")
