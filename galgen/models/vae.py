"""Variational auto-encoder whose likelihood is the physics layer, with a latent flow prior.

The encoder gives a Gaussian q(z | x[, c]) from an observed cutout; the decoder gives the
intrinsic (PSF-free) galaxy; p(x | z) is :meth:`galgen.physics.Observation.log_likelihood`
with the galaxy's own PSF, variance and mask. Training maximises the ELBO

    E_q[log p(x | z)] - beta * KL(q(z | x) || N(0, I)),

with beta ramped up from 0 over ``warmup_steps`` (KL warm-up). After training, a
normalizing flow (:class:`LatentFlowPrior`) is fitted to the aggregate posterior, and
:meth:`VAE.sample` draws from it (or from N(0, I) for comparison).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import GalgenInputError
from .base import Batch, GenerativeModel, good_pixels, no_sync
from .networks import Decoder, Encoder
from .prior import LatentFlowPrior

__all__ = ["VAE"]

_LOGVAR_RANGE = (-12.0, 6.0)


class VAE(GenerativeModel):
    """PSF-aware VAE of galaxy images.

    Parameters
    ----------
    stamp : int
        Detector stamp size.
    latent_dim : int, optional
    oversampling : int, optional
        Intrinsic pixels per detector pixel of the decoded image.
    width : int, optional
        Base channel count.
    input_scale : float, optional
        Observations enter the encoder as ``asinh(x / input_scale)`` (about the sky rms).
    flux_scale : float, optional
        Initial decoder output scale (ADU per intrinsic pixel).
    beta : float, optional
        Weight of the KL term after warm-up.
    warmup_steps : int, optional
        Steps of the linear KL warm-up (0: none).
    conditions : sequence of str, optional
        Catalog columns the encoder, decoder and flow prior are conditioned on.
    prior : dict, optional
        :class:`LatentFlowPrior` options (``kind``, ``transforms``, ``hidden``).

    Examples
    --------
    >>> vae = VAE(32, latent_dim=4, width=8)
    >>> vae.sample(2, prior="normal", generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 32, 32])
    """

    kind = "vae"

    def __init__(self, stamp: int, latent_dim: int = 16, oversampling: int = 1, width: int = 32,
                 input_scale: float = 1.0, flux_scale: float = 1.0, beta: float = 1.0, warmup_steps: int = 0,
                 conditions=(), prior: dict | None = None):
        super().__init__(conditions)
        if latent_dim < 1 or oversampling < 1 or not input_scale > 0 or beta < 0 or warmup_steps < 0:
            raise GalgenInputError("VAE: latent_dim, oversampling >= 1; input_scale > 0; beta, warmup_steps >= 0")
        prior = dict(prior or {"kind": "nsf", "transforms": 3, "hidden": [128, 128]})
        self.config = dict(kind="vae", stamp=int(stamp), latent_dim=int(latent_dim), oversampling=int(oversampling),
                           width=int(width), input_scale=float(input_scale), flux_scale=float(flux_scale),
                           beta=float(beta), warmup_steps=int(warmup_steps), conditions=list(self.conditions),
                           prior=prior)
        self.latent_dim = int(latent_dim)
        self.input_scale = float(input_scale)
        hidden = max(64, 4 * latent_dim)
        self.encoder = Encoder(stamp, hidden, width=width)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden + self.cond_dim, 2 * latent_dim))
        self.decoder = Decoder(stamp * oversampling, latent_dim + self.cond_dim, width=width, flux_scale=flux_scale)
        try:
            self.prior = LatentFlowPrior(latent_dim, self.cond_dim, **prior)
        except TypeError as exc:
            raise GalgenInputError(f"prior: bad option ({exc})") from None

    # -- encoder / decoder ----------------------------------------------------------------
    def encode(self, observed: torch.Tensor, cond=None):
        """Posterior mean and log-variance of q(z | x[, c]).

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        cond : torch.Tensor, optional
            Raw conditions ``(B, C)``.

        Returns
        -------
        mu, logvar : torch.Tensor
            ``(B, latent_dim)`` each.
        """
        h = self.encoder(torch.asinh(observed / self.input_scale))
        c = self.condition_features(cond, len(observed))
        if c is not None:
            h = torch.cat([h, c.to(h.dtype)], 1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    def decode(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """Intrinsic images of latent codes.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)``.
        cond : torch.Tensor, optional
            Raw conditions.

        Returns
        -------
        torch.Tensor
            ``(B, S*k, S*k)``, non-negative.
        """
        c = self.condition_features(cond, len(z))
        if c is not None:
            z = torch.cat([z, c.to(z.dtype)], 1)
        return self.decoder(z)

    def reconstruct(self, observed: torch.Tensor, cond=None) -> torch.Tensor:
        """Decoded posterior mean: the VAE's intrinsic galaxy for observed cutouts.

        Parameters
        ----------
        observed : torch.Tensor
        cond : torch.Tensor, optional

        Returns
        -------
        torch.Tensor
        """
        return self.decode(self.encode(observed, cond)[0], cond)

    # -- objective ------------------------------------------------------------------------
    def beta_at(self, step: int) -> float:
        """KL weight at a training step (linear warm-up to ``beta``).

        Parameters
        ----------
        step : int

        Returns
        -------
        float
        """
        w = self.config["warmup_steps"]
        return self.config["beta"] * (1.0 if w == 0 else min(1.0, (step + 1) / w))

    def elbo(self, batch: Batch, generator: torch.Generator | None = None) -> dict:
        """ELBO terms per galaxy (one reparameterised sample of z).

        Parameters
        ----------
        batch : Batch
        generator : torch.Generator, optional

        Returns
        -------
        dict of torch.Tensor
            Each ``(B,)``: ``nll`` (-log p(x|z), nats), ``kl`` (KL(q||N(0,I)), nats),
            ``elbo`` (= -nll - kl), ``bits_per_pixel`` (= -elbo / (good pixels * ln 2);
            a density of continuous data, so it can be negative).
        """
        mu, logvar = self.encode(batch.observed, batch.cond)
        mu, logvar = mu.float(), logvar.float()
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        intrinsic = self.decode(z, batch.cond).float()
        nll = -batch.observation.log_likelihood(intrinsic, batch.observed)
        kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(1)
        elbo = -nll - kl
        bpp = -elbo / (good_pixels(batch.observed, batch.observation) * math.log(2))
        return {"nll": nll, "kl": kl, "elbo": elbo, "bits_per_pixel": bpp}

    def training_step(self, batch: Batch, optimizers: dict, step: int, sync=no_sync) -> dict:
        """One step on ``mean(nll + beta_at(step) * kl)`` (see :meth:`GenerativeModel.training_step`).

        Parameters
        ----------
        batch : Batch
        optimizers : dict
        step : int
        sync : callable, optional

        Returns
        -------
        dict
            ``loss``, ``elbo``, ``nll``, ``kl``, ``beta``, ``bits_per_pixel`` (batch means).
        """
        opt = optimizers["model"]
        opt.zero_grad(set_to_none=True)
        t = self.elbo(batch)
        beta = self.beta_at(step)
        loss = (t["nll"] + beta * t["kl"]).mean()
        loss.backward()
        sync(self.parameters())
        opt.step()
        out = {k: v.detach().mean() for k, v in t.items()}
        out.update(loss=loss.detach(), beta=torch.tensor(beta))
        return out

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict:
        """Per-galaxy ``loss`` (-ELBO with beta = 1), ELBO terms and ``chi2_pixel``.

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        dict of torch.Tensor
        """
        t = self.elbo(batch)
        t["loss"] = -t["elbo"]
        t["chi2_pixel"] = self.anomaly_score(batch.observed, batch.observation, batch.cond)
        return t

    # -- prior ----------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate_posterior(self, batches, samples_per_galaxy: int = 4):
        """Codes drawn from q(z | x) over a data set: samples of the aggregate posterior.

        Parameters
        ----------
        batches : iterable of Batch
        samples_per_galaxy : int, optional

        Returns
        -------
        codes : torch.Tensor
            ``(N * samples_per_galaxy, latent_dim)``.
        cond : torch.Tensor or None
            The matching raw conditions.
        """
        self.eval()
        codes, conds = [], []
        for b in batches:
            mu, logvar = self.encode(b.observed, b.cond)
            std = (0.5 * logvar.float()).exp()
            for _ in range(samples_per_galaxy):
                codes.append((mu.float() + torch.randn_like(std) * std).cpu())
                if b.cond is not None:
                    conds.append(b.cond.float().cpu())
        return torch.cat(codes), (torch.cat(conds) if conds else None)

    def fit_prior(self, codes: torch.Tensor, cond=None, **options) -> dict:
        """Fit the flow prior to aggregate-posterior codes.

        Parameters
        ----------
        codes : torch.Tensor
            From :meth:`aggregate_posterior`.
        cond : torch.Tensor, optional
            Raw conditions of the codes.
        **options
            Passed to :meth:`LatentFlowPrior.fit` (``epochs``, ``lr``, ``generator``, ...).

        Returns
        -------
        dict
            The fit history.
        """
        dev = self.prior.z_mean.device
        ctx = self.condition_features(None if cond is None else cond.to(dev), len(codes))
        with torch.enable_grad():
            return self.prior.fit(codes.to(dev), ctx, **options)

    def _prior_name(self, prior):
        fitted = bool(self.prior.fitted)
        prior = prior or ("flow" if fitted else "normal")
        if prior not in ("flow", "normal"):
            raise GalgenInputError(f"prior: 'flow' or 'normal', got {prior!r}")
        if prior == "flow" and not fitted:
            raise GalgenInputError("prior: the flow prior is not fitted yet (train to the end, or call "
                                   "fit_prior); use prior='normal' for N(0, I)")
        return prior

    def latent_log_prob(self, z: torch.Tensor, cond=None, prior: str | None = None) -> torch.Tensor:
        """Log prior density of latent codes.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)``.
        cond : torch.Tensor, optional
            Raw conditions.
        prior : {"flow", "normal"}, optional
            Default: the flow when fitted.

        Returns
        -------
        torch.Tensor
            ``(B,)`` nats.
        """
        if self._prior_name(prior) == "flow":
            return self.prior.log_prob(z, self.condition_features(cond, len(z)))
        return -0.5 * (z**2).sum(1) - 0.5 * self.latent_dim * math.log(2 * math.pi)

    @torch.no_grad()
    def sample(self, n: int, cond=None, generator: torch.Generator | None = None, prior: str | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Draw intrinsic galaxies.

        Parameters
        ----------
        n : int
        cond : torch.Tensor, optional
            Raw conditions ``(n, C)`` or ``(C,)``.
        generator : torch.Generator, optional
        prior : {"flow", "normal"}, optional
            Default: the flow when fitted, else N(0, I).
        temperature : float, optional
            Scales N(0, I) draws (``normal`` prior only).

        Returns
        -------
        torch.Tensor
            ``(n, S*k, S*k)``.
        """
        dev = self.prior.z_mean.device
        c = self.condition_features(cond, n)
        if self._prior_name(prior) == "flow":
            z = self.prior.sample(n, c, generator=generator)
        else:
            z = temperature * torch.randn(n, self.latent_dim, generator=generator, device=dev)
        if c is not None:
            z = torch.cat([z, c], 1)
        return self.decoder(z)
