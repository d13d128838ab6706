"""Masked-diffusion adaptation of a causal LM (DiffuGPT / DiffuLLaMA, Gong et al. ICLR 2025).

    config.py      MaskedDiffusionConfig
    mask_token.py  pick or add the [MASK] token
    attention.py   causal -> bidirectional annealed 4-D masks, positions
    loss.py        corruption t ~ U(eps, 1) and the 1/t-weighted CE at masked positions
    model.py       MaskedDiffusionModel, get_mdm_model, save/load
    generation.py  unmasking in `steps` steps: generate, infill
    diffugpt.py    loader for the published DiffuGPT / DiffuLLaMA checkpoints
"""
from .config import MaskedDiffusionConfig
from .diffugpt import load_diffugpt
from .generation import MaskedDiffusionGenerateOutput, commit_schedule
from .model import MaskedDiffusionModel, MaskedDiffusionOutput, get_mdm_model

__all__ = ["MaskedDiffusionConfig", "MaskedDiffusionModel", "MaskedDiffusionOutput", "MaskedDiffusionGenerateOutput",
           "get_mdm_model", "load_diffugpt", "commit_schedule"]
