"""An observation: PSF, pixel scale, oversampling and noise, bundled and batched.

``Observation.observe(intrinsic)`` turns intrinsic (PSF-free) images into what the
telescope records; ``log_likelihood(intrinsic, data)`` is what training and inference
optimise. The intrinsic grid may be larger than the detector stamp (pad it, about
twice the stamp, when PSF wings matter): after convolution and pixel integration the
central ``stamp x stamp`` detector pixels are kept, with the centring convention
(detector pixel ``(S'//2, S'//2)`` of the padded grid becomes ``(S//2, S//2)``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import GalgenInputError
from .convolve import convolve, crop_kernel, fft_shape, pixelate, psf_transfer
from .noise import GaussianNoise
from .psf import check_psf

__all__ = ["Observation", "Batch"]


class Observation:
    """PSF convolution, pixel integration, cropping and noise for a batch of galaxies.

    Parameters
    ----------
    psf : torch.Tensor
        ``(P, P)`` shared or ``(B, P, P)`` per-galaxy PSF at the intrinsic scale, unit
        sum, centre at ``(P//2, P//2)``, without pixel response.
    pixel_scale : float
        Detector pixel scale in arcsec/pixel.
    oversampling : int, optional
        Intrinsic pixels per detector pixel.
    stamp : int, optional
        Detector stamp size to keep; default: the full intrinsic grid / oversampling.
    noise : GaussianNoise, CCDNoise or CorrelatedGaussianNoise, optional
        Noise model of the detector images (needed by ``observe`` for the noisy image and
        by ``log_likelihood``).

    Examples
    --------
    >>> import torch
    >>> from galgen.physics import Observation, GaussianNoise, gaussian_psf
    >>> psf = gaussian_psf(1.4, 33, 0.396 / 3, dtype=torch.float64)
    >>> obs = Observation(psf, pixel_scale=0.396, oversampling=3, stamp=32,
    ...                   noise=GaussianNoise(torch.full((32, 32), 30.0, dtype=torch.float64)))
    >>> intrinsic = torch.zeros(2, 192, 192, dtype=torch.float64); intrinsic[:, 97, 97] = 1000.0
    >>> noiseless, noisy = obs.observe(intrinsic, generator=torch.Generator().manual_seed(0))
    >>> noiseless.shape, round(float(noiseless[0].sum()), 3)
    (torch.Size([2, 32, 32]), 1000.0)
    """

    def __init__(self, psf: torch.Tensor, *, pixel_scale: float, oversampling: int = 1,
                 stamp: int | None = None, noise=None):
        self.psf = check_psf(psf)
        if not pixel_scale or pixel_scale <= 0:
            raise GalgenInputError(f"pixel_scale: must be > 0 arcsec/pixel, got {pixel_scale!r}")
        if int(oversampling) < 1:
            raise GalgenInputError(f"oversampling: must be >= 1, got {oversampling!r}")
        if stamp is not None and int(stamp) < 1:
            raise GalgenInputError(f"stamp: must be >= 1, got {stamp!r}")
        self.pixel_scale = float(pixel_scale)
        self.oversampling = int(oversampling)
        self.stamp = None if stamp is None else int(stamp)
        self.noise = noise
        self._transfer = {}
        self._parent = None  # (observation, index) of a selection that shares its PSF transforms

    @property
    def intrinsic_scale(self) -> float:
        """Pixel scale of the intrinsic grid, arcsec/pixel."""
        return self.pixel_scale / self.oversampling

    def _check_intrinsic(self, intrinsic):
        if not isinstance(intrinsic, torch.Tensor) or intrinsic.ndim not in (2, 3):
            raise GalgenInputError("intrinsic: expected a tensor of shape (H, W) or (B, H, W)")
        if self.psf.ndim == 3 and (intrinsic.ndim != 3 or intrinsic.shape[0] != self.psf.shape[0]):
            raise GalgenInputError(f"intrinsic: batch of {tuple(intrinsic.shape)} does not match "
                                   f"{self.psf.shape[0]} per-galaxy PSFs")
        h, w = intrinsic.shape[-2:]
        k = self.oversampling
        if h % k or w % k:
            raise GalgenInputError(f"intrinsic: grid {h}x{w} is not a multiple of the oversampling {k}")
        if self.stamp is not None and (h // k < self.stamp or w // k < self.stamp):
            raise GalgenInputError(f"intrinsic: grid {h}x{w} covers {h // k}x{w // k} detector pixels, "
                                   f"fewer than the stamp {self.stamp}")

    def select(self, index) -> "Observation":
        """The observation of galaxies ``index`` of this batch: a subset, reordering or repetition.

        Per-galaxy PSFs, variance maps, masks and noise parameters are indexed; shared ones
        are kept. The selection reuses this observation's cached PSF transforms (indexed,
        not recomputed), so that selecting a few rows of a large batch at every step, as
        NUTS does for the chains still moving, costs no PSF FFTs.

        Parameters
        ----------
        index : sequence of int or torch.Tensor
            1-d indices into the batch.

        Returns
        -------
        Observation

        Examples
        --------
        >>> import torch
        >>> from galgen.physics import Observation, gaussian_psf
        >>> psfs = torch.stack([gaussian_psf(f, 15, 0.2) for f in (0.8, 1.2)])
        >>> obs = Observation(psfs, pixel_scale=0.2)
        >>> obs.select([1, 1, 0]).psf.shape
        torch.Size([3, 15, 15])
        """
        index = torch.as_tensor(index, dtype=torch.long, device=self.psf.device)
        if index.ndim != 1:
            raise GalgenInputError(f"index: expected 1-d indices into the batch, got shape {tuple(index.shape)}")
        n = self.batch_size
        if n is not None and len(index) and (int(index.min()) < -n or int(index.max()) >= n):
            raise GalgenInputError(f"index: out of range for a batch of {n} galaxies")
        new = copy.copy(self)
        new._transfer, new._parent = {}, None
        if self.psf.ndim == 3:
            new.psf = self.psf[index]
            new._parent = (self, index)
        if self.noise is not None:
            new.noise = self.noise.select(index)
        return new

    @property
    def batch_size(self) -> int | None:
        """Galaxies of the per-galaxy PSFs or noise maps; ``None`` where all are shared."""
        if self.psf.ndim == 3:
            return self.psf.shape[0]
        for name, ndim in getattr(self.noise, "_per_galaxy", ()) + (("mask", 3),):
            t = getattr(self.noise, name, None)
            if t is not None and t.ndim == ndim:
                return t.shape[0]
        return None

    def _psf_transfer(self, intrinsic):
        """The PSF's FFT at this grid, cached while the PSF needs no gradient."""
        h, w = intrinsic.shape[-2:]
        if self._parent is not None and not self.psf.requires_grad:  # a selection: index the parent's
            parent, index = self._parent
            psf, transfer = parent._psf_transfer(intrinsic)
            key = (transfer.shape, intrinsic.dtype, intrinsic.device)
            if key not in self._transfer:
                self._transfer[key] = transfer[index]
            return psf[index], self._transfer[key]
        psf = crop_kernel(self.psf.to(dtype=intrinsic.dtype, device=intrinsic.device), h, w)
        shape = fft_shape(h, w, *psf.shape[-2:])
        if psf.requires_grad:
            return psf, psf_transfer(psf, shape)
        key = (shape, intrinsic.dtype, intrinsic.device)
        if key not in self._transfer:
            self._transfer[key] = psf_transfer(psf, shape)
        return psf, self._transfer[key]

    def noiseless(self, intrinsic: torch.Tensor) -> torch.Tensor:
        """Detector images without noise: PSF convolution, pixel integration, crop.

        Parameters
        ----------
        intrinsic : torch.Tensor
            ``(H, W)`` or ``(B, H, W)`` pixel-integrated intrinsic images at the
            intrinsic scale, profile centre at the centre of the fine block of detector
            pixel ``(H/k//2, W/k//2)``.

        Returns
        -------
        torch.Tensor
            ``(..., stamp, stamp)`` detector images.
        """
        self._check_intrinsic(intrinsic)
        psf, transfer = self._psf_transfer(intrinsic)
        det = pixelate(convolve(intrinsic, psf, transfer=transfer, check=False), self.oversampling)
        if self.stamp is None:
            return det
        h, w = det.shape[-2:]
        y0, x0 = h // 2 - self.stamp // 2, w // 2 - self.stamp // 2
        return det[..., y0:y0 + self.stamp, x0:x0 + self.stamp]

    def observe(self, intrinsic: torch.Tensor, generator: torch.Generator | None = None):
        """Noiseless and noisy detector images of intrinsic images.

        Parameters
        ----------
        intrinsic : torch.Tensor
            See :meth:`noiseless`.
        generator : torch.Generator, optional
            Randomness of the noise.

        Returns
        -------
        noiseless, noisy : torch.Tensor
        """
        model = self.noiseless(intrinsic)
        if self.noise is None:
            raise GalgenInputError("noise: this Observation has no noise model")
        return model, self.noise.sample(model, generator=generator)

    def log_likelihood(self, intrinsic: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """``log p(data | intrinsic)`` per galaxy, in nats, differentiable in ``intrinsic``.

        Parameters
        ----------
        intrinsic : torch.Tensor
            Intrinsic images.
        data : torch.Tensor
            Observed detector images, ``(..., stamp, stamp)``.

        Returns
        -------
        torch.Tensor
        """
        if self.noise is None:
            raise GalgenInputError("noise: this Observation has no noise model")
        model = self.noiseless(intrinsic)
        if data.shape != model.shape:
            raise GalgenInputError(f"data: shape {tuple(data.shape)} does not match the model {tuple(model.shape)}")
        return self.noise.log_prob(data, model)

    def to(self, device=None, dtype=None) -> "Observation":
        """A copy with the PSF and noise tensors on another device / dtype.

        The noise model is moved by its own ``to`` (floating tensors take ``dtype``,
        masks keep theirs).

        Parameters
        ----------
        device : torch.device or str, optional
            A ``torch.dtype`` given here (``obs.to(torch.float64)``) is taken as ``dtype``.
        dtype : torch.dtype, optional

        Returns
        -------
        Observation
        """
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        psf = self.psf.to(device=device, dtype=dtype)
        noise = None if self.noise is None else self.noise.to(device=device, dtype=dtype)
        return Observation(psf, pixel_scale=self.pixel_scale, oversampling=self.oversampling,
                           stamp=self.stamp, noise=noise)

    def __repr__(self):
        psf = f"{str(self.psf.dtype).removeprefix('torch.')}[{', '.join(map(str, self.psf.shape))}]"
        if self.psf.device.type != "cpu":
            psf += f" {self.psf.device}"
        return (f"Observation(psf={psf}, pixel_scale={self.pixel_scale:g}, oversampling={self.oversampling}, "
                f"stamp={self.stamp}, noise={self.noise!r})")

    @classmethod
    def from_cutouts(cls, *args, **kwargs):
        """Removed: the physics layer reads no files; use :func:`galgen.data.observation_from_cutouts`.

        Parameters
        ----------
        *args, **kwargs
            Ignored.

        Raises
        ------
        GalgenInputError
            Always, naming the replacement.
        """
        raise GalgenInputError("Observation.from_cutouts moved to galgen.data.observation_from_cutouts(path, index, "
                               "dtype=..., device=...) (or galgen.data.ObservationLoader for batches)")

    @classmethod
    def from_survey(cls, *args, **kwargs):
        """Removed: use :func:`galgen.simulate.survey_observation` (survey presets live in ``simulate``).

        Parameters
        ----------
        *args, **kwargs
            Ignored.

        Raises
        ------
        GalgenInputError
            Always, naming the replacement.
        """
        raise GalgenInputError("Observation.from_survey moved to galgen.simulate.survey_observation(survey, "
                               "psf_fwhm=..., psf_size=..., stamp=..., oversampling=...)")

    @classmethod
    def from_batch(cls, batch: dict, *, pixel_scale: float, oversampling: int = 1) -> "Observation":
        """The observation of a batch of :class:`galgen.data.CutoutDataset` items.

        Parameters
        ----------
        batch : dict
            With ``psf`` ``(B, P, P)``, ``variance`` ``(B, S, S)`` and ``mask`` ``(B, S, S)``
            tensors (as a ``DataLoader`` over a ``CutoutDataset`` yields them).
        pixel_scale : float
            Detector pixel scale (the dataset's ``attrs["pixel_scale"]``).
        oversampling : int, optional
            The dataset's ``attrs["oversampling"]``.

        Returns
        -------
        Observation
            Per-galaxy PSFs (renormalised to unit sum) and :class:`GaussianNoise`.
        """
        missing = [k for k in ("psf", "variance", "mask") if k not in batch]
        if missing:
            raise GalgenInputError(f"batch: missing {missing} (load the dataset with these keys)")
        psf = batch["psf"]
        psf = psf / psf.sum(dim=(-2, -1), keepdim=True)
        var = batch["variance"].to(psf.dtype)
        return cls(psf, pixel_scale=pixel_scale, oversampling=oversampling, stamp=var.shape[-1],
                   noise=GaussianNoise(var, batch["mask"]))


@dataclass
class Batch:
    """Observed cutouts with their physics and catalog values: what models and fitters consume.

    Made by :class:`galgen.data.ObservationLoader` (and so by the training data), or by
    hand from tensors.

    Parameters
    ----------
    observed : torch.Tensor
        ``(B, S, S)`` observed cutouts (ADU).
    observation : Observation
        Per-galaxy PSF, pixel scale, oversampling and noise (variance, mask).
    cond : torch.Tensor, optional
        ``(B, C)`` raw catalog values of a model's ``conditions`` (e.g. magnitude,
        half-light radius in arcsec); the model normalises them.
    index : torch.Tensor, optional
        ``(B,)`` rows of the galaxies in their file.
    """

    observed: torch.Tensor
    observation: Observation
    cond: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.observed.shape[0]

    def shallower(self, factor, generator: torch.Generator | None = None) -> "Batch":
        """The same galaxies observed less deeply: noise variance times ``factor``.

        Gaussian noise with ``(factor - 1)`` times each pixel's variance is added to the
        observed images and the variance maps are scaled by ``factor``, so the result is
        distributed exactly as the galaxies observed with ``factor`` times the variance
        (``factor`` exposures fewer in a coadd: a 40-exposure coadd with ``factor=40`` is
        one exposure). Masked pixels are left as they are. Training on a mixture of depths
        (``train.depth_mix``) draws a factor per galaxy.

        Parameters
        ----------
        factor : float or torch.Tensor
            ``>= 1``; a scalar or one per galaxy ``(B,)``.
        generator : torch.Generator, optional
            Source of the added noise.

        Returns
        -------
        Batch
            New observed images and observation (PSFs shared with this batch).

        Raises
        ------
        GalgenInputError
            A factor below 1, or a noise model other than per-pixel Gaussian.

        Examples
        --------
        >>> import torch
        >>> from galgen.physics import Observation, GaussianNoise
        >>> psf = torch.zeros(2, 5, 5); psf[:, 2, 2] = 1
        >>> obs = Observation(psf, pixel_scale=0.4, stamp=8, noise=GaussianNoise(torch.ones(2, 8, 8)))
        >>> b = Batch(torch.zeros(2, 8, 8), obs).shallower(torch.tensor([1.0, 4.0]))
        >>> b.observation.noise.variance_map[:, 0, 0].tolist()
        [1.0, 4.0]
        """
        noise = self.observation.noise
        if not isinstance(noise, GaussianNoise):
            raise GalgenInputError(f"shallower: needs per-pixel GaussianNoise (cutout files), got "
                                   f"{type(noise).__name__}")
        f = torch.as_tensor(factor, dtype=self.observed.dtype, device=self.observed.device)
        if not bool((f >= 1).all()):
            raise GalgenInputError(f"shallower: factor must be >= 1, got min {float(f.min()):.4g}")
        f = f.reshape(-1, 1, 1) if f.ndim == 1 else f
        var = noise.variance(self.observed)
        extra = (var * (f - 1)).sqrt() * torch.randn(self.observed.shape, generator=generator,
                                                        dtype=self.observed.dtype, device=self.observed.device)
        if noise.mask is not None:
            extra = torch.where(noise.mask, torch.zeros((), dtype=extra.dtype, device=extra.device), extra)
        obs = copy.copy(self.observation)
        obs.noise = GaussianNoise(noise.variance_map * f.to(noise.variance_map.dtype), noise.mask)
        return Batch(observed=self.observed + extra, observation=obs, cond=self.cond, index=self.index)
