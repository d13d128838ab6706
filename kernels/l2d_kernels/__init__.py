"""Fused kernels of the diffusion path (installed as ``l2d_kernels``).

One dispatch point (``dispatch.py``): Triton on CUDA tensors, a plain torch path everywhere else;
``L2D_KERNELS=auto|torch|triton`` or ``set_backend`` flips it. See ``kernels/README.md``.
"""
from .dispatch import (BACKENDS, get_backend, latent_normalize, linear_cross_entropy, modulated_norm,
                       set_backend, triton_available, use_backend, use_triton)
from .reference import NORM_KINDS

__all__ = [
    "modulated_norm", "latent_normalize", "linear_cross_entropy",
    "get_backend", "set_backend", "use_backend", "use_triton", "triton_available",
    "BACKENDS", "NORM_KINDS",
]
