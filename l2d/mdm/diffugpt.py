"""Loading the published DiffuGPT / DiffuLLaMA checkpoints (hub ``diffusionfamily/*``) as a MaskedDiffusionModel.

The authors save their ``DiscreteDiffusionModel`` wrapper (HKUNLP/DiffuLLaMA, ``model.py``) through
``PyTorchModelHubMixin``: a transformers ``config.json`` (GPT-2 or LLaMA) and ``model.safetensors``
whose keys are the wrapper's, not the causal LM's:

    embed_tokens.weight          -> transformer.wte.weight (gpt2) | model.embed_tokens.weight (llama)
    denoise_model.<rest>         -> transformer.<rest>     (gpt2) | model.<rest>              (llama)
    lm_head.weight               -> lm_head.weight (absent when tied to the embeddings)

Their [MASK] ids, from their loader (LLaMA-Factory ``model/loader.py``): DiffuGPT-small reuses token
10541 of GPT-2's vocabulary; DiffuGPT-medium adds ``[¨M¨]`` at id 50257 (vocabulary grown to 50258);
DiffuLLaMA reuses 811 (its checkpoint is an ordinary ``LlamaForCausalLM`` folder, which loads here
too). All are trained bidirectional with the AR shift, as this package does. Safetensors only:
pickled ``pytorch_model.bin`` files are not opened.
"""
from __future__ import annotations

import json
import os

import torch

from .config import MaskedDiffusionConfig
from .model import MaskedDiffusionModel

WEIGHTS = "model.safetensors"
GPT2_VOCAB = 50257
DIFFUGPT_SMALL_MASK_ID = 10541
DIFFUGPT_MEDIUM_MASK_ID = 50257
DIFFULLAMA_MASK_ID = 811
BACKBONE = {"gpt2": ("transformer.wte.", "transformer."), "llama": ("model.embed_tokens.", "model.")}
# buffers older transformers versions stored with GPT-2's attention (causal tables), not weights
_STALE = (".attn.bias", ".attn.masked_bias")


def remap_keys(state: dict, model_type: str) -> dict:
    """The wrapper's keys -> the causal LM's (see the module doc); standard keys pass unchanged."""
    if model_type not in BACKBONE:
        raise ValueError(f"DiffuGPT-layout checkpoints exist for {sorted(BACKBONE)}, not {model_type!r}")
    embed, backbone = BACKBONE[model_type]
    out = {}
    for key, value in state.items():
        if key.endswith(_STALE):
            continue
        if key.startswith("embed_tokens."):
            key = embed + key[len("embed_tokens."):]
        elif key.startswith("denoise_model."):
            key = backbone + key[len("denoise_model."):]
        out[key] = value
    return out


def default_mask_token_id(model_type: str, vocab_rows: int, directory: str) -> int:
    """The [MASK] id the authors used for this checkpoint (a tokenizer's own mask token wins)."""
    tok_cfg = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
        if tok.mask_token_id is not None and tok.mask_token_id < vocab_rows:
            return int(tok.mask_token_id)
    if model_type == "gpt2":
        return DIFFUGPT_SMALL_MASK_ID if vocab_rows == GPT2_VOCAB else DIFFUGPT_MEDIUM_MASK_ID
    if model_type == "llama":
        return DIFFULLAMA_MASK_ID
    raise ValueError(f"no known [MASK] id for a {model_type} checkpoint: pass mask_token_id")


def _resolve(path: str, revision: str | None) -> str:
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision,
                                 allow_patterns=["*.json", WEIGHTS, "*.txt", "*.model"])
    except Exception as e:
        raise FileNotFoundError(f"no local folder {path!r} and it could not be fetched from the hub ({e})") from e


def load_diffugpt(path: str, mask_token_id: int | None = None, dtype: torch.dtype = torch.float32,
                  revision: str | None = None, attn_implementation: str | None = None) -> MaskedDiffusionModel:
    """A DiffuGPT / DiffuLLaMA checkpoint (local folder or hub id) as a :class:`MaskedDiffusionModel`
    in eval mode, ready for ``generate(steps=...)``, ``infill`` or further ``l2d`` training. The
    tokenizer loads as usual (``AutoTokenizer.from_pretrained(path)``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = _resolve(path, revision)
    weights = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(weights):
        pickled = os.path.isfile(os.path.join(directory, "pytorch_model.bin"))
        raise FileNotFoundError(f"no {WEIGHTS} in {directory!r}" + (
            " (only a pickled pytorch_model.bin, which l2d does not unpickle: convert it to safetensors "
            "where you trust it)" if pickled else ""))
    with open(os.path.join(directory, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    state = remap_keys(load_file(weights), model_type)
    config = AutoConfig.from_pretrained(directory)
    embed_key = BACKBONE[model_type][0] + "weight"
    if embed_key not in state:
        raise ValueError(f"{weights} has no input embeddings ({embed_key} or embed_tokens.weight): "
                         "not a DiffuGPT / DiffuLLaMA checkpoint")
    config.vocab_size = int(state[embed_key].shape[0])
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", True)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit a {model_type} model of its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    mask_id = mask_token_id if mask_token_id is not None else default_mask_token_id(
        model_type, config.vocab_size, directory)
    mdm = MaskedDiffusionModel(model, MaskedDiffusionConfig(mask_token_id=mask_id, anneal_steps=0,
                                                            base_model_name_or_path=path))
    return mdm.eval()
