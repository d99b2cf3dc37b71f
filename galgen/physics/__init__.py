"""Differentiable physics layer: PSF convolution, pixel integration, noise and likelihood,
and pixel-integrated Sersic profiles.

Pure tensor functions (device and dtype follow the inputs) plus :class:`Observation`,
which bundles a PSF, the pixel scale, the oversampling and a noise model.
"""

from .convolve import convolve, pixelate, psf_transfer
from .fft import good_fft_size
from .galsim_interop import to_interpolated_image
from .noise import CCDNoise, CorrelatedGaussianNoise, GaussianNoise, source_noise, split_variance
from .observation import Batch, Observation
from .psf import check_psf, gaussian_psf, moffat_psf, psf_from_galsim
from .sersic import render_sersic, sersic_b

__all__ = [
    "convolve", "pixelate", "psf_transfer", "good_fft_size",
    "gaussian_psf", "moffat_psf", "psf_from_galsim", "check_psf",
    "GaussianNoise", "CCDNoise", "CorrelatedGaussianNoise", "split_variance", "source_noise",
    "Observation", "Batch", "to_interpolated_image", "render_sersic", "sersic_b",
]
