"""Parametric galaxy models in torch: Sersic and bulge + disk, the classic baseline.

A deep generative prior is only worth its cost if it explains galaxies better than the
profiles astronomers have fitted for decades. :class:`SersicModel` renders a single
Sersic profile or a de Vaucouleurs bulge plus exponential disk, pixel-integrated,
differentiably and in batches, so that galgen's own MAP and HMC code
(:func:`galgen.inference.fit_map`, ``galgen fit --model sersic``) fits it to the same
galaxies, through the same physics layer, as the VAE.

The profiles are rendered by :func:`galgen.physics.sersic.render_sersic` (GalSim's
conventions, pixel-integrated; also importable from here, as is
:func:`~galgen.physics.sersic.sersic_b`).
"""

from __future__ import annotations

import math

import warnings

import torch
from torch.distributions import TransformedDistribution
from torch.distributions.transforms import AffineTransform

from ..errors import GalgenInputError
from ..physics.sersic import render_sersic, sersic_b
from .base import LatentModel, sample_latents, standard_normal

__all__ = ["sersic_b", "render_sersic", "SersicModel", "PARAMETRIC_KINDS"]

#: Kinds of :class:`SersicModel`: a single Sersic, or n=4 bulge + n=1 disk.
PARAMETRIC_KINDS = ("sersic", "bulge-disk")


def _bounded(t, lo, hi):
    return lo + (hi - lo) * torch.sigmoid(t)


def _unbounded(x, lo, hi):
    f = (x - lo) / (hi - lo)
    return math.log(f / (1 - f))


def _shear(e1, e2, gmax=0.9):
    """Unconstrained (e1, e2) -> reduced shear with |g| < gmax, smooth at 0."""
    r = torch.sqrt(e1 * e1 + e2 * e2 + 1e-12)
    f = gmax * torch.tanh(r) / r
    return f * e1, f * e2


class SersicModel(LatentModel):
    """A single Sersic or a bulge + disk galaxy, rendered at unit flux, for galgen's fitters.

    Parameters are an unconstrained vector ``theta`` (``param_names``), the model's
    latent code; the flux is the fitters' separate log flux scale (``decode`` renders
    unit flux). :meth:`encode` guesses ``theta`` from the light-weighted moments of a
    stamp, and :meth:`prior` is a weakly informative Gaussian on ``theta``.

    ``sersic``: ``log_hlr`` (arcsec), ``t_n`` (n = 0.5 + 5.5 sigmoid(t_n), in
    [0.5, 6]), ``eta1``, ``eta2`` (shear ``g = 0.9 tanh|eta| eta/|eta|``), ``u_x``,
    ``u_y`` (centroid offset ``2 tanh(u)`` detector pixels).
    ``bulge-disk``: ``t_bt`` (B/T = sigmoid), ``log_hlr_bulge``, ``log_hlr_disk``, the
    shear of each, and the common centroid; n = 4 and 1.

    Parameters
    ----------
    kind : {"sersic", "bulge-disk"}, optional
    stamp : int
        Detector stamp size.
    oversampling : int, optional
        Intrinsic pixels per detector pixel.
    pixel_scale : float
        Detector pixel scale (arcsec/pixel).
    fit_centroid : bool, optional
        Fit a sub-pixel centroid offset (else the galaxy is at the stamp centre).
    pad : int, optional
        Detector pixels rendered beyond each side of the stamp, so that light from outside
        the stamp that the PSF scatters into it is not lost (the observation crops them
        off). Worth a PSF half-width for galaxies that fill their stamp.

    Examples
    --------
    >>> import torch
    >>> m = SersicModel("sersic", stamp=32, pixel_scale=0.396)
    >>> img = m.decode(torch.zeros(2, m.latent_dim))
    >>> img.shape, round(float(img[0].sum()), 2)  # n = 3.25, hlr = 1": 5% beyond the stamp
    (torch.Size([2, 32, 32]), 0.95)
    """

    conditions = ()
    cond_dim = 0
    #: Levenberg-Marquardt: 7-15 parameters, 5-15 Gauss-Newton steps (8x Adam's speed, docs/benchmarks.md).
    map_optimizer = "lm"

    def __init__(self, kind: str = "sersic", *, stamp: int, oversampling: int = 1, pixel_scale: float,
                 fit_centroid: bool = True, pad: int = 0):
        super().__init__()
        if kind not in PARAMETRIC_KINDS:
            raise GalgenInputError(f"kind: one of {PARAMETRIC_KINDS}, got {kind!r}")
        if int(stamp) < 4 or int(oversampling) < 1 or not pixel_scale > 0:
            raise GalgenInputError(f"stamp/oversampling/pixel_scale: got {stamp!r}/{oversampling!r}/{pixel_scale!r}")
        if int(pad) < 0:
            raise GalgenInputError(f"pad: must be >= 0 detector pixels, got {pad!r}")
        self.kind, self.fit_centroid = kind, bool(fit_centroid)
        shape = (["log_hlr", "t_n", "eta1", "eta2"] if kind == "sersic" else
                 ["t_bt", "log_hlr_bulge", "log_hlr_disk", "eta1_bulge", "eta2_bulge", "eta1_disk", "eta2_disk"])
        self.param_names = shape + (["u_x", "u_y"] if fit_centroid else [])
        self.latent_dim = len(self.param_names)
        self.config = {"kind": kind, "stamp": int(stamp), "oversampling": int(oversampling),
                       "pixel_scale": float(pixel_scale), "latent_dim": self.latent_dim,
                       "fit_centroid": self.fit_centroid, "pad": int(pad)}
        loc, scale = self._prior_moments(torch.float32, "cpu")
        self.register_buffer("prior_loc", loc, persistent=False)
        self.register_buffer("prior_scale", scale, persistent=False)

    @property
    def latent_names(self) -> list:
        """The parameter names, :attr:`param_names`.

        Returns
        -------
        list of str
        """
        return list(self.param_names)

    def physical(self, theta: torch.Tensor) -> dict:
        """Physical parameters of unconstrained vectors.

        Parameters
        ----------
        theta : torch.Tensor
            ``(B, latent_dim)``.

        Returns
        -------
        dict of torch.Tensor
            ``sersic``: ``hlr`` (arcsec), ``n``, ``g1``, ``g2``; ``bulge-disk``: ``bt``,
            ``hlr_bulge``, ``hlr_disk``, ``g1_bulge``, ``g2_bulge``, ``g1_disk``,
            ``g2_disk``; both: ``dx``, ``dy`` (detector pixels).
        """
        t = theta.unbind(1)
        if self.kind == "sersic":
            g1, g2 = _shear(t[2], t[3])
            out = {"hlr": t[0].exp(), "n": _bounded(t[1], 0.5, 6.0), "g1": g1, "g2": g2}
        else:
            gb1, gb2 = _shear(t[3], t[4])
            gd1, gd2 = _shear(t[5], t[6])
            out = {"bt": torch.sigmoid(t[0]), "hlr_bulge": t[1].exp(), "hlr_disk": t[2].exp(),
                   "g1_bulge": gb1, "g2_bulge": gb2, "g1_disk": gd1, "g2_disk": gd2}
        zero = torch.zeros_like(t[0])
        out["dx"], out["dy"] = (2 * torch.tanh(t[-2]), 2 * torch.tanh(t[-1])) if self.fit_centroid else (zero, zero)
        return out

    def decode(self, theta: torch.Tensor, cond=None) -> torch.Tensor:
        """Unit-flux intrinsic images of parameter vectors.

        Parameters
        ----------
        theta : torch.Tensor
            ``(B, latent_dim)``.
        cond : None
            The model is unconditional (values are an error).

        Returns
        -------
        torch.Tensor
            ``(B, (S+2p)*k, (S+2p)*k)`` on the intrinsic grid (scale ``pixel_scale / k``;
            ``p = pad``), the galaxy centred on detector pixel ``S//2 + p`` plus the centroid
            offset, so that :class:`~galgen.physics.Observation` with ``stamp=S`` crops it
            back to the galaxy at ``S//2``.
        """
        if cond is not None:
            raise GalgenInputError("cond: a parametric model is not conditioned on catalog quantities")
        c = self.config
        k, S = c["oversampling"], c["stamp"] + 2 * c["pad"]
        p = self.physical(theta)
        base = (S // 2 + 0.5) * k - 0.5
        centre = torch.stack([base + k * p["dx"], base + k * p["dy"]], 1)
        kw = dict(size=S * k, scale=c["pixel_scale"] / k, centre=centre, check=False)  # |g| < 0.9 by construction
        if self.kind == "sersic":
            return render_sersic(p["hlr"], p["n"], p["g1"], p["g2"], **kw)
        four, one = torch.full_like(p["bt"], 4.0), torch.ones_like(p["bt"])
        return (render_sersic(p["hlr_bulge"], four, p["g1_bulge"], p["g2_bulge"], flux=p["bt"], **kw)
                + render_sersic(p["hlr_disk"], one, p["g1_disk"], p["g2_disk"], flux=1 - p["bt"], **kw))

    def prior(self, cond=None) -> TransformedDistribution:
        """Weakly informative prior on the unconstrained parameters.

        Log radii ~ N(log 0.8", 1); ``t_n``, ``t_bt`` ~ N(0, 1.5^2); shear parameters
        ~ N(0, 1); centroid parameters ~ N(0, 1): N(0, I) noise through an affine map.

        Parameters
        ----------
        cond : None
            Unused.

        Returns
        -------
        torch.distributions.TransformedDistribution
            ``theta = loc + scale * eps`` with ``eps ~`` :func:`~galgen.models.standard_normal`.
        """
        base = standard_normal(self.latent_dim, device=self.prior_loc.device, dtype=self.prior_loc.dtype)
        return TransformedDistribution(base, [AffineTransform(self.prior_loc, self.prior_scale, event_dim=1)],
                                       validate_args=False)

    def log_prior(self, theta: torch.Tensor) -> torch.Tensor:
        """Deprecated: ``model.prior().log_prob(theta)``.

        Parameters
        ----------
        theta : torch.Tensor
            ``(B, latent_dim)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` nats.
        """
        warnings.warn("SersicModel.log_prior is deprecated; use model.prior().log_prob(theta)", DeprecationWarning,
                      stacklevel=2)
        return self.prior().log_prob(theta)

    def _prior_moments(self, dtype, device):
        sd = torch.ones(self.latent_dim, dtype=dtype, device=device)
        mu = torch.zeros_like(sd)
        for i, name in enumerate(self.param_names):
            if name.startswith("log_hlr"):
                mu[i] = math.log(0.8)
            elif name in ("t_n", "t_bt"):
                sd[i] = 1.5
        return mu, sd

    def sample_prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Deprecated: ``galgen.models.sample_latents(model.prior(), n, generator=generator)``.

        Parameters
        ----------
        n : int
        generator : torch.Generator, optional
        device : torch.device, optional
            Default: the model's.

        Returns
        -------
        torch.Tensor
            ``(n, latent_dim)``.
        """
        warnings.warn("SersicModel.sample_prior is deprecated; use galgen.models.sample_latents(model.prior(), n)",
                      DeprecationWarning, stacklevel=2)
        z = sample_latents(self.prior(), int(n), generator=generator)
        return z if device is None else z.to(device)

    def encode(self, observed: torch.Tensor, cond=None) -> torch.Tensor:
        """Starting parameters from the light-weighted moments of observed stamps.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        cond : None
            Unused.

        Returns
        -------
        torch.Tensor
            ``(B, latent_dim)``: the size from the second moments within ``S/4`` of the
            centre (``hlr ~ 1.18 sigma``), n = 1.5 (B/T = 0.3), round, centred.
        """
        return self.initial_guess(observed)

    def initial_guess(self, observed: torch.Tensor) -> torch.Tensor:
        """Starting parameters from the light-weighted moments of observed stamps.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.

        Returns
        -------
        torch.Tensor
            ``(B, latent_dim)``: the size from the second moments within ``S/4`` of the
            centre (``hlr ~ 1.18 sigma``), n = 1.5 (B/T = 0.3), round, centred.
        """
        x = observed.detach().float().clamp(min=0)
        B, S, _ = x.shape
        y, xx = torch.meshgrid(torch.arange(S, device=x.device) - S // 2.0,
                               torch.arange(S, device=x.device) - S // 2.0, indexing="ij")
        r2 = xx * xx + y * y
        w = x * (r2 < (S / 4) ** 2)
        sig2 = (w * r2).sum((1, 2)) / (2 * w.sum((1, 2)).clamp(min=1e-6))
        hlr = (1.18 * sig2.sqrt() * self.config["pixel_scale"]).clamp(0.1, 10.0)
        theta = torch.zeros(B, self.latent_dim, device=x.device)
        if self.kind == "sersic":
            theta[:, 0] = hlr.log()
            theta[:, 1] = _unbounded(1.5, 0.5, 6.0)
        else:
            theta[:, 0] = math.log(0.3 / 0.7)
            theta[:, 1] = (0.5 * hlr).log()
            theta[:, 2] = hlr.log()
        return theta

    def initial_log_scale(self, observed: torch.Tensor) -> torch.Tensor:
        """Log of the observed total flux (the fitters' starting log flux scale).

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.

        Returns
        -------
        torch.Tensor
            ``(B,)``.
        """
        return observed.detach().float().sum((1, 2)).clamp(min=1.0).log()
