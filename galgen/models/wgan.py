"""Wasserstein GAN with gradient penalty whose critic looks through the physics layer.

The generator draws **intrinsic** (PSF-free, non-negative) galaxy images; the critic
never sees them directly. Each generated image is observed with the PSF, pixel scale
and noise of a real galaxy of the batch (``Observation.observe``: PSF convolution,
pixel integration, crop, a noisy draw), and the critic compares these fake detector
images with the real ones. The generator thus has to produce morphologies that, once
blurred and made noisy like the data, are indistinguishable from it: it learns
deconvolved galaxies from observations with varying PSFs and depths.

Training follows Gulrajani et al. (2017), "Improved Training of Wasserstein GANs":
every step updates the critic on ``D(fake) - D(real) + gp_weight * GP``, with
``GP = E[(||grad D(u_hat)||_2 - 1)^2]`` at random interpolates ``u_hat`` of real and
fake images; every ``n_critic``-th step also updates the generator on ``-D(fake)``;
Adam with ``betas=(0, 0.9)``. The critic uses per-sample GroupNorm, never batch norm
(the penalty is per sample).

Metric: the critic sees a detector image ``x`` (ADU) as ``u = asinh(x / input_scale)``
(linear in units of ``input_scale``, about the sky noise, for faint pixels, and
logarithmic for bright ones), and the penalty holds it 1-Lipschitz in that space, so
``mean D(real) - mean D(fake)`` estimates the Wasserstein-1 distance between real and
generated observations under the Euclidean distance of stretched images (a
dimensionless figure). The stretch matters: in ADU the distances between galaxies
are hundreds of units, a 1-Lipschitz critic would need outputs that large, and
``gp_weight = 10`` would no longer hold it near 1-Lipschitz (the balance of the two
terms puts the slope near ``1 + W / (2 gp_weight)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import GalgenInputError
from .adversarial import AdversarialModel
from .base import Batch, make_optimizer, no_sync
from .networks import Decoder, Encoder

__all__ = ["WGANGP", "Critic"]

class Critic(nn.Module):
    """Convolutional critic of detector images with an optional projection head for conditions.

    ``score(u, c) = w . h + b + (E c) . h``, with ``h = SiLU(Encoder(u))`` the image features
    and ``E`` a linear embedding of the standardised conditions (the projection
    discriminator of Miyato & Koyama 2018, for continuous conditions). The encoder uses
    per-sample GroupNorm only, so each score depends on its own image alone, as the
    gradient penalty requires.

    Parameters
    ----------
    stamp : int
        Detector stamp size.
    width : int, optional
        Channels of the encoder's first level.
    features : int, optional
        Size of the feature vector ``h``.
    cond_dim : int, optional
        Number of conditioning quantities (0: unconditional).

    Examples
    --------
    >>> critic = Critic(32, width=8, features=16, cond_dim=2)
    >>> critic(torch.zeros(3, 32, 32), torch.zeros(3, 2)).shape
    torch.Size([3])
    """

    def __init__(self, stamp: int, width: int = 32, features: int = 128, cond_dim: int = 0):
        super().__init__()
        self.cond_dim = int(cond_dim)
        self.encoder = Encoder(stamp, features, width=width)
        self.out = nn.Linear(features, 1)
        self.embed = nn.Linear(self.cond_dim, features, bias=False) if self.cond_dim else None

    def forward(self, u: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Score images (already transformed to the critic's input space).

        Parameters
        ----------
        u : torch.Tensor
            ``(B, S, S)`` critic inputs.
        cond : torch.Tensor, optional
            ``(B, cond_dim)`` standardised conditions (required when ``cond_dim > 0``).

        Returns
        -------
        torch.Tensor
            ``(B,)`` scores.
        """
        h = nn.functional.silu(self.encoder(u))
        score = self.out(h)[:, 0]
        if self.embed is not None:
            if cond is None:
                raise GalgenInputError("cond: this critic needs conditions")
            score = score + (self.embed(cond.to(h.dtype)) * h).sum(dim=1)
        return score


class WGANGP(AdversarialModel):
    """WGAN-GP whose generator makes intrinsic galaxies and whose critic sees them observed.

    Parameters
    ----------
    stamp : int
        Detector stamp size of the observations.
    latent_dim : int, optional
        Size of the latent vector ``z ~ N(0, I)``.
    oversampling : int, optional
        Intrinsic pixels per detector pixel of the generated images (must match the
        data's ``Observation``).
    width : int, optional
        Base channel count of the generator (a :class:`Decoder`) and of the critic.
    input_scale : float, optional
        Detector images enter the critic as ``asinh(x / input_scale)``; use about the
        sky noise rms (ADU). The gradient penalty and the Wasserstein estimate are in
        that stretched space.
    flux_scale : float, optional
        Initial output scale of the generator (ADU per intrinsic pixel).
    gp_weight : float, optional
        Weight ``lambda`` of the gradient penalty (10 in the paper).
    n_critic : int, optional
        Critic updates per generator update (5 in the paper).
    conditions : sequence of str, optional
        Catalog columns the generator and critic are conditioned on (the generator
        gets the standardised values appended to ``z``; the critic has a projection
        head).

    Notes
    -----
    For a GAN there is no likelihood to validate: the validation "loss" is the
    critic's Wasserstein estimate on held-out galaxies (lower is better, but it is
    only comparable between epochs of one run, as the critic changes).

    Examples
    --------
    >>> gan = WGANGP(32, latent_dim=8, width=8)
    >>> gan.sample(2, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 32, 32])
    """

    kind = "wgan-gp"

    def __init__(self, stamp: int, latent_dim: int = 64, oversampling: int = 1, width: int = 32,
                 input_scale: float = 1.0, flux_scale: float = 1.0, gp_weight: float = 10.0,
                 n_critic: int = 5, conditions=()):
        super().__init__(conditions)
        if int(latent_dim) < 1:
            raise GalgenInputError(f"latent_dim: must be >= 1, got {latent_dim!r}")
        if int(oversampling) < 1:
            raise GalgenInputError(f"oversampling: must be >= 1, got {oversampling!r}")
        if int(width) < 1:
            raise GalgenInputError(f"width: must be >= 1, got {width!r}")
        if not float(input_scale) > 0:
            raise GalgenInputError(f"input_scale: must be > 0, got {input_scale!r}")
        if not float(gp_weight) >= 0:
            raise GalgenInputError(f"gp_weight: must be >= 0, got {gp_weight!r}")
        if int(n_critic) < 1:
            raise GalgenInputError(f"n_critic: must be >= 1, got {n_critic!r}")
        self.config = dict(kind=self.kind, stamp=int(stamp), latent_dim=int(latent_dim),
                           oversampling=int(oversampling), width=int(width), input_scale=float(input_scale),
                           flux_scale=float(flux_scale), gp_weight=float(gp_weight), n_critic=int(n_critic),
                           conditions=list(self.conditions))
        self.stamp, self.latent_dim, self.oversampling = int(stamp), int(latent_dim), int(oversampling)
        self.input_scale, self.gp_weight, self.n_critic = float(input_scale), float(gp_weight), int(n_critic)
        self.generator = Decoder(self.stamp * self.oversampling, self.latent_dim + self.cond_dim, width=int(width),
                                 flux_scale=flux_scale)
        self.critic = Critic(self.stamp, width=int(width), features=min(8 * int(width), 256),
                             cond_dim=self.cond_dim)

    # -- critic ----------------------------------------------------------------------------

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, cond=None, mask=None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean[(||grad D(u_hat)||_2 - 1)^2]`` at random interpolates of real and fake images.

        ``u_hat = e * u_real + (1 - e) * u_fake``, ``e ~ U(0, 1)`` per image, between
        the critic inputs (:meth:`critic_input`) of the real and fake detector images; the
        gradient is taken with ``create_graph=True``, so the penalty back-propagates to
        the critic's parameters. Neither image set receives gradients.

        Parameters
        ----------
        real, fake : torch.Tensor
            ``(B, S, S)`` detector images (ADU).
        cond : torch.Tensor, optional
            Raw conditioning values.
        mask : torch.Tensor, optional
            Excluded pixels (True).
        generator : torch.Generator, optional
            Randomness of ``e``.

        Returns
        -------
        torch.Tensor
            Scalar, float32.
        """
        if not isinstance(real, torch.Tensor) or not isinstance(fake, torch.Tensor) or real.shape != fake.shape:
            raise GalgenInputError("real, fake: expected two (B, S, S) tensors of the same shape")
        with torch.no_grad():
            u_real, u_fake = self.critic_input(real, mask), self.critic_input(fake, mask)
        return self._gradient_penalty(u_real, u_fake, self.condition_features(cond, real.shape[0]), generator)

    def _gradient_penalty(self, u_real, u_fake, feats, generator=None):
        device = u_real.device if generator is None else generator.device
        e = torch.rand(u_real.shape[0], 1, 1, generator=generator, device=device, dtype=u_real.dtype)
        e = e.to(u_real.device)
        u_hat = (e * u_real.detach() + (1 - e) * u_fake.detach()).requires_grad_(True)
        with torch.enable_grad():
            score = self.critic(u_hat, feats)
            (grad,) = torch.autograd.grad(score.float().sum(), u_hat, create_graph=True)
        # sqrt(. + tiny): a finite double backward where the gradient vanishes
        norm = torch.sqrt(grad.float().square().flatten(1).sum(dim=1) + 1e-12)
        return (norm - 1).square().mean()

    # -- training ------------------------------------------------------------------------

    def make_optimizers(self, lr: float = 1e-4, betas=(0.0, 0.9), **options) -> dict:
        """Adam optimisers of the critic and the generator (the paper's defaults).

        Parameters
        ----------
        lr : float, optional
            Learning rate of both.
        betas : tuple of float, optional
            Adam betas.
        **options
            Passed to :class:`torch.optim.Adam` (e.g. ``weight_decay``).

        Returns
        -------
        dict
            ``{"critic": Adam, "generator": Adam}``.
        """
        betas = tuple(float(b) for b in betas)
        name = options.pop("name", "adam")
        if name == "sgd":
            raise GalgenInputError("optimizer.name: the WGAN-GP trains with Adam (or AdamW), not SGD")
        return {"critic": make_optimizer(self.critic.parameters(), lr, name, betas=betas, **options),
                "generator": make_optimizer(self.generator.parameters(), lr, name, betas=betas, **options)}

    def training_step(self, batch: Batch, optimizers: dict, step: int, sync=no_sync) -> dict:
        """One critic update, and one generator update every ``n_critic`` steps.

        The critic minimises ``D(fake) - D(real) + gp_weight * GP`` with fakes generated
        without gradient and observed with the batch's PSFs and noise (and, when
        conditioned, the batch's conditions). When ``(step + 1) % n_critic == 0`` the
        generator then minimises ``-D(fake)`` on fresh fakes, with the critic's
        parameters frozen (their gradients are neither computed nor changed).

        Parameters
        ----------
        batch : Batch
        optimizers : dict
            ``{"critic": ..., "generator": ...}`` from :meth:`make_optimizers`.
        step : int
            Global step (0-based).
        sync : callable, optional
            Gradient synchronisation, called on the critic's and then on the generator's
            parameters before their optimiser steps.

        Returns
        -------
        dict of str to torch.Tensor
            Detached scalars: ``loss`` (the critic's loss), ``wasserstein``
            (``mean D(real) - mean D(fake)``), ``gradient_penalty`` and, on generator
            steps only, ``generator_loss``.
        """
        opt_c, opt_g = optimizers["critic"], optimizers["generator"]
        # a caller may keep one autocast region over several steps: drop the low-precision
        # copies of weights that autocast cached before the last optimiser steps
        torch.clear_autocast_cache()
        n = len(batch)
        obs = batch.observation
        feats = self.condition_features(batch.cond, n)  # checks cond before any update
        both = None if feats is None else torch.cat([feats, feats])
        mask = getattr(obs.noise, "mask", None)

        # critic update: fakes made without gradient, observed like the batch's galaxies
        with torch.no_grad():
            _, fake = self._observe_fakes(obs, feats, n, raw=True)
            u_real, u_fake = self.critic_input(batch.observed, mask), self.critic_input(fake, mask)
        opt_c.zero_grad(set_to_none=True)
        scores = self.critic(torch.cat([u_real, u_fake]), both).float()
        wasserstein = scores[:n].mean() - scores[n:].mean()
        gp = self._gradient_penalty(u_real, u_fake, feats)
        loss = -wasserstein + self.gp_weight * gp
        loss.backward()
        critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        sync(critic_params)
        opt_c.step()
        metrics = {"loss": loss.detach(), "wasserstein": wasserstein.detach(), "gradient_penalty": gp.detach()}

        # generator update through the physics layer, the critic frozen
        if (int(step) + 1) % self.n_critic == 0:
            metrics.update(self._generator_update(obs, feats, n, mask, opt_g, critic_params, sync,
                                                  lambda d_fake: -d_fake.mean()))
        return metrics

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict:
        """Per-galaxy critic scores of held-out galaxies and of fakes observed like them.

        The fakes are :meth:`validation_fakes` (the same latent vectors and noise at every
        validation of an unshuffled set, so the figures are comparable across epochs).

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        dict
            Each ``(B,)``: ``critic_real``, ``critic_fake``, ``wasserstein``
            (``critic_real - critic_fake``; its mean is the Wasserstein estimate) and
            ``loss``, equal to ``wasserstein``: for a WGAN the validation loss is the
            critic's Wasserstein estimate on held-out data. ``observed_fakes``: the
            ``(B, S, S)`` fakes as observed, whose flux, size and ``|e|`` the trainer
            compares with the real ones' (KS distances).
        """
        n = len(batch)
        feats = self.condition_features(batch.cond, n)
        mask = getattr(batch.observation.noise, "mask", None)
        _, fake = self.validation_fakes(batch)
        u = torch.cat([self.critic_input(batch.observed, mask), self.critic_input(fake, mask)])
        scores = self.critic(u, None if feats is None else torch.cat([feats, feats])).float()
        d_real, d_fake = scores[:n], scores[n:]
        w = d_real - d_fake
        return {"loss": w, "wasserstein": w, "critic_real": d_real, "critic_fake": d_fake,
                "observed_fakes": fake}
