"""Tiny random models of each supported family, built from configs (no download)."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from l2d import L2DConfig

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              max_position_embeddings=128)

FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=4),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8, sliding_window=4, attn_implementation="eager"),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8, sliding_window=4, sliding_window_pattern=2),
    "phi3": dict(num_key_value_heads=2, partial_rotary_factor=0.5),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(partial_rotary_factor=0.5),
    "olmo2": dict(num_key_value_heads=2),
    "granite": dict(num_key_value_heads=2, attention_multiplier=0.3, residual_multiplier=0.5,
                    logits_scaling=2.0),
}


def tiny_base(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    kw = {**COMMON, **FAMILIES[family], **overrides}
    attn = kw.pop("attn_implementation", None)
    cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.eval()


def tiny_config(**kw) -> L2DConfig:
    base = dict(latent_dim=16, cond_dim=32, time_features=32, rank=4, alpha=4.0)
    return L2DConfig(**{**base, **kw})


def randomize_path(model, seed: int = 1, scale: float = 0.5):
    """Give every zero-initialised part of the path non-trivial values (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.path.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5)


def batch(seed: int = 0, B: int = 2, T: int = 12, prompt: int = 5, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels
