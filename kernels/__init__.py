"""Fused kernels of the diffusion path (installed as ``l2d_kernels``).

One dispatch point: Triton on CUDA tensors, a plain torch reference everywhere else.
"""
from .dispatch import latent_normalize, linear_cross_entropy, modulated_norm

__all__ = ["modulated_norm", "latent_normalize", "linear_cross_entropy"]
