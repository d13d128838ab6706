"""Tiny random models of each supported family, built from configs (no download).

``FAMILIES``: the families with a hand-written spec in ``l2d/arch.py``; ``DERIVED``: families whose
spec ``l2d/arch_derive.py`` derives from the model (tests/test_arch_derive.py). ``tiny_base``
builds either."""
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

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
DERIVED = {
    "gemma": dict(num_key_value_heads=2, head_dim=8),
    "qwen2_moe": dict(num_key_value_heads=2, **MOE, shared_expert_intermediate_size=24,
                      mlp_only_layers=[1]),  # layer 0 mixture-of-experts, layer 1 dense
    "qwen3_moe": dict(num_key_value_heads=2, head_dim=8, **MOE),
    "olmo": dict(num_key_value_heads=2, clip_qkv=0.05),
    "olmoe": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, clip_qkv=0.05),
    "cohere2": dict(num_key_value_heads=2, head_dim=8, sliding_window=4, logit_scale=0.5,
                    layer_types=["sliding_attention", "full_attention"]),  # the full layer has no rotary
    "glm": dict(num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.5),
    "helium": dict(num_key_value_heads=2, head_dim=8),
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),  # multi-query c_attn
    "falcon": dict(),  # multi-query fused query_key_value, parallel attention and MLP on one norm
    "nemotron": dict(num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.5),
    "arcee": dict(num_key_value_heads=2),
}


def tiny_base(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    kw = {**COMMON, **(FAMILIES[family] if family in FAMILIES else DERIVED[family]), **overrides}
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
    # the adaLN heads' outputs are scaled by config.adaln_scale: their weights grow by its inverse
    # in training, so the randomised path is modulated as strongly whatever the scale
    head_gain = 1.0 / getattr(model.config, "adaln_scale", 1.0)
    with torch.no_grad():
        for name, p in model.path.named_parameters():
            gain = head_gain if ".adaln." in name else 1.0
            p.add_(torch.randn(p.shape, generator=g) * gain * scale / max(1, p.shape[-1]) ** 0.5)


def batch(seed: int = 0, B: int = 2, T: int = 12, prompt: int = 5, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels
