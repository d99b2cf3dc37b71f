"""Morphology measurements of galaxy images."""

from __future__ import annotations

import numpy as np

__all__ = ["hsm_moments", "observed_statistics", "OBSERVED_STATISTICS"]

#: What :func:`observed_statistics` measures (and GAN validations compare by KS).
OBSERVED_STATISTICS = ("flux", "sigma", "e")


def hsm_moments(images, pixel_scale: float, weight=None):
    """Adaptive moments (GalSim HSM ``FindAdaptiveMom``) of a stack of images.

    Parameters
    ----------
    images : array_like
        ``(N, H, W)`` or ``(H, W)`` images.
    pixel_scale : float
        Pixel scale in arcsec/pixel (sizes are returned in arcsec).
    weight : array_like, optional
        Per-pixel weights of the same shape (0 excludes a pixel), e.g. ``mask == 0``.

    Returns
    -------
    dict of numpy.ndarray
        ``sigma`` (arcsec; ``det(M)**(1/4)`` of the adaptive second moments), ``e1``,
        ``e2`` (distortion ``(a^2-b^2)/(a^2+b^2)`` components), ``flux`` (adaptive
        flux, image units), ``ok`` (bool: the moments converged). Failed entries are NaN.

    Examples
    --------
    >>> import galsim
    >>> im = galsim.Gaussian(sigma=1.0).drawImage(nx=48, ny=48, scale=0.2).array
    >>> round(float(hsm_moments(im, 0.2)["sigma"][0]), 2)
    1.0
    """
    import galsim

    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    if weight is not None:
        weight = np.broadcast_to(np.asarray(weight, dtype=np.int32), images.shape)
    n = len(images)
    out = {k: np.full(n, np.nan) for k in ("sigma", "e1", "e2", "flux")}
    out["ok"] = np.zeros(n, bool)
    for i, img in enumerate(images):
        gimg = galsim.Image(img, scale=pixel_scale)
        wimg = None if weight is None else galsim.Image(weight[i])
        res = galsim.hsm.FindAdaptiveMom(gimg, weight=wimg, strict=False)
        if res.error_message == "" and res.moments_status == 0:
            out["sigma"][i] = res.moments_sigma * pixel_scale
            out["e1"][i] = res.observed_shape.e1
            out["e2"][i] = res.observed_shape.e2
            out["flux"][i] = res.moments_amp
            out["ok"][i] = True
    return out


def observed_statistics(images, mask=None) -> dict:
    """Total flux, HSM size and ``|e|`` of detector stamps as observed (noise included).

    What every GAN validation compares between held-out and generated galaxies (the
    trainer logs their KS distances as ``ks_flux``, ``ks_sigma``, ``ks_e``): cheap
    enough for a thousand stamps per validation, and measured the same way on both.

    Parameters
    ----------
    images : array_like or torch.Tensor
        ``(N, H, W)`` stamps (image units).
    mask : array_like or torch.Tensor, optional
        ``(N, H, W)`` or ``(H, W)``, True = pixel excluded (set to 0 and given no weight).

    Returns
    -------
    dict of numpy.ndarray
        ``flux`` (sum over unmasked pixels), ``sigma`` (HSM ``det(M)**(1/4)``, pixels)
        and ``e`` (``|e|`` of the HSM distortion), each ``(N,)``; NaN where the moments
        fail.

    Examples
    --------
    >>> import galsim
    >>> im = galsim.Gaussian(sigma=2.0).shear(e1=0.3).drawImage(nx=48, ny=48, scale=1.0).array
    >>> st = observed_statistics(im[None])
    >>> round(float(st["e"][0]), 1), round(float(st["flux"][0]), 2)
    (0.3, 1.0)
    """
    import torch

    x = np.array(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    weight = None
    if mask is not None:
        m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
        m = np.broadcast_to(m, x.shape)
        x = np.where(m, 0.0, x)
        weight = ~m
    mom = hsm_moments(x, 1.0, weight=weight)
    return {"flux": x.sum(axis=(1, 2)), "sigma": mom["sigma"], "e": np.hypot(mom["e1"], mom["e2"])}
