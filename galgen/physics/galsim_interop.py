"""GalSim interoperability: galgen images as GalSim profiles, GalSim PSFs as tensors."""

from __future__ import annotations

import numpy as np

from .psf import psf_from_galsim

__all__ = ["to_interpolated_image", "psf_from_galsim"]


def to_interpolated_image(image, pixel_scale: float, *, flux: float | None = None, x_interpolant="lanczos15"):
    """A galgen intrinsic image as a ``galsim.InterpolatedImage``.

    The image is pixel-integrated at ``pixel_scale`` (the convention for intrinsic
    images), so the returned profile is the interpolated image with that pixel response
    deconvolved: ``result.drawImage(scale=pixel_scale, use_true_center=False)`` on the
    same grid gives back ``image`` (to ~1e-3 of the peak), and the profile can be
    sheared, convolved with any PSF and drawn at any scale in a GalSim simulation. The
    profile centre is placed at pixel ``(H//2, W//2)``, per the convention.

    Parameters
    ----------
    image : array_like or torch.Tensor
        ``(H, W)`` intrinsic image.
    pixel_scale : float
        Its pixel scale in arcsec.
    flux : float, optional
        Rescale to this total flux.
    x_interpolant : str, optional
        GalSim real-space interpolant.

    Returns
    -------
    galsim.GSObject
        ``Convolve(InterpolatedImage(image), Deconvolve(Pixel(pixel_scale)))``.
    """
    import galsim

    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"image: expected a 2-d image, got shape {arr.shape}")
    h, w = arr.shape
    img = galsim.Image(arr, scale=pixel_scale)
    # GalSim puts the profile centre at the image's true centre; shift to (H//2, W//2).
    offset = galsim.PositionD(w // 2 - (w - 1) / 2, h // 2 - (h - 1) / 2)
    ii = galsim.InterpolatedImage(img, x_interpolant=x_interpolant, offset=offset, flux=flux,
                                  use_true_center=True)
    return galsim.Convolve(ii, galsim.Deconvolve(galsim.Pixel(pixel_scale)))
