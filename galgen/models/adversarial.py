"""What every galgen GAN shares: a generator of intrinsic galaxies, observed through the physics layer.

A GAN's generator draws **intrinsic** (PSF-free, non-negative) galaxy images and its
critic (discriminator) never sees them directly: each generated image is observed with
the PSF, pixel scale and noise of a real galaxy of the batch (``Observation.observe``:
PSF convolution, pixel integration, crop, a noisy draw), and the critic compares these
fake detector images with the real ones, stretched as ``asinh(x / input_scale)``. This
module holds that common part (:class:`AdversarialModel`) and what every GAN's
validation returns: fakes observed like a fixed held-out set (the same ones every
time), from which the trainer measures the Kolmogorov-Smirnov distances between the
flux, HSM size and ellipticity of generated and real *observed* galaxies
(:func:`galgen.evaluation.observed_statistics`), which tell within minutes whether a
run is learning, and a grid of real and generated stamps for every validation.
The losses live in the subclasses: :class:`galgen.models.WGANGP` (Wasserstein with
gradient penalty) and :class:`galgen.models.GAN` (non-saturating or hinge loss,
spectral-norm critic, flux/shape generator head, EMA, lazy R1).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import GalgenInputError
from ..physics import source_noise, split_variance
from .base import Batch, GenerativeModel, sample_latents, standard_normal

__all__ = ["AdversarialModel"]

_VALIDATION_SEED = 20170331  # fixed seed of the validation fakes (Gulrajani et al., arXiv date)


class AdversarialModel(GenerativeModel):
    """Base class of the GANs: generation, observation of fakes, the critic's input, validation.

    Subclasses build ``self.generator`` (latent + conditions -> intrinsic image) and
    ``self.critic`` (critic input, conditions -> score), set ``stamp``,
    ``latent_dim``, ``oversampling`` and ``input_scale``, and implement the losses
    (:meth:`make_optimizers`, :meth:`training_step`, :meth:`validation_step`).

    Parameters
    ----------
    conditions : sequence of str, optional
        Catalog columns the model is conditioned on.
    """

    stamp: int = 0
    oversampling: int = 1
    input_scale: float = 1.0
    #: How fakes observed like a real batch get their noise: ``"variance-map"`` draws it
    #: from the real galaxies' variance maps; ``"own"`` splits those maps into a background
    #: and a source term (:func:`galgen.physics.split_variance`) and gives each fake the
    #: Poisson noise of its own light (:meth:`fake_observation`).
    fake_noise: str = "variance-map"

    # -- generator -----------------------------------------------------------------------

    def generate(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """Intrinsic images of latent vectors.

        Parameters
        ----------
        z : torch.Tensor
            ``(n, latent_dim)``.
        cond : torch.Tensor, optional
            Raw conditioning values, ``(n, C)`` or ``(C,)`` (required for a conditioned model).

        Returns
        -------
        torch.Tensor
            ``(n, S*k, S*k)`` non-negative intrinsic images.
        """
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.latent_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise GalgenInputError(f"z: expected shape (n, {self.latent_dim}), got {shape}")
        return self._generate(z, self.condition_features(cond, z.shape[0]))

    def decode(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """Intrinsic images of latent vectors (the latent-model contract's name for :meth:`generate`).

        Parameters
        ----------
        z : torch.Tensor
            ``(n, latent_dim)``.
        cond : torch.Tensor, optional
            Raw conditioning values, ``(n, C)`` or ``(C,)``.

        Returns
        -------
        torch.Tensor
            ``(n, S*k, S*k)`` non-negative intrinsic images.
        """
        return self.generate(z, cond)

    def prior(self, cond=None):
        """The generator's latent distribution, N(0, I) (whatever the conditions).

        Parameters
        ----------
        cond : torch.Tensor, optional
            Unused: the conditions enter the generator, not the latent distribution.

        Returns
        -------
        galgen.models.StandardNormal
        """
        like = self.cond_mean  # a buffer: follows the model's device and dtype
        return standard_normal(self.latent_dim, device=like.device, dtype=like.dtype)

    @property
    def sampling_generator(self) -> nn.Module:
        """The generator network that :meth:`sample`, :meth:`decode` and validation use.

        The trained ``generator`` here; a model that keeps a weight average of its
        generator (:class:`galgen.models.GAN`) returns the average.
        """
        return self.generator

    def _generate(self, z, feats, raw: bool = False):
        if feats is not None:
            z = torch.cat([z, feats.to(device=z.device, dtype=z.dtype)], dim=1)
        return (self.generator if raw else self.sampling_generator)(z)

    def _latent(self, n, generator=None):
        return sample_latents(self.prior(), n, generator=generator)

    @torch.no_grad()
    def sample(self, n: int, cond=None, generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Draw intrinsic (PSF-free) galaxy images, ``z ~ N(0, I)``.

        Parameters
        ----------
        n : int
            Number of galaxies.
        cond : torch.Tensor, optional
            Raw conditioning values, ``(n, C)`` or ``(C,)``; a conditional model called
            without them draws them from its training set's (:meth:`draw_conditions`).
        generator : torch.Generator, optional
            Source of the latent vectors (same seed, same galaxies).
        **options
            None accepted.

        Returns
        -------
        torch.Tensor
            ``(n, S*k, S*k)`` non-negative intrinsic images.
        """
        if options:
            raise GalgenInputError(f"options: a {self.kind} model takes no sampling options, got {sorted(options)}")
        if int(n) < 1:
            raise GalgenInputError(f"n: must be >= 1, got {n!r}")
        if cond is None and self.cond_dim:
            cond = self.draw_conditions(int(n), generator)
        feats = self.condition_features(cond, int(n))
        return self._generate(self._latent(int(n), generator), feats)

    def observe_fakes(self, observation, n: int | None = None, cond=None,
                      generator: torch.Generator | None = None):
        """Generate galaxies and observe them like a batch (PSF, pixel integration, noise).

        Differentiable with respect to the generator: the noisy image is the noiseless
        one plus a noise draw that enters as a constant (reparameterised), so the
        critic's gradients reach the generator through the physics layer.

        Parameters
        ----------
        observation : galgen.physics.Observation
            PSFs and noise; with per-galaxy PSFs or variance maps, galaxy ``i`` is
            observed like galaxy ``i`` of the batch.
        n : int, optional
            Number of galaxies; default the observation's batch size.
        cond : torch.Tensor, optional
            Raw conditioning values, ``(n, C)`` or ``(C,)``.
        generator : torch.Generator, optional
            Randomness of the latent vectors and of the noise (on the model's device).

        Returns
        -------
        intrinsic : torch.Tensor
            ``(n, S*k, S*k)`` generated images.
        observed : torch.Tensor
            ``(n, S, S)`` noisy detector images (float32, or the PSF's dtype if wider).
        """
        n = self._batch_size(observation) if n is None else int(n)
        if n < 1:
            raise GalgenInputError(f"n: must be >= 1, got {n!r}")
        return self._observe_fakes(observation, self.condition_features(cond, n), n, generator)

    def _observe_fakes(self, observation, feats, n, generator=None, raw: bool = False):
        _, intrinsic, _, noisy = self._fakes(observation, feats, n, generator, raw)
        return intrinsic, noisy

    def _fakes(self, observation, feats, n, generator=None, raw: bool = False):
        """Latent vectors, intrinsic, noiseless and noisy detector images of ``n`` fakes."""
        z = self._latent(n, generator)
        intrinsic = self._generate(z, feats, raw=raw)
        dtype = torch.promote_types(torch.float32, observation.psf.dtype)
        clean, noisy = observation.observe(intrinsic.to(dtype), generator=generator)
        return z, intrinsic, clean, noisy

    def fake_observation(self, batch: Batch):
        """The observation that fakes made for a real batch go through: its PSFs, and its noise.

        With ``fake_noise = "variance-map"`` the batch's own observation. With ``"own"`` the
        same PSFs and mask, and noise of the fakes' own light over each galaxy's
        background (:func:`galgen.physics.split_variance`, :func:`galgen.physics.source_noise`):
        a variance map that holds its galaxy's Poisson term would otherwise give a fake
        the real galaxy's shape in its noise, which the critic can tell apart.

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        galgen.physics.Observation
        """
        obs = batch.observation
        var = getattr(obs.noise, "variance_map", None)
        if self.fake_noise != "own" or var is None or var.ndim != 3:
            return obs
        mask = getattr(obs.noise, "mask", None)
        background, inverse_gain = split_variance(var, batch.observed, mask)
        if not bool(inverse_gain > 0):  # maps of the background alone: nothing of the galaxies in them
            return obs
        fake = copy.copy(obs)
        fake.noise = source_noise(background, inverse_gain, mask)
        return fake

    @staticmethod
    def _batch_size(observation):
        psf = getattr(observation, "psf", None)
        noise = getattr(observation, "noise", None)
        if psf is not None and psf.ndim == 3:
            return psf.shape[0]
        var = getattr(noise, "variance_map", None)
        if var is not None and var.ndim == 3:
            return var.shape[0]
        raise GalgenInputError("n: the observation's PSF and noise are shared; give the number of galaxies")

    # -- critic --------------------------------------------------------------------------

    def critic_input(self, observed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Detector images as the critic sees them: ``asinh(x / input_scale)``, excluded pixels 0.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)`` detector images (ADU).
        mask : torch.Tensor, optional
            ``(B, S, S)`` or ``(S, S)`` boolean, True = pixel excluded.

        Returns
        -------
        torch.Tensor
            ``(B, S, S)``, on the model's dtype.
        """
        if not isinstance(observed, torch.Tensor) or observed.ndim != 3 or observed.shape[-1] != self.stamp \
                or observed.shape[-2] != self.stamp:
            shape = tuple(observed.shape) if isinstance(observed, torch.Tensor) else type(observed).__name__
            raise GalgenInputError(f"observed: expected shape (B, {self.stamp}, {self.stamp}), got {shape}")
        x = _masked(observed, mask).to(self.cond_mean.dtype)  # the model's dtype (a buffer)
        return torch.asinh(x / self.input_scale)

    def critic_score(self, observed: torch.Tensor, cond=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The critic's score of detector images (higher = more like the data).

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)`` detector images (ADU).
        cond : torch.Tensor, optional
            Raw conditioning values, ``(B, C)`` or ``(C,)``.
        mask : torch.Tensor, optional
            ``(B, S, S)`` or ``(S, S)`` boolean, True = pixel excluded (set to 0).

        Returns
        -------
        torch.Tensor
            ``(B,)`` float32 scores.
        """
        u = self.critic_input(observed, mask)
        return self.critic(u, self.condition_features(cond, u.shape[0])).float()

    def critic_terms(self, u: torch.Tensor, feats=None) -> torch.Tensor:
        """The critic's scores as its loss sees them (one critic: ``(B,)``).

        Parameters
        ----------
        u : torch.Tensor
            ``(B, S, S)`` critic inputs (:meth:`critic_input`).
        feats : torch.Tensor, optional
            Standardised conditions.

        Returns
        -------
        torch.Tensor
            ``(B,)``, or ``(B, k)`` for a model that trains ``k`` critics on their own losses.
        """
        return self.critic(u, feats)

    def _generator_update(self, obs, feats, n, mask, opt_g, critic_params, sync, loss_fn, penalty=None) -> dict:
        """One generator step on fresh fakes observed like the batch, the critic frozen.

        The critic's parameters neither receive nor change gradients (frozen weights also
        bypass autocast's cast cache); ``loss_fn`` maps the critic's float32 scores of
        the fakes to the generator's loss. ``penalty(z, feats, observation, noiseless, observed)``
        (the fakes noise-free and with their noise), if given, returns a ``(loss, metrics)``
        pair added to it. Returns the detached
        metrics: ``generator_loss`` (the adversarial part) and the penalty's.
        """
        opt_g.zero_grad(set_to_none=True)
        for p in critic_params:
            p.requires_grad_(False)
        try:
            z, _, clean, fake = self._fakes(obs, feats, n, raw=True)
            g_loss = loss_fn(self.critic_terms(self.critic_input(fake, mask), feats).float())
            metrics = {"generator_loss": g_loss.detach()}
            if penalty is not None:
                extra, more = penalty(z, feats, obs, clean, fake)
                g_loss = g_loss + extra
                metrics.update(more)
            g_loss.backward()
        finally:
            for p in critic_params:
                p.requires_grad_(True)
        sync([p for p in self.generator.parameters() if p.requires_grad])
        opt_g.step()
        return metrics

    # -- validation diagnostics -------------------------------------------------------------

    def validation_fakes(self, batch: Batch):
        """Fakes observed like a held-out batch, the same ones at every validation.

        One fake per galaxy, with its PSF, noise and conditions, from
        :attr:`sampling_generator` and a private random generator seeded from the batch's
        ``index`` (or a constant): an unshuffled validation set sees the same latent
        vectors and noise every time, so the figures are comparable across validations;
        the global random state is left untouched.

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        intrinsic : torch.Tensor
            ``(B, S*k, S*k)``.
        observed : torch.Tensor
            ``(B, S, S)`` noisy detector images.
        """
        n = len(batch)
        feats = self.condition_features(batch.cond, n)
        gen = torch.Generator(device=batch.observed.device)
        gen.manual_seed(_validation_seed(batch.index))
        return self._observe_fakes(self.fake_observation(batch), feats, n, generator=gen)

    def validation_panels(self, batch: Batch, n: int = 8) -> tuple[dict, np.ndarray]:
        """Stamps for the validation sample grid: real, and fakes observed like them.

        Parameters
        ----------
        batch : Batch
            Held-out galaxies (the first ``n`` are shown).
        n : int, optional

        Returns
        -------
        panels : dict of numpy.ndarray
            ``"real"`` and ``"generated"``: ``(n, S, S)`` observed stamps (column ``j`` of
            both shares the PSF and noise of real galaxy ``j``).
        noise : numpy.ndarray
            ``(n,)`` sky-noise sigma per column.
        """
        k = min(int(n), len(batch))
        _, fake = self.validation_fakes(batch)
        var = batch.observation.noise.variance_map if getattr(batch.observation.noise, "variance_map", None) \
            is not None else None
        if var is not None and var.ndim == 3:
            noise = var[:k].flatten(1).median(1).values.sqrt()
        else:
            noise = torch.full((k,), self.input_scale)
        return ({"real": batch.observed[:k].detach().float().cpu().numpy(),
                 "generated": fake[:k].detach().float().cpu().numpy()},
                noise.detach().float().cpu().numpy())


def _masked(x, mask):
    """Zero excluded pixels, so that neither real nor fake images carry information there."""
    if mask is None:
        return x
    mask = torch.as_tensor(mask, device=x.device)
    mask = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _validation_seed(index) -> int:
    """A seed determined by the batch's galaxy indices (a constant without them)."""
    seed = _VALIDATION_SEED
    if index is not None:
        for i in torch.as_tensor(index).reshape(-1).tolist():
            seed = (seed * 1000003 + int(i) + 1) % (2**61 - 1)
    return seed
