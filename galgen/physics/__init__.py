"""Differentiable physics layer: PSF convolution and pixel integration in PyTorch."""

from .convolve import convolve, pixelate, psf_transfer
from .fft import good_fft_size

__all__ = ["convolve", "pixelate", "psf_transfer", "good_fft_size"]
