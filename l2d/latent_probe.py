"""A fast check that a configuration's diffusion path learns to read its noisy latent.

Random-token sequences through a tiny random Llama: the context carries no information about the
next token, so the only way below the uniform loss ``ln V`` is the latent ``x_t`` of that token.
After training, the loss at ``t`` near 1 (latent nearly clean) must fall far below ``ln V``; at
``t = 0.5`` (at sigma 64, ``x_t`` is almost all noise) it stays near ``ln V``. Used by
``tests/test_latent_reading.py`` and ``benchmarks/latent_reading.py``.
"""
from __future__ import annotations

import torch

from .config import L2DConfig

PROBE_VOCAB = 96


def tiny_probe_base(seed: int = 0):
    """The probe's base: Llama, 2 layers, hidden 64, vocabulary 96, ``initializer_range=0.1`` (so
    that the frozen head can express a confident answer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=PROBE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _random_batch(generator, batch: int, length: int):
    ids = torch.randint(3, PROBE_VOCAB, (batch, length), generator=generator)
    return ids, ids.clone()


def probe_latent_reading(config: L2DConfig, steps: int = 300, seed: int = 0, lr: float = 2e-3,
                         batch: int = 8, length: int = 16, probe_t=(0.99, 0.9, 0.5),
                         probe_batches: int = 4, train_t: float | None = None) -> dict:
    """Train the path of ``config`` on random tokens (AdamW, ``lr``, ``steps`` of ``batch x length``)
    and return ``{t: mean cross-entropy}`` at each probe time, on fresh sequences. ``train_t``
    trains at that one time instead of the config's schedule (a diagnostic)."""
    from .model import get_l2d_model

    base = tiny_probe_base(seed)
    model = get_l2d_model(base, config)
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(10_000 + seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    for _ in range(steps):
        ids, labels = _random_batch(data, batch, length)
        loss = model(input_ids=ids, labels=labels, t=train_t).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()
    held_out = torch.Generator().manual_seed(20_000 + seed)
    batches = [_random_batch(held_out, batch, length) for _ in range(probe_batches)]
    out = {}
    with torch.no_grad():
        for t in probe_t:
            losses = [model(input_ids=ids, labels=labels, t=t, self_conditioning=False).loss
                      for ids, labels in batches]
            out[t] = float(torch.stack(losses).mean())
    return out
