"""L2DModel: a frozen causal LM with a trainable diffusion path beside it.

Data flow of one forward: main path (frozen, no grad, KV cache; ``l2d/main_path.py``) -> per-layer
keys/values and the last hidden state -> diffusion path at the query positions (``l2d/path.py``) ->
merge -> frozen final norm and ``lm_head`` -> response-only cross-entropy. Also: save/load, and
``generate`` (the token loop of ``l2d/generation.py``, which drives the model through its methods).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

import l2d_kernels

from .adapter_files import check_weights_fit, read_adapter, write_adapter
from .arch import ArchAdapter
from .config import IGNORE_INDEX, L2DConfig
from .device_map import is_dispatched, place_blocks
from .latent import add_noise, sample_timesteps
from .main_path import MainPathMixin, MainPathState, positions_from_mask
from .path import DiffusionPath
from .trajectory import draw_trajectory, solver_state


@dataclass
class L2DOutput(ModelOutput):
    """loss: mean (or summed) cross-entropy over supervised tokens; logits: [B, T, V] when computed
    at every position; num_tokens: supervised tokens in the loss; t: timesteps used [B, Tq]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    t: torch.Tensor | None = None


class L2DModel(MainPathMixin, nn.Module):
    """A frozen base ``*ForCausalLM`` plus a trainable :class:`DiffusionPath`.

    The base keeps ``requires_grad=False`` and ``eval()`` mode for good (the path reuses modules
    that hold dropout). Only ``self.path`` is trained and saved. The main pass, the adapted context
    pass and the stream's view of their keys/values are :class:`~l2d.main_path.MainPathMixin`'s.
    """

    # What transformers' Trainer reads off a model: the loss shifts labels as a causal LM's does (so
    # num_items_in_batch counts labels[:, 1:]) and forward takes that count (l2d.trainer).
    main_input_name = "input_ids"
    loss_type = "ForCausalLM"
    accepts_loss_kwargs = True
    supports_gradient_checkpointing = True

    def __init__(self, base_model: nn.Module, config: L2DConfig | None = None):
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

    @property
    def adapter_disabled(self) -> bool:
        """True inside :meth:`disable_adapter`: the model is then the base model."""
        return self._disabled

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
    def check_inputs(self, input_ids: torch.Tensor, attention_mask, labels):
        """Raise a ValueError when ids, mask or labels do not fit this model (shapes, id range, no
        supervised token)."""
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
        self.check_inputs(input_ids, attention_mask, labels)
        B, T = input_ids.shape
        cls = self._training_class_labels(class_labels, B)
        if self._disabled:
            return self._base_forward(input_ids, attention_mask, labels, position_ids, reduction)

        all_positions = labels is None or bool(output_logits)
        query_index, query_targets, rows = self._queries(input_ids, attention_mask, labels, all_positions)
        t_q = self._timesteps(t, B, T, query_index)
        x_t = self._noisy_latents(query_index, query_targets, t_q, noise)
        main, context = self._main_pass(input_ids, attention_mask, position_ids, t_q, rows)
        ctx = self.stream_context(main, query_index, context=context, rows=rows)
        at_queries = query_index.unsqueeze(-1).expand(-1, -1, main.hidden.shape[-1])
        h_main = ctx.select_rows(main.hidden.gather(1, at_queries))
        h_start = None if main.stream_input is None else ctx.select_rows(main.stream_input.gather(1, at_queries))
        x_t, t_rows, query_targets = ctx.select_rows(x_t), ctx.select_rows(t_q), ctx.select_rows(query_targets)
        if rows is not None:
            cls = ctx.select_rows(cls.unsqueeze(1).expand_as(query_index))
        h = self._run_path(ctx, h_main, h_start, x_t, t_rows, cls, self_conditioning, trajectory)

        loss = num_tokens = None
        if labels is not None:
            sup = query_targets != IGNORE_INDEX
            num_tokens = sup.sum()
            loss = self.head_loss(h[sup], query_targets[sup], reduction=reduction)
            if not bool(torch.isfinite(loss).all()):
                raise FloatingPointError(f"non-finite L2D loss ({loss.sum().item()}); check the learning rate "
                                         "and the inputs (fp16 overflow?).")
        logits = self.head_logits(h) if all_positions and (labels is None or output_logits) else None
        return L2DOutput(loss=loss, logits=logits, num_tokens=num_tokens, t=t_q)

    def _training_class_labels(self, class_labels, batch: int) -> torch.Tensor:
        """:meth:`class_tensor`, each row's label replaced by the null class with probability
        ``config.class_dropout`` in training (so that classifier-free guidance works)."""
        cls = self.class_tensor(class_labels, batch)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(batch, device=cls.device) < self.config.class_dropout
            cls = torch.where(drop, torch.full_like(cls, self.config.num_classes), cls)
        return cls

    def _base_forward(self, input_ids, attention_mask, labels, position_ids, reduction: str) -> L2DOutput:
        """Inside :meth:`disable_adapter`: the base model's logits and causal-LM loss."""
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

    def _queries(self, input_ids, attention_mask, labels, all_positions: bool):
        """``(query_index [B, Tq], query_targets [B, Tq], rows)``: every position, or (with labels) the
        supervised ones packed to the left; ``rows`` [N] are then the slots that hold one.

        Packed supervised queries: the stream runs on the N supervised rows alone, not on the
        [B, Tq] slots padded to the longest response (identical results, less work)."""
        next_tokens = labels if labels is not None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        targets = F.pad(next_tokens[:, 1:], (0, 1), value=IGNORE_INDEX)  # position i predicts token i+1
        if all_positions:
            B, T = input_ids.shape
            return torch.arange(T, device=input_ids.device).expand(B, T), targets, None
        query_index, query_targets = _pack_supervised(targets)
        return query_index, query_targets, (query_targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)

    def _noisy_latents(self, query_index, query_targets, t_q, noise) -> torch.Tensor:
        """``x_t`` [B, Tq, d] of each query's target token (pure noise where it has none)."""
        z = self.path.latent.lookup(self.base_model.get_input_embeddings().weight, query_targets.clamp(min=0))
        z = z * (query_targets != IGNORE_INDEX).unsqueeze(-1)  # no target: the input is pure noise
        if noise is not None:
            noise = noise.to(z.device, z.dtype).gather(1, query_index.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
        return add_noise(z, t_q, self.config.sigma, noise)

    def _main_pass(self, input_ids, attention_mask, position_ids, t_q, rows):
        """``(MainPathState, context cache or None)``: the main pass, and the adapted context pass.

        With packed queries whose merge passes ``h_f`` through as it is (:meth:`merge_passes_stream`)
        the frozen main pass (a third of an adapted step) is skipped; its hidden states stand in as
        zeros: 0 + 1 * (h_f - 0) = h_f exactly."""
        adapted = self.config.context == "adapted"
        if adapted and rows is not None and self.merge_passes_stream(t_q.flatten()[rows]):
            position_ids = positions_from_mask(attention_mask) if position_ids is None else position_ids
            context, start = self.context_pass(input_ids, attention_mask, position_ids)
            hidden = torch.zeros(*input_ids.shape, self.arch.hidden_size, device=input_ids.device, dtype=self.dtype)
            return MainPathState(context, hidden, position_ids, attention_mask, start), context
        main = self.run_main_path(input_ids, attention_mask, position_ids)
        context = None
        if adapted:
            context, main.stream_input = self.context_pass(input_ids, attention_mask, main.position_ids)
        return main, context

    def _run_path(self, ctx, h_main, h_start, x_t, t_rows, cls, self_conditioning, trajectory) -> torch.Tensor:
        """The path's merged hidden state at the queries, with self-conditioning's first no-grad pass
        or trajectory training's solver state drawn as the config (or the arguments) say."""
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
        return self.path(self.arch, ctx, h_main, x_t, t_rows, z_hat, cls, checkpoint=self.gradient_checkpointing,
                         h_start=h_start)

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
        if is_main_process:
            write_adapter(self, save_directory, state_dict)

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
        config, state, weights = read_adapter(base_model, adapter, revision, **hub_kwargs)
        model = cls(base_model, config)
        check_weights_fit(state, model.path.state_dict(), weights)
        model.path.load_state_dict(state)
        model.path.requires_grad_(is_trainable)
        if not is_trainable:
            model.eval()
        return model


def get_l2d_model(base_model: nn.Module, config: L2DConfig | None = None) -> L2DModel:
    """Freeze ``base_model`` and attach a fresh diffusion path (the peft ``get_peft_model`` analogue)."""
    return L2DModel(base_model, config or L2DConfig())


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
