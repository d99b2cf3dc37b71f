"""Noise models with ``sample`` and ``log_prob`` (per image, summed over good pixels).

All models act on tensors of shape ``(H, W)`` or ``(B, H, W)`` and take an optional
boolean ``mask`` (True = pixel excluded): masked pixels contribute nothing to
``log_prob`` or ``chi2`` and are left noiseless by ``sample``.
"""

from __future__ import annotations

import copy
import math

import torch

from ..errors import GalgenInputError

__all__ = ["GaussianNoise", "CCDNoise", "CorrelatedGaussianNoise", "split_variance", "source_noise"]

_LOG_2PI = math.log(2 * math.pi)


def _mask_or_none(mask, like):
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=like.device)
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_sum(x, mask):
    if mask is not None:
        x = torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return x.sum(dim=(-2, -1))


def _rows(t, index, ndim):
    """Rows ``index`` of a per-galaxy tensor (``t.ndim == ndim``); a shared one as it is."""
    return t[index] if t is not None and t.ndim == ndim else t


def _normal(shape, like, generator):
    return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)


def _describe(t):
    """``float32[3, 8, 8]`` (``... cuda:0`` off the CPU), the value of a 0-d tensor, ``None``."""
    if t is None:
        return "None"
    where = "" if t.device.type == "cpu" else f" {t.device}"
    if t.ndim == 0 and t.device.type != "meta":
        return f"{t.item():.6g}{where}"
    return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, t.shape))}]{where}"


class _NoiseModel:
    """Shared parts of every noise model: ``to`` and ``repr`` over its tensor attributes.

    Subclasses list their tensor attributes in ``_tensors`` (in the order ``repr`` shows
    them, with the name shown) and those that keep their dtype in ``_fixed_dtype``.
    """

    _tensors = ()  # (attribute, name in repr)
    _fixed_dtype = ()  # floating tensors that keep their dtype in ``to``
    #: Boolean mask of excluded pixels (True = excluded), or None: every noise model has one.
    mask = None

    def to(self, device=None, dtype=None):
        """A copy with the tensors on another device and/or floating dtype.

        Floating tensors take ``dtype`` (except parameters stored in float64 by
        construction, which are cast to the images' dtype where they are used); boolean
        masks keep theirs. The original is not changed.

        Parameters
        ----------
        device : torch.device or str, optional
            A ``torch.dtype`` given here (``noise.to(torch.float64)``) is taken as ``dtype``.
        dtype : torch.dtype, optional

        Returns
        -------
        same type as self

        Examples
        --------
        >>> import torch
        >>> GaussianNoise(torch.ones(2, 4, 4), torch.zeros(2, 4, 4)).to(torch.float64)
        GaussianNoise(variance=float64[2, 4, 4], mask=bool[2, 4, 4])
        """
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        new = copy.copy(self)
        for name, _ in self._tensors:
            t = getattr(self, name)
            if t is not None:
                keep = name in self._fixed_dtype or not t.is_floating_point()
                setattr(new, name, t.to(device=device, dtype=None if keep else dtype))
        return new

    def sky_variance(self, like: torch.Tensor) -> torch.Tensor:
        """Per-image noise variance of an empty pixel: the median over the stamp of ``variance`` of a blank image.

        Parameters
        ----------
        like : torch.Tensor
            ``(B, H, W)`` images (their shape, dtype and device).

        Returns
        -------
        torch.Tensor
            ``(B,)``.
        """
        var = self.variance(torch.zeros_like(like))
        # contiguous: torch 2.13 CPU returns 0 for the median of a stride-0 (expanded) view
        flat = var.reshape(var.shape[0] if var.ndim == 3 else 1, -1).contiguous()
        return flat.median(1).values.expand(like.shape[0])

    def __repr__(self):
        args = ", ".join(f"{shown}={_describe(getattr(self, name))}" for name, shown in self._tensors)
        return f"{type(self).__name__}({args})"


class _IndependentNoise(_NoiseModel):
    """Shared parts of the noise models whose likelihood is an independent Gaussian per pixel.

    Subclasses define ``variance(model)`` and ``_draw(model, generator)`` (the noisy image).
    """

    mask = None
    _per_galaxy = ()  # attributes that may hold one entry per galaxy: (name, ndim when they do)

    def select(self, index):
        """The noise of galaxies ``index`` of the batch (a subset, reordering or repetition).

        Per-galaxy maps and parameters are indexed, shared ones kept; the result is not
        validated again.

        Parameters
        ----------
        index : torch.Tensor
            1-d integer indices into the batch.

        Returns
        -------
        same type as self
        """
        new = copy.copy(self)
        for name, ndim in self._per_galaxy + (("mask", 3),):
            setattr(new, name, _rows(getattr(self, name), index, ndim))
        return new

    def _masked_noise(self, model, noisy):
        noise = noisy - model.detach()
        if self.mask is not None:  # masked pixels stay noiseless
            noise = torch.where(self.mask, torch.zeros_like(noise), noise)
        return model + noise

    def sample(self, model: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``model + noise`` (masked pixels are left noiseless).

        Parameters
        ----------
        model : torch.Tensor
            Noiseless images.
        generator : torch.Generator, optional
            Source of randomness (same seed, same draw).

        Returns
        -------
        torch.Tensor
        """
        return self._masked_noise(model, self._draw(model.detach(), generator))

    def chi2(self, data: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """Sum over good pixels of ``(data - model)^2 / variance``, per image.

        Parameters
        ----------
        data, model : torch.Tensor

        Returns
        -------
        torch.Tensor
            Shape ``data.shape[:-2]``.
        """
        return _masked_sum((data - model) ** 2 / self.variance(model), self.mask)

    def whiten(self, x: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """``x / sqrt(variance(model))``, 0 on masked pixels: residuals (or model
        derivatives) in units of the noise, so that ``|whiten(data - model)|^2`` is
        :meth:`chi2` and ``J_w^T J_w`` of whitened Jacobian columns is the Gauss-Newton
        (Fisher) matrix.

        Parameters
        ----------
        x : torch.Tensor
            ``(..., H, W)`` images, broadcastable against ``model``.
        model : torch.Tensor
            Noise-free images whose variance whitens ``x``.

        Returns
        -------
        torch.Tensor
        """
        w = x / self.variance(model).sqrt()
        return w if self.mask is None else w.masked_fill(self.mask, 0.0)

    def log_prob(self, data: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """Gaussian log-likelihood ``log p(data | model)`` per image (nats).

        Parameters
        ----------
        data, model : torch.Tensor

        Returns
        -------
        torch.Tensor
            ``-0.5 * sum[(d - m)^2 / v + log(2 pi v)]`` over good pixels.
        """
        v = self.variance(model)
        return -0.5 * _masked_sum((data - model) ** 2 / v + torch.log(v) + _LOG_2PI, self.mask)


class GaussianNoise(_IndependentNoise):
    """Independent Gaussian noise with a per-pixel variance map.

    Parameters
    ----------
    variance : float or torch.Tensor
        Variance (image units squared), broadcastable to the images; must be positive
        and finite at every unmasked pixel.
    mask : torch.Tensor, optional
        Boolean (or 0/non-zero) mask, True = excluded.

    Examples
    --------
    >>> import torch
    >>> noise = GaussianNoise(torch.full((4, 4), 2.0, dtype=torch.float64))
    >>> model = torch.zeros(4, 4, dtype=torch.float64)
    >>> round(float(noise.log_prob(model, model)), 4)  # -0.5 * 16 * log(2 pi 2)
    -20.2482
    """

    _per_galaxy = (("variance_map", 3),)
    _tensors = (("variance_map", "variance"), ("mask", "mask"))

    def __init__(self, variance, mask=None):
        variance = torch.as_tensor(variance)
        if not variance.is_floating_point():
            variance = variance.to(torch.get_default_dtype())
        self.mask = _mask_or_none(mask, variance)
        good = torch.isfinite(variance) & (variance > 0)
        if self.mask is not None:
            good = good | torch.broadcast_to(self.mask, torch.broadcast_shapes(good.shape, self.mask.shape))
        if not bool(good.all()):
            raise GalgenInputError("variance: must be positive and finite at every unmasked pixel")
        self.variance_map = variance

    def variance(self, model: torch.Tensor) -> torch.Tensor:
        """Per-pixel variance on the dtype and device of ``model`` (1 at masked pixels).

        Parameters
        ----------
        model : torch.Tensor

        Returns
        -------
        torch.Tensor
        """
        v = self.variance_map.to(dtype=model.dtype, device=model.device)
        if self.mask is not None:  # masked pixels may hold 0 or NaN: make them harmless
            v = torch.where(self.mask, torch.ones((), dtype=v.dtype, device=v.device), v)
        return v

    def _draw(self, model, generator):
        return model + _normal(model.shape, model, generator) * self.variance(model).sqrt()


class CCDNoise(_IndependentNoise):
    """CCD noise: Poisson noise of (signal + sky) electrons plus Gaussian read noise.

    Images are in ADU with the sky subtracted, as GalSim's ``CCDNoise``. ``sample``
    draws the exact Poisson + Gaussian noise; ``log_prob`` uses the Gaussian
    approximation with signal-dependent variance
    ``(max(model, 0) + sky) / gain + (read_noise / gain)^2``, which is differentiable
    and accurate when a pixel holds more than a few tens of electrons.

    Parameters
    ----------
    sky_level : float or torch.Tensor
        Sky level in ADU per pixel (subtracted from the images), >= 0.
    gain : float or torch.Tensor
        Electrons per ADU, > 0.
    read_noise : float or torch.Tensor
        Read noise in electrons, >= 0.
    mask : torch.Tensor, optional
        True = excluded.
    """

    _per_galaxy = (("sky_level", 1), ("gain", 1), ("read_noise", 1))
    _tensors = (("sky_level", "sky_level"), ("gain", "gain"), ("read_noise", "read_noise"), ("mask", "mask"))
    _fixed_dtype = ("sky_level", "gain", "read_noise")  # float64, cast to the images' dtype in use

    def __init__(self, sky_level, gain, read_noise, mask=None):
        self.sky_level = torch.as_tensor(sky_level, dtype=torch.float64)
        self.gain = torch.as_tensor(gain, dtype=torch.float64)
        self.read_noise = torch.as_tensor(read_noise, dtype=torch.float64)
        if not bool((self.gain > 0).all()) or not bool(torch.isfinite(self.gain).all()):
            raise GalgenInputError("gain: must be positive and finite")
        if not bool((self.sky_level >= 0).all()):
            raise GalgenInputError("sky_level: must be >= 0")
        if not bool((self.read_noise >= 0).all()):
            raise GalgenInputError("read_noise: must be >= 0")
        if float((self.sky_level.max() + self.read_noise.max() ** 2)) <= 0:
            raise GalgenInputError("sky_level, read_noise: at least one must be positive (else the "
                                   "variance of an empty pixel is zero)")
        self.mask = _mask_or_none(mask, self.gain)

    def _p(self, like, x):
        x = x.to(dtype=like.dtype, device=like.device)
        return x[..., None, None] if x.ndim == 1 else x

    def variance(self, model: torch.Tensor) -> torch.Tensor:
        """Per-pixel variance (ADU^2) of the noise around ``model``.

        Parameters
        ----------
        model : torch.Tensor

        Returns
        -------
        torch.Tensor
        """
        sky, gain, rn = (self._p(model, x) for x in (self.sky_level, self.gain, self.read_noise))
        return (model.clamp(min=0) + sky) / gain + (rn / gain) ** 2

    def _draw(self, model, generator):
        sky, gain, rn = (self._p(model, x) for x in (self.sky_level, self.gain, self.read_noise))
        electrons = torch.poisson((model.clamp(min=0) + sky) * gain, generator=generator)
        read = _normal(model.shape, model, generator) * rn
        return (electrons + read) / gain - sky


class CorrelatedGaussianNoise(_NoiseModel):
    """Stationary correlated Gaussian noise, with the likelihood evaluated in Fourier space.

    For noise whose covariance is stationary (e.g. the pixel correlations that
    drizzling leaves in HST COSMOS images), the covariance on a periodic ``H x W`` grid
    is diagonal in Fourier space with eigenvalues ``P_k`` (the noise power spectrum,
    the DFT of the covariance function). Then
    ``r^T C^-1 r = (1/N) sum_k |FFT(r)_k|^2 / P_k`` and ``log det C = sum_k log P_k``.

    Parameters
    ----------
    power_spectrum : torch.Tensor
        ``P_k`` on the full ``(H, W)`` FFT grid (``torch.fft.fft2`` ordering), positive,
        symmetric under ``k -> -k``. For white noise of variance ``s2``, ``P_k = s2``.

    Notes
    -----
    Masks are not supported: a mask breaks stationarity, so the Fourier-diagonal form
    no longer holds (a masked pixel would need the full covariance). The periodic grid
    approximates the covariance at the stamp edges; pad the residual when correlations
    are long compared with the stamp.
    """

    _tensors = (("power_spectrum", "power_spectrum"),)

    def __init__(self, power_spectrum):
        p = torch.as_tensor(power_spectrum)
        if p.ndim != 2 or not bool(torch.isfinite(p).all()) or not bool((p > 0).all()):
            raise GalgenInputError("power_spectrum: expected a positive, finite (H, W) tensor")
        self.power_spectrum = p

    @classmethod
    def from_correlation(cls, kernel: torch.Tensor, shape: tuple[int, int]):
        """Noise made by convolving white unit noise with ``kernel`` (centre at ``(P//2, Q//2)``).

        Parameters
        ----------
        kernel : torch.Tensor
            ``(P, Q)`` smoothing kernel.
        shape : tuple of int
            Image shape ``(H, W)``.

        Returns
        -------
        CorrelatedGaussianNoise
            With ``P_k = |FFT(kernel)_k|^2`` (kernel placed with its centre at the origin).
        """
        h, w = shape
        p, q = kernel.shape
        padded = torch.zeros((h, w), dtype=kernel.dtype, device=kernel.device)
        padded[:p, :q] = kernel
        padded = torch.roll(padded, shifts=(-(p // 2), -(q // 2)), dims=(0, 1))
        return cls(torch.fft.fft2(padded).abs() ** 2)

    def select(self, index):
        """The same (stationary, shared) noise for galaxies ``index`` of the batch.

        Parameters
        ----------
        index : torch.Tensor

        Returns
        -------
        CorrelatedGaussianNoise
            ``self``.
        """
        return self

    def _p(self, like):
        if tuple(like.shape[-2:]) != tuple(self.power_spectrum.shape):
            raise GalgenInputError(f"data: image shape {tuple(like.shape[-2:])} does not match the power "
                                   f"spectrum {tuple(self.power_spectrum.shape)}")
        return self.power_spectrum.to(dtype=like.dtype, device=like.device)

    def variance(self, model: torch.Tensor) -> torch.Tensor:
        """Marginal per-pixel variance, ``C(0) = mean_k P_k``, on the dtype and device of ``model``.

        Parameters
        ----------
        model : torch.Tensor
            ``(..., H, W)``.

        Returns
        -------
        torch.Tensor
            Same shape as ``model`` (every pixel has the same variance).
        """
        return self._p(model).mean().expand(model.shape)

    def sample(self, model: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``model`` plus correlated noise.

        Parameters
        ----------
        model : torch.Tensor
        generator : torch.Generator, optional

        Returns
        -------
        torch.Tensor
        """
        p = self._p(model)
        white = _normal(model.shape, model, generator)
        return model + torch.fft.ifft2(torch.fft.fft2(white) * p.sqrt()).real

    def chi2(self, data: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """``r^T C^-1 r`` per image, ``r = data - model``.

        Parameters
        ----------
        data, model : torch.Tensor

        Returns
        -------
        torch.Tensor
        """
        p = self._p(data)
        n = p.numel()
        rk = torch.fft.fft2(data - model)
        return (rk.abs() ** 2 / p).sum(dim=(-2, -1)) / n

    def whiten(self, x: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """``C^-1/2 x`` on the periodic grid: ``|whiten(data - model)|^2`` is :meth:`chi2`.

        Parameters
        ----------
        x : torch.Tensor
            ``(..., H, W)`` images.
        model : torch.Tensor
            Unused (the covariance does not depend on the model).

        Returns
        -------
        torch.Tensor
        """
        return torch.fft.ifft2(torch.fft.fft2(x) / self._p(x).sqrt()).real

    def log_prob(self, data: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """Exact Gaussian log-likelihood on the periodic grid, per image (nats).

        Parameters
        ----------
        data, model : torch.Tensor

        Returns
        -------
        torch.Tensor
        """
        p = self._p(data)
        return -0.5 * (self.chi2(data, model) + torch.log(p).sum() + p.numel() * _LOG_2PI)


def split_variance(variance: torch.Tensor, observed: torch.Tensor, mask=None, quantile: float = 0.01):
    """Split variance maps that hold each galaxy's own Poisson noise into a background and a source term.

    A detector's variance is ``background + max(signal, 0) / gain`` (GalSim's ``CCDNoise``,
    galgen's simulated files, most pipelines' variance planes), so a variance map carries
    the imprint of *its* galaxy. Noise drawn from it for another image (a GAN's fake
    observed like galaxy ``i``) puts that galaxy's shape into the noise, which a critic can
    see. The background of each map is a low quantile of its unmasked pixels (1%: the
    median of a stamp that a large galaxy fills, or of its border, holds the galaxy's light;
    the minimum follows noise in estimated maps); ``1 / gain`` is pooled over the batch
    from the source-dominated pixels (``variance - background > background`` and
    ``observed > 0``):
    ``sum(variance - background) / sum(observed)``, 0 where no pixel is source-dominated
    (maps of the background alone).

    Parameters
    ----------
    variance, observed : torch.Tensor
        ``(B, S, S)`` variance maps and the observed images they belong to.
    mask : torch.Tensor, optional
        ``(B, S, S)`` or ``(S, S)`` boolean, True = excluded.
    quantile : float, optional
        Quantile of each map's unmasked pixels taken as its background.

    Returns
    -------
    background : torch.Tensor
        ``(B,)`` variance of an empty pixel.
    inverse_gain : torch.Tensor
        Scalar, ``>= 0``: the source term per unit signal.

    Examples
    --------
    >>> signal = torch.zeros(1, 16, 16); signal[0, 6:10, 6:10] = 400.0
    >>> bg, k = split_variance(4.0 + signal / 5.0, signal)
    >>> float(bg[0]), round(float(k), 6)
    (4.0, 0.2)
    """
    if variance.ndim != 3 or observed.shape != variance.shape:
        raise GalgenInputError(f"variance, observed: expected two (B, S, S) tensors of one shape, got "
                               f"{tuple(variance.shape)} and {tuple(observed.shape)}")
    v, x = variance.double(), observed.detach().double().to(variance.device)
    bad = torch.zeros_like(v, dtype=torch.bool) if mask is None else \
        torch.broadcast_to(_mask_or_none(mask, v), v.shape)
    background = torch.where(bad, torch.nan, v).flatten(1).nanquantile(quantile, dim=1)
    background = torch.where(torch.isnan(background), v.flatten(1).min(dim=1).values, background)
    excess = v - background[:, None, None]
    use = ~bad & (excess > background[:, None, None]) & (x > 0)
    signal = x[use].sum()
    inverse_gain = excess[use].sum() / signal if bool(signal > 0) else torch.zeros((), dtype=v.dtype)
    return background.to(variance.dtype), inverse_gain.clamp(min=0).to(variance.dtype)


def source_noise(background: torch.Tensor, inverse_gain, mask=None):
    """The noise of images whose variance is ``background + max(signal, 0) * inverse_gain``.

    With a source term, a :class:`CCDNoise` (Poisson electrons at ``gain = 1 /
    inverse_gain`` over a sky that gives the background variance); without one, a
    :class:`GaussianNoise` of the background. Fakes observed with it carry noise of their
    own light (see :func:`split_variance`).

    Parameters
    ----------
    background : torch.Tensor
        ``(B,)`` variance of an empty pixel.
    inverse_gain : float or torch.Tensor
        Scalar ``>= 0``.
    mask : torch.Tensor, optional

    Returns
    -------
    CCDNoise or GaussianNoise
    """
    k = float(inverse_gain)
    if not k > 0:
        return GaussianNoise(background[:, None, None].clone(), mask)
    return CCDNoise(background.double() / k, 1.0 / k, 0.0, mask)
