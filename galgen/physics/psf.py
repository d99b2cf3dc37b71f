"""PSF images in torch: analytic Gaussian and Moffat profiles, and any GalSim PSF.

Every PSF image follows the convention: drawn **without** pixel response (the profile
sampled at pixel centres, times the pixel area) at the intrinsic scale, centred at
index ``(P//2, P//2)``, normalised to unit sum over its grid. The analytic ones are
differentiable in FWHM, Moffat ``beta`` and ellipticity, and batched: each parameter
may be a scalar or a ``(B,)`` tensor.

Ellipticity is GalSim's reduced shear ``(g1, g2)``: the sheared profile is
``f(A^-1 x)`` with ``A = (1 - g^2)^(-1/2) [[1 + g1, g2], [g2, 1 - g1]]`` (area-preserving).
"""

from __future__ import annotations

import math

import torch

from ..errors import GalgenInputError

__all__ = ["gaussian_psf", "moffat_psf", "psf_from_galsim", "check_psf"]


def _as_tensor(x, dtype, device):
    return x.to(dtype=dtype, device=device) if isinstance(x, torch.Tensor) else torch.tensor(
        float(x), dtype=dtype, device=device)


def _sheared_r2(size, scale, g1, g2, dtype, device):
    """Squared radius of each pixel centre in the unsheared frame, (B?, P, P)."""
    g1 = _as_tensor(g1, dtype, device)
    g2 = _as_tensor(g2, dtype, device)
    g1, g2 = torch.broadcast_tensors(g1, g2)
    if bool(((g1**2 + g2**2) >= 1).any()):
        raise GalgenInputError("g1, g2: PSF ellipticity |g| must be < 1")
    c = torch.arange(size, dtype=dtype, device=device) - size // 2
    y, x = torch.meshgrid(c * scale, c * scale, indexing="ij")
    g1 = g1[..., None, None]
    g2 = g2[..., None, None]
    norm = 1.0 / torch.sqrt(1 - g1**2 - g2**2)
    u = norm * ((1 - g1) * x - g2 * y)   # A^-1 x
    v = norm * (-g2 * x + (1 + g1) * y)
    return u**2 + v**2


def _normalise(img):
    return img / img.sum(dim=(-2, -1), keepdim=True)


def _dtype_device(dtype, device, *params):
    for p in params:
        if isinstance(p, torch.Tensor):
            return (dtype or p.dtype), (device or p.device)
    return (dtype or torch.float32), (device or "cpu")


def gaussian_psf(fwhm, size: int, scale: float, g1=0.0, g2=0.0, *, dtype=None, device=None) -> torch.Tensor:
    """Gaussian PSF image(s), unit sum, centre at ``(size//2, size//2)``.

    Parameters
    ----------
    fwhm : float or torch.Tensor
        FWHM in arcsec, scalar or ``(B,)``.
    size : int
        Grid size in pixels.
    scale : float
        Pixel scale in arcsec (the intrinsic scale of the images it will convolve).
    g1, g2 : float or torch.Tensor, optional
        Reduced-shear ellipticity.
    dtype, device : optional
        Default: those of a tensor argument, else float32 on the CPU.

    Returns
    -------
    torch.Tensor
        ``(size, size)`` or ``(B, size, size)``.

    Examples
    --------
    >>> p = gaussian_psf(1.0, 25, 0.2)
    >>> p.shape, round(float(p.sum()), 6), int(p.argmax())
    (torch.Size([25, 25]), 1.0, 312)
    """
    dtype, device = _dtype_device(dtype, device, fwhm, g1, g2)
    fwhm = _as_tensor(fwhm, dtype, device)
    if bool((fwhm <= 0).any()):
        raise GalgenInputError("fwhm: must be > 0")
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    r2 = _sheared_r2(size, scale, g1, g2, dtype, device)
    return _normalise(torch.exp(-0.5 * r2 / sigma[..., None, None] ** 2))


def moffat_psf(fwhm, beta, size: int, scale: float, g1=0.0, g2=0.0, *, dtype=None, device=None) -> torch.Tensor:
    """Moffat PSF image(s) ``(1 + (r/alpha)^2)^(-beta)``, unit sum on the grid.

    Parameters
    ----------
    fwhm : float or torch.Tensor
        FWHM in arcsec; ``alpha = fwhm / (2 sqrt(2^(1/beta) - 1))``.
    beta : float or torch.Tensor
        Moffat index (> 1).
    size : int
        Grid size in pixels.
    scale : float
        Pixel scale in arcsec.
    g1, g2 : float or torch.Tensor, optional
        Reduced-shear ellipticity.
    dtype, device : optional
        Default: those of a tensor argument, else float32 on the CPU.

    Returns
    -------
    torch.Tensor
        ``(size, size)`` or ``(B, size, size)``. Equals GalSim's untruncated
        ``Moffat(beta, fwhm).drawImage(method="no_pixel")`` normalised on the same grid.
    """
    dtype, device = _dtype_device(dtype, device, fwhm, beta, g1, g2)
    fwhm = _as_tensor(fwhm, dtype, device)
    beta = _as_tensor(beta, dtype, device)
    if bool((fwhm <= 0).any()):
        raise GalgenInputError("fwhm: must be > 0")
    if bool((beta <= 1).any()):
        raise GalgenInputError("beta: a Moffat PSF needs beta > 1")
    alpha = fwhm / (2 * torch.sqrt(2 ** (1 / beta) - 1))
    r2 = _sheared_r2(size, scale, g1, g2, dtype, device)
    return _normalise((1 + r2 / alpha[..., None, None] ** 2) ** (-beta[..., None, None]))


def psf_from_galsim(profile, size: int, scale: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Draw any GalSim PSF with galgen's convention.

    Parameters
    ----------
    profile : galsim.GSObject
        The PSF (e.g. ``galsim.Kolmogorov(fwhm=0.7)``, ``galsim.OpticalPSF(...)``).
    size : int
        Grid size in pixels.
    scale : float
        Pixel scale in arcsec (the intrinsic scale).
    dtype, device : optional
        Of the returned tensor.

    Returns
    -------
    torch.Tensor
        ``(size, size)``: ``drawImage(method="no_pixel", use_true_center=False)``
        normalised to unit sum.
    """
    img = profile.drawImage(nx=size, ny=size, scale=scale, method="no_pixel", use_true_center=False).array
    t = torch.as_tensor(img, dtype=torch.float64)
    return (t / t.sum()).to(dtype=dtype, device=device)


def check_psf(psf: torch.Tensor, *, name: str = "psf", tolerance: float = 1e-3) -> torch.Tensor:
    """Validate PSF image(s): 2-d or batched, finite, unit sum within ``tolerance``.

    Parameters
    ----------
    psf : torch.Tensor
        ``(P, Q)`` or ``(B, P, Q)``.
    name : str, optional
        Argument name used in error messages.
    tolerance : float, optional
        Allowed ``|sum - 1|``.

    Returns
    -------
    torch.Tensor
        ``psf`` unchanged.

    Raises
    ------
    GalgenInputError
        If the PSF is not a floating tensor of the right shape, is not finite, or does
        not sum to one.
    """
    if not isinstance(psf, torch.Tensor) or not psf.is_floating_point() or psf.ndim not in (2, 3):
        raise GalgenInputError(f"{name}: expected a floating tensor of shape (P, Q) or (B, P, Q)")
    if not bool(torch.isfinite(psf).all()):
        raise GalgenInputError(f"{name}: contains NaN or inf")
    sums = psf.sum(dim=(-2, -1))
    bad = (sums - 1).abs() > tolerance
    if bool(bad.any()):
        worst = float(sums.flatten()[bad.flatten().nonzero()[0]])
        raise GalgenInputError(f"{name}: a PSF must sum to 1 (within {tolerance}); found a sum of {worst:.6g}")
    return psf
