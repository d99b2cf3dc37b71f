"""Derived quantities of model galaxies: flux, half-light radius, ellipticity, with intervals.

Astronomers want physical numbers from a fit, not latent codes. These functions measure
them on noise-free intrinsic (PSF-free) model images, for the MAP galaxy and for every
posterior draw, so that credible intervals follow from the draws:

* ``flux``: the total light of the image (ADU);
* ``hlr``: the radius of the circle about the light-weighted centroid that holds half of
  the light (arcsec), interpolated between pixel radii;
* ``e1``, ``e2``: distortion ``(Qxx - Qyy, 2 Qxy) / (Qxx + Qyy)`` from the unweighted
  second moments ``Q`` about the centroid (the convention of GalSim's
  ``Shear.e1``/``e2`` and of HSM's ``observed_shape.e1``/``e2``).

Unweighted moments are well defined here because the images are noise-free; they weigh
the outskirts more than HSM's adaptive moments do, so compare like with like.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DERIVED_NAMES", "QUANTILES", "derived_quantities", "credible_intervals"]

#: Names of the derived quantities, in the order of :func:`derived_quantities` columns.
DERIVED_NAMES = ("flux", "hlr", "e1", "e2")
#: Quantile levels stored per quantity: 95% and 68% equal-tailed intervals and the median.
QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)


def derived_quantities(intrinsic: torch.Tensor, pixel_scale: float) -> torch.Tensor:
    """Flux, half-light radius and ellipticity of a batch of noise-free images.

    Parameters
    ----------
    intrinsic : torch.Tensor
        ``(B, N, N)`` intrinsic images (any non-negative light).
    pixel_scale : float
        Scale of the intrinsic grid in arcsec/pixel (detector scale / oversampling).

    Returns
    -------
    torch.Tensor
        ``(B, 4)`` float64 columns :data:`DERIVED_NAMES`: flux (image units), hlr
        (arcsec), e1, e2. Galaxies without positive light get NaN size and shape.

    Examples
    --------
    >>> import torch
    >>> y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    >>> img = torch.exp(-((x - 32) ** 2 / 2 / 4.0**2 + (y - 32) ** 2 / 2 / 2.0**2))[None]
    >>> q = derived_quantities(img, 1.0)
    >>> round(float(q[0, 2]), 3)  # (16 - 4) / (16 + 4)
    0.6
    """
    img = intrinsic.detach().to(torch.float64)
    B, H, W = img.shape
    y, x = torch.meshgrid(torch.arange(H, dtype=img.dtype, device=img.device),
                          torch.arange(W, dtype=img.dtype, device=img.device), indexing="ij")
    flux = img.sum((1, 2))
    f = torch.where(flux > 0, flux, torch.full_like(flux, torch.nan))[:, None, None]
    xc = (img * x).sum((1, 2), keepdim=True) / f
    yc = (img * y).sum((1, 2), keepdim=True) / f
    dx, dy = x - xc, y - yc
    qxx, qyy, qxy = ((img * dx * dx).sum((1, 2)), (img * dy * dy).sum((1, 2)), (img * dx * dy).sum((1, 2)))
    tr = qxx + qyy
    e1, e2 = (qxx - qyy) / tr, 2 * qxy / tr
    # half-light radius: cumulative light in order of distance from the centroid
    r = (dx * dx + dy * dy).sqrt().reshape(B, -1)
    order = r.argsort(1)
    r_sorted = r.gather(1, order)
    cum = img.reshape(B, -1).gather(1, order).cumsum(1)
    half = 0.5 * flux[:, None]
    j = torch.searchsorted(cum.contiguous(), half.contiguous()).clamp(1, r.shape[1] - 1)
    c0, c1 = cum.gather(1, j - 1), cum.gather(1, j)
    r0, r1 = r_sorted.gather(1, j - 1), r_sorted.gather(1, j)
    w = ((half - c0) / (c1 - c0).clamp(min=1e-300)).clamp(0, 1)
    hlr = (r0 + w * (r1 - r0))[:, 0] * pixel_scale
    hlr = torch.where(flux > 0, hlr, torch.full_like(hlr, torch.nan))
    return torch.stack([flux, hlr, e1, e2], 1)


def credible_intervals(draws, quantiles=QUANTILES) -> np.ndarray:
    """Equal-tailed quantiles of posterior draws of derived quantities.

    Parameters
    ----------
    draws : array_like
        ``(..., n_draws, p)``.
    quantiles : sequence of float, optional
        Levels in (0, 1); the default gives the median and the 68% and 95% intervals.

    Returns
    -------
    numpy.ndarray
        ``(..., p, len(quantiles))``.

    Examples
    --------
    >>> import numpy as np
    >>> d = np.random.default_rng(0).normal(size=(20000, 1))
    >>> np.round(credible_intervals(d, (0.16, 0.84)), 1)
    array([[-1.,  1.]])
    """
    q = np.nanquantile(np.asarray(draws, dtype=np.float64), quantiles, axis=-2)  # (Q, ..., p)
    return np.moveaxis(q, 0, -1)
