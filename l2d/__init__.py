"""l2d: LM-to-diffusion. A trainable diffusion path beside any frozen Hugging Face causal LM."""
__version__ = "0.1.0"

from .config import L2DConfig  # noqa: E402
from .model import L2DModel, L2DOutput, get_l2d_model  # noqa: E402
from .mdm import MaskedDiffusionConfig, MaskedDiffusionModel, get_mdm_model  # noqa: E402

__all__ = ["L2DConfig", "L2DModel", "L2DOutput", "get_l2d_model", "MaskedDiffusionConfig",
           "MaskedDiffusionModel", "get_mdm_model", "__version__"]
