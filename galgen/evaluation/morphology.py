"""Morphology measurements of galaxy images."""

from __future__ import annotations

import numpy as np

__all__ = ["hsm_moments"]


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
