"""Which causal-LM families of the installed transformers l2d wraps, and why not the others.

For every ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` it builds a tiny random model
from the family's config (hidden 32, 2 layers, 4 heads; no download) and wraps it with
``ArchAdapter``: ``hand-written`` (a spec in ``l2d/arch.py``), ``derived`` (``l2d/arch_derive.py``,
accepted by the wrap-time check) or ``refused`` with the refusal's reason; ``no tiny model`` when
the family's tiny config cannot be built from these generic sizes (multimodal wrappers,
encoder-decoders, remote code).

    .venv/bin/python benchmarks/arch_survey.py [FAMILY ...]
"""
from __future__ import annotations

import re
import sys
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from l2d.arch import SPECS, ArchAdapter, ArchRefused

SIZES = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, head_dim=8, max_position_embeddings=128, n_embd=32, n_layer=2, n_head=4,
             n_positions=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             num_local_experts=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def survey(family: str) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = AutoConfig.for_model(family, **SIZES)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
    except Exception as e:  # noqa: BLE001 - a survey: record and move on
        return "no tiny model", f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    try:
        arch = ArchAdapter(model)
    except ArchRefused as e:
        reason = re.sub(r"^l2d cannot wrap model_type '[^']*': ", "", str(e)).split(". Supported families")[0]
        return "refused", reason[:110]
    except Exception as e:  # noqa: BLE001 - an error that is not a clear refusal is a bug to report
        return "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return ("hand-written" if family in SPECS else "derived"), _describe(arch.spec)


def _describe(spec) -> str:
    parts = [spec.q_layout if spec.q_layout != "separate" else "q_proj", spec.norm_kind]
    if spec.parallel:
        parts.append("parallel")
    if spec.post_attn_norm or spec.post_mlp_norm:
        parts.append("post norms")
    parts.append("rotary" if spec.rotary else "no rotary")
    if spec.nope_layers:
        parts.append(f"NoPE layers {list(spec.nope_layers)}")
    if spec.q_norm:
        parts.append(f"q norm {spec.q_norm}")
    parts.append("MLP parts" if spec.mlp_parts else "MLP as a module")
    return ", ".join(parts)


def main(families: list[str]) -> None:
    width = max(len(f) for f in families)
    print(f"{'family':<{width}}  {'status':<13}  why / what", flush=True)
    rows = []
    for family in families:
        rows.append((family, *survey(family)))
        print(f"{family:<{width}}  {rows[-1][1]:<13}  {rows[-1][2]}", flush=True)
    counts = {s: sum(1 for _, st, _ in rows if st == s) for s in sorted({st for _, st, _ in rows})}
    print("\n" + ", ".join(f"{s}: {n}" for s, n in counts.items()))


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
