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
import numbers
import warnings

import torch
from torch import nn
from torch.distributions import Independent, Normal

from ..errors import GalgenInputError
from .base import Batch, GenerativeModel, good_pixels, no_sync, sample_latents, standard_normal
from .networks import (COMPANION_COORDINATES, LATENT_GATE_GAIN, SYMMETRY_GATES, CompanionLocator, Decoder, Encoder,
                       FluxShapeGenerator, SeedCoordinates, log_flux_start)
from .prior import CodeMixturePrior, LatentFlowPrior

__all__ = ["VAE", "GaussianPosterior", "reseed_bulge_disk", "add_symmetry_gate", "add_latents", "add_companion",
           "add_bulge_index", "companion_codes", "warm_start_companion"]

#: Range of the encoder's log-variance: sigma from 0.0025 to 20 (N(0, I) has sigma 1).
LOGVAR_RANGE = (-12.0, 6.0)
# A latent gate's weight in the prior's codes stays within [r, 1 - r]: coordinates within +-2.
_GATE_RANGE = 1.0 / (1.0 + math.exp(2.0 * LATENT_GATE_GAIN))
#: Decoders of the :class:`VAE` (its ``decoder`` option).
VAE_DECODERS = ("conv", "flux-shape")
_PRIOR_DEFAULTS = {"kind": "nsf", "transforms": 3, "hidden": [128, 128]}
_PRIOR_LABELS = {"flow": "flow prior", "mixture": "code mixture", "normal": "N(0,I)"}


class GaussianPosterior(Independent):
    """The encoder's diagonal Gaussian q(z | x): ``Independent(Normal(mu, exp(logvar / 2)), 1)``.

    :meth:`VAE.encode` returns it (its ``mean`` is the amortised guess of a fit). For
    code written against galgen 0.1, where ``encode`` returned ``(mu, logvar)``, it
    still unpacks and indexes as that pair, with a :class:`DeprecationWarning`; use
    ``.mean`` and :attr:`logvar`, or :meth:`VAE.encoder_moments`.

    Parameters
    ----------
    mu, logvar : torch.Tensor
        ``(B, latent_dim)`` each.
    """

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor):
        super().__init__(Normal(mu, (0.5 * logvar).exp(), validate_args=False), 1, validate_args=False)
        self.logvar = logvar

    def _pair(self):
        warnings.warn("VAE.encode now returns a distribution (q(z|x)); use .mean and .logvar, or "
                      "VAE.encoder_moments(), instead of unpacking (mu, logvar)", DeprecationWarning, stacklevel=3)
        return (self.mean, self.logvar)

    def __iter__(self):
        return iter(self._pair())

    def __getitem__(self, i):
        return self._pair()[i]

    def __len__(self) -> int:
        return 2


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal draws made on the generator's device, then moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


class VAE(GenerativeModel):
    """PSF-aware VAE of galaxy images.

    Parameters
    ----------
    stamp : int
        Detector stamp size.
    latent_dim : int, optional
        Latent size.
    oversampling : int, optional
        Intrinsic pixels per detector pixel of the decoded image.
    width : int, optional
        Base channel count of encoder and decoder.
    input_scale : float, optional
        Observations enter the encoder as ``asinh(x / input_scale)`` (about the sky rms).
    encoder_noise_rms : float, optional
        The lowest noise rms the encoder was trained on (:attr:`LatentModel.encoder_noise_rms`;
        default ``input_scale``). ``galgen train`` sets it to the training file's noise rms:
        it differs from ``input_scale`` when a model is fine-tuned on deeper data, and deeper
        data than this are noise-matched before they are encoded.
    flux_scale : float, optional
        Initial decoder output scale (ADU per intrinsic pixel).
    beta : float, optional
        Weight of the KL term after warm-up.
    warmup_steps : int, optional
        Steps of the linear KL warm-up (0: none).
    conditions : sequence of str, optional
        Catalog columns the encoder, decoder and flow prior are conditioned on.
    prior : dict, optional
        :class:`LatentFlowPrior` options ``kind`` (``"nsf"`` or ``"maf"``),
        ``transforms`` and ``hidden``; missing ones take the defaults
        ``{"kind": "nsf", "transforms": 3, "hidden": [128, 128]}``.
    decoder : {"conv", "flux-shape"}, optional
        ``"conv"`` (default): a convolutional :class:`~galgen.models.networks.Decoder`
        with a softplus output. ``"flux-shape"``: a
        :class:`~galgen.models.FluxShapeGenerator` with a Sersic seed and a warped
        body, ``image = F * softmax(body - Sersic template)``. It starts as a Sersic
        galaxy (the body's output layer is zero), so every MAP fit can reach at least
        a Sersic fit's quality, and the body learns the structure a Sersic cannot
        draw (arms, bars, clumps). Its MAP fits default to Levenberg-Marquardt
        (``map_optimizer = "lm"``): Adam stops short of the optimum of a seed's
        parameters.
    log_flux : tuple of float, optional
        ``(mean, std)`` of the data's natural log total flux (image units), where the
        flux-shape decoder's flux head starts; filled in from the data by
        ``galgen train``. Unused by the ``"conv"`` decoder.
    seed_profile : {"sersic", "bulge-disk"}, optional
        The flux-shape decoder's seed: a Sersic galaxy (default), or a de Vaucouleurs
        bulge plus exponential disk, each with its own size and shear (the parametric
        ``bulge-disk`` model of :class:`~galgen.models.SersicModel`), so that the body
        only draws what a bulge + disk fit cannot.
    seed_latents : bool, optional
        The seed's parameters are the first latent coordinates, each through a learned
        affine map (:class:`~galgen.models.networks.SeedCoordinates`), rather than a
        network of the whole code: a MAP fit moves them as a parametric fit moves its own.
        Its fits default to the N(0, I) prior (``map_prior = "normal"``); it samples from
        the flow prior.
    symmetry_gate : {None, "network", "latent"}, optional
        The flux-shape decoder weights each image's departure from point symmetry by a
        gate (:class:`~galgen.models.networks.FluxShapeGenerator`), so that it can draw
        exactly symmetric bulges beside lopsided irregulars: a network of ``z``
        (``"network"``), or ``sigmoid(4 z_k)`` of the last latent coordinate (``"latent"``:
        the encoder sets it, a MAP fit moves it). :func:`add_symmetry_gate` adds one to a
        trained model.
    companion : bool, optional
        The flux-shape decoder draws a second galaxy beside the first (a Sersic profile
        with its own flux fraction, position, size, shear and index:
        :meth:`FluxShapeGenerator.companion_parameters
        <galgen.models.networks.FluxShapeGenerator.companion_parameters>`). With
        ``seed_latents`` its parameters are the last
        :data:`~galgen.models.networks.COMPANION_COORDINATES` latent coordinates (before a
        latent gate's). :func:`add_companion` adds one to a trained model.
    free_bits : float, optional
        Nats of KL per latent coordinate that training does not charge for ("free bits",
        Kingma et al. 2016): the training loss's KL term is ``sum_d max(KL_d, free_bits)``,
        ``KL_d`` the batch mean of coordinate ``d``'s KL, so a coordinate that carries less
        than ``free_bits`` nats gets no push towards its prior; coordinates above it are
        trained on the true ELBO. It frees coordinates that the KL holds at the prior, not
        ones the decoder barely reads: new coordinates of :func:`add_latents` whose decoder
        columns start small stay idle with it too (docs/models.md). :meth:`elbo` and the
        validation report the true KL. 0 (default): the ELBO itself.
    bulge_index : bool, optional
        With ``seed_profile="bulge-disk"`` and ``seed_latents``: the bulge's Sersic index is
        a latent coordinate of its own (``n = 4`` at 0; the one before the companion's, or
        before the latent gate's, or the last), where it is 4 without
        (:class:`~galgen.models.networks.FluxShapeGenerator` ``bulge_index_coordinate``).
        :func:`add_bulge_index` adds one to a trained model.

    Attributes
    ----------
    config : dict
        ``kind`` and every constructor argument (JSON-serialisable; ``prior`` with all
        its options filled in).
    latent_flow : LatentFlowPrior
        The latent flow (context: the normalised conditions); unfitted until
        :meth:`fit_prior`. (Checkpoints of galgen 0.1 call it ``prior``; they load.)

    Notes
    -----
    The encoder maps ``asinh(x / input_scale)`` to features, the normalised conditions
    are appended, and a linear head gives the mean and log-variance of q(z | x, c) (the
    log-variance clamped to ``[-12, 6]``). The decoder maps ``[z, c]`` to a
    non-negative intrinsic image of ``stamp * oversampling`` pixels.

    Examples
    --------
    >>> vae = VAE(32, latent_dim=4, width=8)
    >>> vae.sample(2, prior="normal", generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 32, 32])
    >>> vae.encode(torch.zeros(3, 32, 32)).mean.shape
    torch.Size([3, 4])
    """

    kind = "vae"

    def __init__(self, stamp: int, latent_dim: int = 16, oversampling: int = 1, width: int = 32,
                 input_scale: float = 1.0, flux_scale: float = 1.0, beta: float = 1.0, warmup_steps: int = 0,
                 conditions=(), prior: dict | None = None, decoder: str = "conv", log_flux=None,
                 seed_profile: str = "sersic", seed_latents: bool = False, symmetry_gate: str | None = None,
                 encoder_noise_rms: float | None = None, companion: bool = False, free_bits: float = 0.0,
                 bulge_index: bool = False):
        super().__init__(conditions)
        if decoder not in VAE_DECODERS:
            raise GalgenInputError(f"decoder: one of {list(VAE_DECODERS)}, got {decoder!r}")
        if seed_profile not in ("sersic", "bulge-disk"):
            raise GalgenInputError(f"seed_profile: 'sersic' or 'bulge-disk', got {seed_profile!r}")
        if (seed_profile != "sersic" or seed_latents or symmetry_gate or companion or bulge_index) \
                and decoder != "flux-shape":
            raise GalgenInputError(f"seed_profile/seed_latents/symmetry_gate/companion/bulge_index: options of the "
                                   f"flux-shape decoder; decoder is {decoder!r}")
        if symmetry_gate not in SYMMETRY_GATES:
            raise GalgenInputError(f"symmetry_gate: one of {list(SYMMETRY_GATES)}, got {symmetry_gate!r}")
        checks = [("stamp", stamp, 4), ("latent_dim", latent_dim, 1), ("oversampling", oversampling, 1),
                  ("width", width, 1), ("warmup_steps", warmup_steps, 0)]
        for name, value, least in checks:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise GalgenInputError(f"{name}: expected an integer >= {least}, got {value!r}")
        rms_checks = () if encoder_noise_rms is None else (("encoder_noise_rms", encoder_noise_rms),)
        for name, value in (("input_scale", input_scale), ("flux_scale", flux_scale)) + rms_checks:
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or not value > 0:
                raise GalgenInputError(f"{name}: must be a positive number, got {value!r}")
        if not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 0:
            raise GalgenInputError(f"beta: must be a number >= 0, got {beta!r}")
        if isinstance(free_bits, bool) or not isinstance(free_bits, numbers.Real) or not math.isfinite(free_bits) \
                or free_bits < 0:
            raise GalgenInputError(f"free_bits: must be a number of nats >= 0, got {free_bits!r}")
        if prior is not None and not isinstance(prior, dict):
            raise GalgenInputError(f"prior: expected a dict of flow options, got {prior!r}")
        unknown = sorted(set(prior or {}) - set(_PRIOR_DEFAULTS))
        if unknown:
            raise GalgenInputError(f"prior: unknown option(s) {unknown} (known: {sorted(_PRIOR_DEFAULTS)})")
        self.latent_dim = int(latent_dim)
        self.input_scale = float(input_scale)
        # the training data's noise rms (galgen train)
        self.encoder_noise_rms = self.input_scale if encoder_noise_rms is None else float(encoder_noise_rms)
        features = max(64, 4 * self.latent_dim)
        self.encoder = Encoder(int(stamp), features, width=int(width))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(features + self.cond_dim, 2 * self.latent_dim))
        size, nin = int(stamp) * int(oversampling), self.latent_dim + self.cond_dim
        if decoder == "flux-shape":
            log_flux = log_flux_start(log_flux, flux_scale, size)
            gate = self.latent_dim - 1 if symmetry_gate == "latent" else None
            # the companion's coordinates: the last ones, before a latent gate's
            own = (self.latent_dim if gate is None else gate) - COMPANION_COORDINATES
            if companion and seed_latents and own < 0:
                raise GalgenInputError(f"latent_dim: the companion needs {COMPANION_COORDINATES} coordinates "
                                       f"beside the seed's, got latent_dim={self.latent_dim}")
            # the bulge's index: the coordinate before the companion's (or the gate's, or the last)
            index = ((own if companion and seed_latents else self.latent_dim if gate is None else gate) - 1
                     if bulge_index else None)
            if bulge_index and not (seed_profile == "bulge-disk" and seed_latents):
                raise GalgenInputError("bulge_index: an option of seed_profile='bulge-disk' with seed_latents=True")
            self.decoder = FluxShapeGenerator(size, nin, width=int(width), log_flux=log_flux, profile=seed_profile,
                                              warp_body=True, seed_latents=bool(seed_latents),
                                              symmetry_gate=symmetry_gate, gate_coordinate=gate,
                                              companion=bool(companion),
                                              companion_coordinate=own if companion and seed_latents else None,
                                              bulge_index_coordinate=index)
            # Its fits need second-order steps: from the same start on 32 held-out galaxies, Levenberg-
            # Marquardt reached the bulge + disk optimum of a bulge + disk seed in 11 steps (median chi2/dof
            # 1.0124 against the parametric 1.0107) where Adam stopped at 1.0198 after 84 (docs/inference.md).
            self.map_optimizer = "lm"
            if seed_latents:
                # Its flow prior, fitted to the encoder's codes, is far narrower than N(0, I) along the
                # seed coordinates: on 1,000 held-out rich galaxies, fits with N(0, I) beat both parametric
                # fits on 70% of the featured galaxies, with the flow prior on 25% (docs/inference.md).
                self.map_prior = "normal"
        else:
            self.decoder = Decoder(size, nin, width=int(width), flux_scale=flux_scale)
        self.locator = self.locator_head = None
        if companion and seed_latents:  # the companion's position: a soft-argmax, its other moments beside it
            self.locator = CompanionLocator(int(stamp), width=8)
            self.locator_head = nn.Linear(self.locator.width, 2 * COMPANION_COORDINATES)
            nn.init.zeros_(self.locator_head.weight)
            nn.init.zeros_(self.locator_head.bias)
        self.latent_flow = LatentFlowPrior(self.latent_dim, self.cond_dim, **{**_PRIOR_DEFAULTS, **(prior or {})})
        self.code_mixture = CodeMixturePrior(self.latent_dim)
        self._prior_choice = None
        self._register_load_state_dict_pre_hook(_rename_flow_keys)
        prior_config = {k: self.latent_flow.config[k] for k in _PRIOR_DEFAULTS}
        self.config = dict(kind=self.kind, stamp=int(stamp), latent_dim=self.latent_dim,
                           oversampling=int(oversampling), width=int(width), input_scale=float(input_scale),
                           flux_scale=float(flux_scale), beta=float(beta), warmup_steps=int(warmup_steps),
                           conditions=list(self.conditions), prior=prior_config)
        if decoder != "conv":  # configs of conv-decoder VAEs are those of galgen 0.1
            self.config.update(decoder=decoder, log_flux=log_flux)
        if seed_profile != "sersic":  # configs of Sersic-seeded flux-shape VAEs are those before the option
            self.config.update(seed_profile=seed_profile)
        if seed_latents:
            self.config.update(seed_latents=True)
        if symmetry_gate is not None:
            self.config.update(symmetry_gate=symmetry_gate)
        if companion:
            self.config.update(companion=True)
        if free_bits:  # configs without it are those before the option
            self.config.update(free_bits=float(free_bits))
        if bulge_index:
            self.config.update(bulge_index=True)
        if self.encoder_noise_rms != self.input_scale:
            self.config.update(encoder_noise_rms=self.encoder_noise_rms)

    # -- encoder / decoder ----------------------------------------------------------------
    def encode(self, observed: torch.Tensor, cond=None) -> GaussianPosterior:
        """The approximate posterior q(z | x[, c]) of observed cutouts.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)`` observed cutouts (ADU).
        cond : torch.Tensor, optional
            Raw conditions ``(B, C)`` or ``(C,)``; required by a conditional model.

        Returns
        -------
        GaussianPosterior
            Batch shape ``(B,)``, event shape ``(latent_dim,)``; its ``mean`` is the
            amortised guess of a fit.
        """
        return GaussianPosterior(*self.encoder_moments(observed, cond))

    def encoder_moments(self, observed: torch.Tensor, cond=None):
        """Posterior mean and log-variance of q(z | x[, c]).

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)`` observed cutouts (ADU).
        cond : torch.Tensor, optional
            Raw conditions ``(B, C)`` or ``(C,)``; required by a conditional model.

        Returns
        -------
        mu, logvar : torch.Tensor
            ``(B, latent_dim)`` each; ``logvar`` clamped to ``[-12, 6]``.
        """
        weight = self.encoder.head.weight
        x = torch.asinh(observed.to(weight.dtype) / self.input_scale)
        h = self.encoder(x)
        c = self.condition_features(cond, len(observed))
        if c is not None:
            h = torch.cat([h, c.to(h.dtype)], 1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        if self.locator is not None:
            mu, logvar = self._locate_companion(x, mu, logvar)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def _locate_companion(self, x, mu, logvar):
        """The companion's posterior moments: the head's plus the locator's; the position's
        means are the locator's soft-argmax alone, in the decoder's companion coordinates."""
        comp = self.decoder.companion
        i, k = comp.start, comp.k
        position, features = self.locator(x)
        extra_mu, extra_lv = self.locator_head(features).chunk(2, dim=1)
        at = torch.zeros_like(extra_mu)
        oversampling = self.decoder.size // self.config["stamp"]
        at[:, 1:3] = _companion_position_z(comp, self.decoder.size, position * oversampling)
        head = torch.ones(k, dtype=mu.dtype, device=mu.device)
        head[1:3] = 0.0  # the position is the locator's alone (with the head's too, the head learned it, badly)
        mu = torch.cat([mu[:, :i], mu[:, i:i + k] * head + extra_mu + at, mu[:, i + k:]], 1)
        logvar = torch.cat([logvar[:, :i], logvar[:, i:i + k] + extra_lv, logvar[:, i + k:]], 1)
        return mu, logvar

    def decode(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """Intrinsic images of latent codes.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)``.
        cond : torch.Tensor, optional
            Raw conditions ``(B, C)`` or ``(C,)``; required by a conditional model.

        Returns
        -------
        torch.Tensor
            ``(B, S*k, S*k)``, non-negative.
        """
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise GalgenInputError(f"z: expected shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        c = self.condition_features(cond, len(z))
        if c is not None:
            z = torch.cat([z, c.to(z.dtype)], 1)
        return self.decoder(z)

    def reconstruct(self, observed: torch.Tensor, cond=None) -> torch.Tensor:
        """Decoded posterior mean: the VAE's intrinsic galaxy for observed cutouts.

        Used by :meth:`GenerativeModel.denoise` and :meth:`GenerativeModel.anomaly_score`.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        cond : torch.Tensor, optional
            Raw conditions.

        Returns
        -------
        torch.Tensor
            ``(B, S*k, S*k)``.
        """
        return self.decode(self.encoder_moments(observed, cond)[0], cond)

    def forward(self, observed: torch.Tensor, cond=None) -> torch.Tensor:
        """Same as :meth:`reconstruct`.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        cond : torch.Tensor, optional
            Raw conditions.

        Returns
        -------
        torch.Tensor
            ``(B, S*k, S*k)``.
        """
        return self.reconstruct(observed, cond)

    # -- objective ------------------------------------------------------------------------
    def beta_at(self, step: int) -> float:
        """KL weight at a training step: ``beta * min(1, (step + 1) / warmup_steps)``.

        Parameters
        ----------
        step : int
            Global step, 0-based.

        Returns
        -------
        float
            ``beta`` itself when ``warmup_steps`` is 0.
        """
        w = self.config["warmup_steps"]
        return self.config["beta"] * (1.0 if w == 0 else min(1.0, (step + 1) / w))

    def elbo(self, batch: Batch, beta: float = 1.0, generator: torch.Generator | None = None) -> dict:
        """ELBO terms per galaxy, with one reparameterised sample of z.

        Parameters
        ----------
        batch : Batch
            Observed cutouts, their :class:`~galgen.physics.Observation`, conditions.
        beta : float, optional
            Weight of the KL term in ``elbo``; with 1 (default) it is the true evidence
            lower bound.
        generator : torch.Generator, optional
            Source of the reparameterisation noise.

        Returns
        -------
        dict of torch.Tensor
            Each ``(B,)``, float32: ``nll`` = ``-log p(x | z)`` (nats; the physics
            layer's likelihood, per-galaxy PSF, variance and mask), ``kl`` = the analytic
            ``KL(q(z | x) || N(0, I))`` (nats), ``elbo`` = ``-nll - beta * kl`` (nats per
            galaxy), ``bits_per_pixel`` = ``-elbo / (n_good * ln 2)`` with ``n_good`` the
            galaxy's unmasked pixels. The ELBO bounds a *density* of continuous data, so
            bits per pixel can be negative, and it depends on the flux unit.

        Notes
        -----
        With a latent symmetry gate (``symmetry_gate="latent"``) the gate's coordinate is
        not drawn from q: it is set to :meth:`gate_posterior`'s weight for the drawn code,
        a per-galaxy point estimate (its KL term is left out), so that the decoder trains
        with every galaxy's best gate rather than with an encoder that cannot learn it.
        """
        return {k: v for k, v in self._elbo_terms(batch, beta, generator).items() if k != "kl_coordinates"}

    def _elbo_terms(self, batch: Batch, beta: float = 1.0, generator: torch.Generator | None = None) -> dict:
        """:meth:`elbo`'s terms and ``kl_coordinates``, the ``(B, L)`` KL of each coordinate
        (without a latent gate's)."""
        mu, logvar = self.encoder_moments(batch.observed, batch.cond)
        mu, logvar = mu.float(), logvar.float()
        eps = _randn(mu.shape, generator, mu.device, mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        kl_coordinates = 0.5 * (mu**2 + logvar.exp() - logvar - 1)
        if self.config.get("symmetry_gate") == "latent":  # the gate's weight: the likelihood's, per galaxy
            z = self.with_best_gate(z, batch)
            kl_coordinates = kl_coordinates[:, :-1]
        kl = kl_coordinates.sum(1)
        intrinsic = self.decode(z, batch.cond)
        nll = -batch.observation.log_likelihood(intrinsic.float(), batch.observed)
        elbo = -nll - beta * kl
        bpp = -elbo / (good_pixels(batch.observed, batch.observation) * math.log(2))
        return {"nll": nll, "kl": kl, "elbo": elbo, "bits_per_pixel": bpp, "kl_coordinates": kl_coordinates}

    def training_step(self, batch: Batch, optimizers: dict, step: int, sync=no_sync) -> dict:
        """One step on ``mean(nll + beta_at(step) * kl)`` (see :meth:`GenerativeModel.training_step`);
        with ``free_bits`` on ``mean(nll) + beta_at(step) * sum_d max(mean(KL_d), free_bits)``.

        Parameters
        ----------
        batch : Batch
            Training batch.
        optimizers : dict
            ``{"model": optimizer}`` from :meth:`make_optimizers`.
        step : int
            Global step, for the KL warm-up.
        sync : callable, optional
            Gradient synchronisation, called between ``backward`` and ``step``.

        Returns
        -------
        dict of torch.Tensor
            Detached scalars: ``loss`` (the objective with the current weight),
            ``beta``, and the batch means of ``elbo`` (true ELBO, beta = 1), ``nll``,
            ``kl`` and ``bits_per_pixel``.
        """
        opt = optimizers["model"]
        opt.zero_grad(set_to_none=True)
        t = self._elbo_terms(batch)
        kl_coordinates = t.pop("kl_coordinates")
        beta = self.beta_at(step)
        free = self.config.get("free_bits", 0.0)
        if free:  # free bits: each coordinate's batch-mean KL, floored
            loss = t["nll"].mean() + beta * kl_coordinates.mean(0).clamp(min=free).sum()
        else:
            loss = (t["nll"] + beta * t["kl"]).mean()
        loss.backward()
        sync(self.parameters())
        opt.step()
        out = {k: v.detach().mean() for k, v in t.items()}
        out.update(loss=loss.detach(), beta=torch.tensor(float(beta)))
        return out

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict:
        """Per-galaxy ``loss`` (-ELBO with beta = 1), ELBO terms and ``chi2_pixel``.

        Parameters
        ----------
        batch : Batch
            Validation batch.

        Returns
        -------
        dict of torch.Tensor
            Each ``(B,)``: ``loss``, ``elbo``, ``nll``, ``kl``, ``bits_per_pixel`` (as
            in :meth:`elbo`, one sample of z) and ``chi2_pixel``, the reduced chi-square
            of the posterior-mean reconstruction (:meth:`anomaly_score`).
        """
        t = self.elbo(batch)
        t["loss"] = -t["elbo"]
        t["chi2_pixel"] = self.anomaly_score(batch.observed, batch.observation, batch.cond)
        return t

    # -- prior ----------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate_posterior(self, batches, samples_per_galaxy: int = 4,
                            generator: torch.Generator | None = None):
        """Codes drawn from q(z | x) over a data set: samples of the aggregate posterior.

        Parameters
        ----------
        batches : iterable of Batch
            E.g. ``TrainingData.iter_batches(...)`` over the training set.
        samples_per_galaxy : int, optional
            Draws from each galaxy's q(z | x) (not only its mean: the aggregate
            posterior is the mixture of the q's). With a latent symmetry gate, the gate's
            coordinate ``z_k`` of each draw is not the encoder's: it is drawn from its
            exact one-dimensional posterior at the galaxy's mean code,
            ``N(sigmoid(4 z_k); w*, 1/a) N(z_k; 0, 1)`` (:meth:`gate_posterior`), on a grid
            of 801 points over ``[-4, 4]``. A galaxy whose likelihood wants no asymmetry
            gets any ``z_k`` at which the gate is closed, as the prior spreads them, rather
            than an atom at a clamp that a flow cannot fit.
        generator : torch.Generator, optional
            Source of the draws (default: the global generator).

        Returns
        -------
        codes : torch.Tensor
            ``(N * samples_per_galaxy, latent_dim)`` on the CPU, float32.
        cond : torch.Tensor or None
            The matching raw conditions ``(N * samples_per_galaxy, C)`` (None for an
            unconditional model).
        """
        if (isinstance(samples_per_galaxy, bool) or not isinstance(samples_per_galaxy, numbers.Integral)
                or samples_per_galaxy < 1):
            raise GalgenInputError(f"samples_per_galaxy: expected an integer >= 1, got {samples_per_galaxy!r}")
        was_training = self.training
        self.eval()
        codes, conds = [], []
        try:
            for b in batches:
                if not isinstance(b, Batch):
                    raise GalgenInputError(f"batches: expected galgen.models.Batch items, got {type(b).__name__}")
                mu, logvar = self.encoder_moments(b.observed, b.cond)
                mu, std = mu.float(), (0.5 * logvar.float()).exp()
                gate = None
                if self.config.get("symmetry_gate") == "latent":
                    gate = _gate_coordinate_posterior(*self.gate_posterior(mu, b))
                for _ in range(samples_per_galaxy):
                    z = mu + _randn(mu.shape, generator, mu.device, mu.dtype) * std
                    if gate is not None:
                        z[:, -1] = _sample_grid(*gate, generator)
                    codes.append(z.detach().cpu())
                    if self.cond_dim:
                        c = torch.as_tensor(b.cond, dtype=torch.float32).expand(len(mu), -1)
                        conds.append(c.cpu())
        finally:
            self.train(was_training)
        if not codes:
            raise GalgenInputError("batches: no galaxies to encode")
        return torch.cat(codes), (torch.cat(conds) if conds else None)

    def gate_posterior(self, z: torch.Tensor, batch: Batch):
        """The latent symmetry gate's weight that best explains each galaxy, given the rest of its code.

        With ``symmetry_gate="latent"`` the image is linear in the gate's weight ``w``
        (``S + w A``, plus a companion that the gate does not touch: :class:`~galgen.models.
        networks.FluxShapeGenerator`), and no other part of the decoder reads the gate's
        coordinate, so ``-2 log p(x | z)`` is a parabola in ``w`` under Gaussian noise:
        three evaluations of the likelihood give its minimum ``w*`` and curvature ``a``,
        i.e. the posterior of ``w`` under a flat prior, ``N(w*, 1 / a)``. The encoder
        cannot learn this weight: its gradient is dominated by the few bright lopsided
        galaxies (``sdss-vae-bd`` fine-tuned with the gate as a latent coordinate or as a
        network of ``z`` moved it up for every type alike, to 0.89), so the flow prior is
        fitted to codes whose gate coordinate is drawn from this posterior
        (:meth:`aggregate_posterior`).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)`` codes (the gate's coordinate is ignored).
        batch : Batch
            The observed galaxies, with their observation (PSF and noise).

        Returns
        -------
        mean, std : torch.Tensor
            ``(B,)`` each: ``w*`` and ``a^(-1/2)``. ``w*`` is the parabola's vertex, which
            may lie outside the gate's range ``(0, 1)``.

        Raises
        ------
        GalgenInputError
            If the model has no latent gate.
        """
        if self.config.get("symmetry_gate") != "latent":
            raise GalgenInputError("gate_posterior: the model has no latent symmetry gate")
        z = z.detach().clone()
        obs, ends = batch.observation, []
        with torch.no_grad():  # the image is linear in w: its ends w = 4e-18 and 1 - 4e-18
            for end in (-10.0, 10.0):
                z[:, self.latent_dim - 1] = end
                ends.append(obs.noiseless(self.decode(z, batch.cond).float()))
            m_sym, m_anti = ends[0], ends[1] - ends[0]
            f0, fh, f1 = (-2 * obs.noise.log_prob(batch.observed, m_sym + w * m_anti) for w in (0.0, 0.5, 1.0))
        a = (2 * (f1 - 2 * fh + f0)).clamp_min(1e-12)
        b = f1 - f0 - a
        return -b / (2 * a), a.rsqrt()

    def with_best_gate(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``z`` with its latent gate's coordinate at the weight that best explains each galaxy.

        The weight is :meth:`gate_posterior`'s ``w*``, clipped to the gate's range
        ``(sigmoid(-8), sigmoid(8))``, as :meth:`elbo` draws each training galaxy.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)`` codes.
        batch : Batch
            The observed galaxies, with their observation.

        Returns
        -------
        torch.Tensor
            A new tensor (the other coordinates keep their gradients); ``z`` itself
            without a latent gate.
        """
        if self.config.get("symmetry_gate") != "latent":
            return z
        w = self.gate_posterior(z, batch)[0].clamp(_GATE_RANGE, 1 - _GATE_RANGE)
        return torch.cat([z[:, :-1], (torch.logit(w) / LATENT_GATE_GAIN)[:, None].to(z.dtype)], 1)

    def fit_prior(self, latents_or_batches, cond=None, *, samples_per_galaxy: int = 4, **options) -> dict:
        """Fit the flow prior to the aggregate posterior.

        Parameters
        ----------
        latents_or_batches : torch.Tensor or iterable of Batch
            Codes ``(N, latent_dim)`` (e.g. from :meth:`aggregate_posterior`), or
            batches of a training set, which are encoded first
            (:meth:`aggregate_posterior` with ``samples_per_galaxy`` draws each).
        cond : torch.Tensor, optional
            Raw conditions ``(N, C)`` of the codes (with codes from a conditional model
            only; batches carry their own).
        samples_per_galaxy : int, optional
            Draws per galaxy when batches are given.
        **options
            Passed to :meth:`LatentFlowPrior.fit` (``epochs``, ``batch_size``, ``lr``,
            ``val_fraction``, ``patience``, ``generator``).

        Returns
        -------
        dict
            The fit history (see :meth:`LatentFlowPrior.fit`); ``prior.fitted`` is then True.
        """
        if isinstance(latents_or_batches, torch.Tensor):
            codes = latents_or_batches
        else:
            if cond is not None:
                raise GalgenInputError("cond: batches carry their own conditions; pass cond with codes only")
            try:
                iter(latents_or_batches)
            except TypeError:
                raise GalgenInputError("latents_or_batches: expected a tensor of codes or an iterable of "
                                       f"Batch, got {type(latents_or_batches).__name__}") from None
            codes, cond = self.aggregate_posterior(latents_or_batches, samples_per_galaxy,
                                                   generator=options.get("generator"))
        if codes.ndim != 2 or codes.shape[1] != self.latent_dim:
            raise GalgenInputError(f"latents: expected shape (N, {self.latent_dim}), got {tuple(codes.shape)}")
        ctx = self.condition_features(cond, len(codes))
        return self.latent_flow.fit(codes, ctx, **options)

    def fit_code_mixture(self, codes: torch.Tensor, scales, *, bandwidth="match", max_components: int | None = None,
                         generator: torch.Generator | None = None) -> dict:
        """Fit the code-mixture prior: a Gaussian at each training galaxy's code.

        The aggregate posterior (:class:`~galgen.models.CodeMixturePrior`), with each
        galaxy's MAP code (:func:`galgen.inference.map_codes`) and its encoder's widths
        (:meth:`encoder_moments`) times a bandwidth at which its draws are as far from the
        training codes as held-out codes are; ``with_prior("mixture")`` samples from it.
        The flow prior is kept (and stays the default).

        Parameters
        ----------
        codes : torch.Tensor
            ``(N, latent_dim)``.
        scales : torch.Tensor or float
            ``(N, latent_dim)`` widths, or one for all.
        bandwidth : "match" or float, optional
            See :meth:`CodeMixturePrior.fit`.
        max_components : int, optional
            Keep a random subset of this many.
        generator : torch.Generator, optional
            For the subset and the bandwidth's match.

        Returns
        -------
        dict
            :meth:`CodeMixturePrior.fit`'s (``bandwidth`` and the matched distances).

        Raises
        ------
        GalgenInputError
            For a conditional model (the mixture is unconditional: its draws would ignore
            the conditions asked for), or codes and scales of the wrong shape.
        """
        if self.cond_dim:
            raise GalgenInputError("fit_code_mixture: the code mixture is unconditional and this VAE is "
                                   f"conditioned on {list(self.conditions)}; use its flow prior")
        return self.code_mixture.fit(codes, scales, bandwidth=bandwidth, max_components=max_components,
                                     generator=generator)

    @property
    def prior_choices(self) -> dict:
        """The priors :meth:`with_prior` accepts: ``flow`` and ``mixture`` once fitted, and ``normal``.

        Returns
        -------
        dict of str to str
            Name -> label, e.g. ``{"flow": "flow prior", "normal": "N(0,I)"}``.
        """
        fitted = {"flow": bool(self.latent_flow.fitted), "mixture": bool(self.code_mixture.fitted)}
        return {k: label for k, label in _PRIOR_LABELS.items() if fitted.get(k, True)}

    def with_prior(self, name: str) -> "VAE":
        """The same VAE (sharing its weights) with its flow prior, its code mixture or N(0, I).

        Parameters
        ----------
        name : {"flow", "mixture", "normal"}

        Returns
        -------
        VAE
        """
        if name == "flow" and not bool(self.latent_flow.fitted):
            raise GalgenInputError("prior: the flow prior is not fitted yet (train to the end, or call "
                                   "fit_prior); use prior='normal' for N(0, I)")
        if name == "mixture" and not bool(self.code_mixture.fitted):
            raise GalgenInputError("prior: the code mixture is not fitted (pipelines/refit_prior.py --mixture, "
                                   "or VAE.fit_code_mixture); use prior='flow' or 'normal'")
        if name not in _PRIOR_LABELS:
            raise GalgenInputError(f"prior: one of {sorted(_PRIOR_LABELS)}, got {name!r}")
        return super().with_prior(name)

    def prior(self, cond=None):
        """The prior over latent codes: the fitted flow, else N(0, I), or the one :meth:`with_prior` chose.

        Parameters
        ----------
        cond : torch.Tensor, optional
            Raw conditions ``(B, C)``: the flow's context, one prior per galaxy
            (required by a conditional model's flow; unused by N(0, I)).

        Returns
        -------
        torch.distributions.Distribution
            A zuko flow (:meth:`LatentFlowPrior.distribution`), a
            :class:`~galgen.models.CodeMixture` or :func:`~galgen.models.standard_normal`.
        """
        name = self._prior_choice or ("flow" if bool(self.latent_flow.fitted) else "normal")
        if name == "flow":
            n = len(cond) if isinstance(cond, torch.Tensor) and cond.ndim == 2 else 1
            return self.latent_flow.distribution(self.condition_features(cond, n))
        if name == "mixture":
            return self.code_mixture.distribution()
        w = self.head[1].weight
        return standard_normal(self.latent_dim, device=w.device, dtype=w.dtype)

    def _chosen(self, prior):
        return self if prior is None else self.with_prior(prior)

    def latent_log_prob(self, z: torch.Tensor, cond=None, prior: str | None = None) -> torch.Tensor:
        """Deprecated: ``vae.prior(cond).log_prob(z)`` (or ``vae.with_prior(name).prior(cond)``).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)``.
        cond : torch.Tensor, optional
        prior : {"flow", "mixture", "normal"}, optional

        Returns
        -------
        torch.Tensor
            ``(B,)`` nats.
        """
        warnings.warn("VAE.latent_log_prob is deprecated; use vae.prior(cond).log_prob(z)", DeprecationWarning,
                      stacklevel=2)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise GalgenInputError(f"z: expected shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        c = None if cond is None else torch.as_tensor(cond)
        c = c if c is None or c.ndim != 1 else c.expand(len(z), -1)
        return self._chosen(prior).prior(c).log_prob(z)

    @torch.no_grad()
    def sample_latents(self, n: int, cond=None, generator: torch.Generator | None = None,
                       prior: str | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Draw latent codes from the prior (same seed, same codes).

        Parameters
        ----------
        n : int
            Number of codes.
        cond : torch.Tensor, optional
            Raw conditions ``(n, C)`` or ``(C,)``: the flow's context (unused by N(0, I)).
        generator : torch.Generator, optional
            Source of randomness.
        prior : {"flow", "mixture", "normal"}, optional
            Default: the flow when fitted, else N(0, I).
        temperature : float, optional
            Scale of the Gaussian noise (of N(0, I), or of the flow's base distribution).

        Returns
        -------
        torch.Tensor
            ``(n, latent_dim)``.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise GalgenInputError(f"n: expected an integer >= 1, got {n!r}")
        c = None if cond is None or not self.cond_dim else torch.as_tensor(cond)
        c = c if c is None or c.ndim != 1 else c.expand(int(n), -1)
        return sample_latents(self._chosen(prior).prior(c), int(n), generator=generator, temperature=temperature)

    @torch.no_grad()
    def sample(self, n: int, cond=None, generator: torch.Generator | None = None, prior: str | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Draw intrinsic galaxies: latent codes from the prior, then the decoder.

        Parameters
        ----------
        n : int
            Number of galaxies.
        cond : torch.Tensor, optional
            Raw conditions ``(n, C)`` or ``(C,)``; a conditional model called without
            them draws them from its training set's (:meth:`draw_conditions`).
        generator : torch.Generator, optional
            Source of randomness (same seed, same galaxies).
        prior : {"flow", "mixture", "normal"}, optional
            Default: the flow when fitted, else N(0, I). ``"flow"`` before the flow is
            fitted is an error.
        temperature : float, optional
            Scale of the Gaussian noise (of N(0, I), or of the flow's base distribution).

        Returns
        -------
        torch.Tensor
            ``(n, S*k, S*k)`` non-negative intrinsic images.
        """
        if cond is None and self.cond_dim:
            cond = self.draw_conditions(n, generator)
        z = self.sample_latents(n, cond, generator=generator, prior=prior, temperature=temperature)
        return self.decode(z, cond)


_GATE_GRID = torch.linspace(-4.0, 4.0, 801)


def _gate_coordinate_posterior(w_mean: torch.Tensor, w_std: torch.Tensor):
    """Log-density of a latent gate's coordinate on ``_GATE_GRID``: the likelihood
    ``N(sigmoid(4 z); w_mean, w_std^2)`` times the prior ``N(z; 0, 1)``, ``(B, 801)``."""
    grid = _GATE_GRID.to(w_mean.device, w_mean.dtype)
    w = torch.sigmoid(LATENT_GATE_GAIN * grid)
    logp = -0.5 * ((w[None] - w_mean[:, None]) / w_std[:, None]) ** 2 - 0.5 * grid[None] ** 2
    return logp, grid


def _sample_grid(logp: torch.Tensor, grid: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per row from a density tabulated on an even grid (uniform within each cell)."""
    probs = torch.softmax(logp.double(), 1).float().cpu()
    k = torch.multinomial(probs, 1, generator=generator)[:, 0].to(grid.device)
    step = float(grid[1] - grid[0])
    jitter = (torch.rand(len(k), generator=generator).to(grid.device) - 0.5) * step
    return grid[k] + jitter


def _rename_flow_keys(state_dict, prefix, *args):
    """Load checkpoints of galgen 0.1, whose latent flow was the submodule ``prior``."""
    old = prefix + "prior."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "latent_flow." + key[len(old):]] = state_dict.pop(key)


def reseed_bulge_disk(model: VAE, seed_latents: bool = False) -> VAE:
    """A bulge + disk-seeded copy of a trained flux-shape VAE, to train on from.

    Every weight is kept (encoder, body, flux head, latent flow). With the network seed
    (``seed_latents=False``; ``model`` Sersic-seeded) the moments head's last layer gains
    the bulge's outputs: the disk and the bulge both start from the Sersic seed's size
    and shear, and the bulge-to-total ratio from its index, ``B/T = (n - 1/2) / 5.5``
    (0.09 at n = 1, 0.64 at n = 4), at the centre pixel. With ``seed_latents=True`` (``model`` seeded either
    way) the seed parameters become the first nine latent coordinates
    (:class:`~galgen.models.networks.SeedCoordinates`, at their starting population) and
    the moments network is dropped. Fine-tune the copy (``galgen train --init``) rather
    than training from scratch.

    Parameters
    ----------
    model : VAE
        A VAE with ``decoder="flux-shape"`` and a network seed (Sersic; or bulge + disk
        with ``seed_latents``).
    seed_latents : bool, optional
        Make the seed parameters latent coordinates.

    Returns
    -------
    VAE
        With ``seed_profile="bulge-disk"``, in the mode of ``model`` (``provenance``,
        ``metrics`` and checkpoint attributes are not copied).

    Raises
    ------
    GalgenInputError
        If ``model`` is not such a VAE.

    Examples
    --------
    >>> sersic = VAE(32, latent_dim=10, width=8, decoder="flux-shape", log_flux=(6.0, 1.0))
    >>> bd = reseed_bulge_disk(sersic)
    >>> bd.config["seed_profile"], bd.decoder.moments[2].out_features
    ('bulge-disk', 9)
    >>> reseed_bulge_disk(bd, seed_latents=True).config["seed_latents"]
    True
    """
    cfg = dict(model.config) if isinstance(model, VAE) else {}
    seeds = ("sersic", "bulge-disk") if seed_latents else ("sersic",)
    if cfg.get("decoder") != "flux-shape" or cfg.get("seed_profile", "sersic") not in seeds or cfg.get("seed_latents"):
        raise GalgenInputError(f"model: reseeding needs a VAE with decoder 'flux-shape' and a network seed "
                               f"({' or '.join(seeds)})")
    kwargs = {k: v for k, v in cfg.items() if k != "kind"}
    new = VAE(**{**kwargs, "seed_profile": "bulge-disk", "seed_latents": bool(seed_latents)})
    new = new.to(next(model.parameters()).device)
    state = model.state_dict()
    key = "decoder.moments."
    if seed_latents:
        state = {k: v for k, v in state.items() if not k.startswith(key)}
        state.update({k: v for k, v in new.state_dict().items() if k.startswith(key)})
    else:
        w, b = state[key + "2.weight"], state[key + "2.bias"]  # rows: log_size, h1, h2, t_n
        # disk: log_size, g1, g2 | t_bt: the index's logit (n = 0.5 + 5.5 sigmoid(t - 2.2)) | bulge: log_size, g1, g2
        # | centre offset dx, dy: zero
        rows = [0, 1, 2, 3, 0, 1, 2]
        shift = torch.zeros(7, dtype=b.dtype, device=b.device)
        shift[3] = -2.2
        zero = torch.zeros(2, w.shape[1], dtype=w.dtype, device=w.device)
        state[key + "2.weight"] = torch.cat([w[rows], zero])
        state[key + "2.bias"] = torch.cat([b[rows] + shift, zero[:, 0]])
    new.load_state_dict(state)
    return new.train(model.training)


def add_symmetry_gate(model: VAE, kind: str = "network", generator: torch.Generator | None = None) -> VAE:
    """A copy of a trained flux-shape VAE with a symmetry gate, to fine-tune from.

    Every weight is kept. The ``"network"`` gate (:meth:`FluxShapeGenerator.asymmetry_gate
    <galgen.models.networks.FluxShapeGenerator.asymmetry_gate>`) starts at 0.5 for every
    galaxy, so the copy draws each galaxy with half its departure from point symmetry.
    The ``"latent"`` gate reads a new last latent coordinate (:func:`add_latents`, its new
    decoder columns drawn with ``generator``) whose posterior starts at N(0, 0.135^2)
    (log-variance -4: 1.5 nats of KL), so that its noise does not swing the gate across
    its range before the encoder has learnt it; at the posterior mean the gate is 0.5.
    Fine-tune the copy (``galgen train --init``) so that the gate learns which galaxies
    are symmetric.

    Parameters
    ----------
    model : VAE
        A VAE with ``decoder="flux-shape"`` and no gate.
    kind : {"network", "latent"}, optional
        The gate (``VAE(symmetry_gate=kind)``).
    generator : torch.Generator, optional
        Draws the new decoder columns of the ``"latent"`` gate's coordinate.

    Returns
    -------
    VAE
        With ``symmetry_gate=kind``, in the mode of ``model`` (``provenance``, ``metrics``
        and checkpoint attributes are not copied).

    Raises
    ------
    GalgenInputError
        If ``model`` is not such a VAE, or ``kind`` is not a gate.

    Examples
    --------
    >>> vae = VAE(32, latent_dim=10, width=8, decoder="flux-shape", log_flux=(6.0, 1.0))
    >>> gated = add_symmetry_gate(vae)
    >>> from galgen.models.networks import point_reflect
    >>> with torch.no_grad():
    ...     z = torch.randn(3, 10)
    ...     before, after = vae.decode(z), gated.decode(z)
    >>> symmetric = 0.5 * (before + point_reflect(before))
    >>> bool(torch.allclose(after - symmetric, 0.5 * (before - symmetric), atol=1e-6))
    True
    >>> add_symmetry_gate(vae, "latent").latent_dim
    11
    """
    cfg = dict(model.config) if isinstance(model, VAE) else {}
    if cfg.get("decoder") != "flux-shape" or cfg.get("symmetry_gate"):
        raise GalgenInputError("model: adding a symmetry gate needs a VAE with decoder 'flux-shape' and no gate yet")
    if kind not in ("network", "latent"):
        raise GalgenInputError(f"kind: 'network' or 'latent', got {kind!r}")
    if kind == "latent":
        model = add_latents(model, 1, generator=generator)
        cfg = dict(model.config)
    new = VAE(**{**{k: v for k, v in cfg.items() if k != "kind"}, "symmetry_gate": kind})
    new = new.to(next(model.parameters()).device)
    state = {**new.state_dict(), **model.state_dict()}
    if kind == "latent":
        state["head.1.bias"] = state["head.1.bias"].clone()
        state["head.1.bias"][-1] = -4.0  # the last log-variance: the gate's coordinate
    new.load_state_dict(state)
    return new.train(model.training)


def add_latents(model: VAE, extra: int, scale: float = 0.1, generator: torch.Generator | None = None) -> VAE:
    """A copy of a trained VAE with ``extra`` more latent dimensions, to fine-tune from.

    The encoder's new means start at zero and its new log-variances at zero, so each new
    coordinate starts as its prior, N(0, 1), at no KL cost. Where the encoder's feature
    width grows with the latent size (``max(64, 4 * latent_dim)``), the new features start
    with small random input weights and zero weight in the posterior. Every decoder layer that reads
    the code gains input columns drawn as PyTorch's default ``nn.Linear`` initialisation
    times ``scale``: small enough that the copy draws nearly the same galaxies, and not zero,
    so that the decoder's gradient reaches the encoder's new rows (with zero columns the
    new coordinates would sit at a saddle where neither side learns). Every other weight is
    kept; the latent flow is new and unfitted (``galgen train`` fits it after training).
    With a latent symmetry gate (whose coordinate is the last), the new coordinates are
    inserted before the gate's, which stays the last; with a latent companion (whose
    coordinates come last, before a gate's), before the companion's, which keep their place
    at the end.

    Parameters
    ----------
    model : VAE
        A trained VAE.
    extra : int
        Latent dimensions to add (>= 1).
    scale : float, optional
        Factor on the new input columns' default initialisation.
    generator : torch.Generator, optional
        Draws the new columns.

    Returns
    -------
    VAE
        With ``latent_dim + extra`` dimensions, in the mode of ``model`` (``provenance``,
        ``metrics`` and checkpoint attributes are not copied).

    Raises
    ------
    GalgenInputError
        If ``model`` is not a VAE or ``extra`` is not a positive integer.

    Examples
    --------
    >>> vae = VAE(32, latent_dim=10, width=8, decoder="flux-shape", log_flux=(6.0, 1.0)).eval()
    >>> grown = add_latents(vae, 4).eval()
    >>> grown.latent_dim, grown.encode(torch.zeros(2, 32, 32)).stddev[:, 10:].tolist()
    (14, [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    >>> z = torch.randn(2, 10)
    >>> with torch.no_grad():
    ...     same = grown.decode(torch.cat([z, torch.zeros(2, 4)], 1))
    >>> bool(torch.allclose(same, vae.decode(z).detach()))
    True
    """
    if not isinstance(model, VAE):
        raise GalgenInputError(f"model: adding latents needs a VAE, got {type(model).__name__}")
    if isinstance(extra, bool) or not isinstance(extra, numbers.Integral) or extra < 1:
        raise GalgenInputError(f"extra: expected an integer >= 1, got {extra!r}")
    L, e = model.latent_dim, int(extra)
    # where the new coordinates go: before the coordinates that only the companion and the latent
    # gate read, which the model places last (companion, then gate) and which must keep their roles
    at = L - 1 if model.config.get("symmetry_gate") == "latent" else L
    if model.locator is not None:
        at = model.decoder.companion.start
    new = VAE(**{**{k: v for k, v in model.config.items() if k != "kind"}, "latent_dim": L + e})
    new = new.to(next(model.parameters()).device)
    old, state = model.state_dict(), new.state_dict()

    def uniform(rows, cols, fan_in, like):  # nn.Linear's default initialisation, times scale
        bound = scale / math.sqrt(fan_in)
        return ((torch.rand(rows, cols, generator=generator) * 2 - 1) * bound).to(like)

    # The encoder's feature width is max(64, 4 * latent_dim): new features get small random
    # input weights and zero weights into the posterior's head (alive, and silent at first).
    F, F2 = old["encoder.head.weight"].shape[0], state["encoder.head.weight"].shape[0]
    for key, target in state.items():
        if key.startswith("latent_flow."):
            continue  # refitted after training
        source = old[key]
        if key == "encoder.head.weight" and F2 > F:
            state[key] = torch.cat([source, uniform(F2 - F, source.shape[1], source.shape[1], source)])
        elif key == "encoder.head.bias" and F2 > F:
            state[key] = torch.cat([source, torch.zeros(F2 - F).to(source)])
        elif key.startswith("head."):  # the posterior's head: rows [mu (L), logvar (L)] -> [mu, 0, logvar, 0]
            if source.ndim == 2 and F2 > F:
                source = torch.cat([source[:, :F], torch.zeros(len(source), F2 - F).to(source), source[:, F:]], 1)
            rows = source.reshape(2, L, *source.shape[1:])
            pad = torch.zeros(2, e, *source.shape[1:], dtype=source.dtype, device=source.device)
            state[key] = torch.cat([rows[:, :at], pad, rows[:, at:]], 1).reshape(target.shape)
        elif source.shape != target.shape:  # a decoder layer reading [z, c]: new columns after z
            if source.ndim != 2 or target.shape[1] != source.shape[1] + e:
                raise GalgenInputError(f"model: cannot widen {key} from {tuple(source.shape)} to {tuple(target.shape)}")
            cols = uniform(target.shape[0], e, target.shape[1], source)
            state[key] = torch.cat([source[:, :at], cols, source[:, at:]], 1)
        else:
            state[key] = source
    new.load_state_dict(state)
    return new.train(model.training)


def add_companion(model: VAE, generator: torch.Generator | None = None) -> VAE:
    """A copy of a trained seed-latent VAE whose decoder also draws a companion, to fine-tune from.

    :func:`add_latents` adds the companion's
    :data:`~galgen.models.networks.COMPANION_COORDINATES` coordinates (before a latent
    gate's), which the encoder starts drawing from N(0, 1) and which no other part of
    the decoder reads; the companion (``VAE(companion=True)``) starts faint (flux fraction
    about 0.03 at ``z = 0``) wherever its position coordinates put it. The
    encoder gains a :class:`~galgen.models.networks.CompanionLocator` for the companion's
    position (a soft-argmax) and its other moments (a linear map of the located features,
    starting at zero). Every other weight is kept; the latent flow is new and unfitted.

    Parameters
    ----------
    model : VAE
        A trained VAE with the flux-shape decoder and ``seed_latents=True``, without a
        companion.
    generator : torch.Generator, optional
        Draws the decoder's new (unread) input columns.

    Returns
    -------
    VAE
        With ``latent_dim + COMPANION_COORDINATES`` dimensions and ``companion=True``, in
        the mode of ``model``.

    Raises
    ------
    GalgenInputError
        If ``model`` is not such a VAE.

    Examples
    --------
    >>> vae = VAE(32, latent_dim=12, width=8, decoder="flux-shape", log_flux=(6.0, 1.0),
    ...           seed_profile="bulge-disk", seed_latents=True).eval()
    >>> pair = add_companion(vae).eval()
    >>> pair.latent_dim, pair.config["companion"]
    (19, True)
    >>> z = torch.randn(2, 12)
    >>> with torch.no_grad():  # the companion's coordinates at -inf flux: the same galaxies
    ...     far = torch.tensor([[-1e3, 0, 0, 0, 0, 0, 0]]).expand(2, 7)
    ...     same = pair.decode(torch.cat([z, far], 1))
    >>> bool(torch.allclose(same, vae.decode(z), rtol=1e-5))
    True
    """
    cfg = model.config if isinstance(model, VAE) else {}
    if cfg.get("decoder") != "flux-shape" or not cfg.get("seed_latents") or cfg.get("companion"):
        raise GalgenInputError("model: add_companion needs a VAE with the flux-shape decoder and seed_latents=True "
                               f"and without a companion; got {type(model).__name__} with config {cfg!r}")
    new = _grown_with(model, COMPANION_COORDINATES, "companion", ("decoder.companion.", "locator"), generator)
    return new.train(model.training)


def _grown_with(model: VAE, extra: int, option: str, new_weights: tuple, generator) -> VAE:
    """``model`` with ``extra`` more latents (:func:`add_latents`) and the config ``option``
    switched on, every weight carried over; only those named ``new_weights*`` start anew."""
    grown = add_latents(model, extra, generator=generator)
    new = VAE(**{**{k: v for k, v in grown.config.items() if k != "kind"}, option: True})
    new = new.to(next(model.parameters()).device)
    missing, unexpected = new.load_state_dict(grown.state_dict(), strict=False)
    if unexpected or any(not k.startswith(new_weights) for k in missing):
        raise GalgenInputError(f"model: cannot carry its weights over (missing {missing}, unexpected {unexpected})")
    return new


def add_bulge_index(model: VAE, generator: torch.Generator | None = None) -> VAE:
    """A copy of a trained bulge + disk VAE whose bulges take any Sersic index, to fine-tune from.

    :func:`add_latents` adds one coordinate (before a companion's and a latent gate's),
    which only the bulge's Sersic index reads (``VAE(bulge_index=True)``: ``n = 4`` at 0).
    The encoder starts it at a posterior of mean 0 and standard deviation ``e^-2`` (0.14,
    ``n`` within about 0.3 of 4, at 1.5 nats of KL): at its prior, N(0, 1), the bulges
    of the first training steps would take indices of 2.8-5.0 within one sigma. So the copy
    draws its source's galaxies at the coordinate's mean. Every other weight is kept; the
    latent flow is new and unfitted.

    Parameters
    ----------
    model : VAE
        A trained VAE with the flux-shape decoder, ``seed_profile="bulge-disk"`` and
        ``seed_latents=True``, without a bulge index.
    generator : torch.Generator, optional
        Draws the decoder's new (unread) input columns.

    Returns
    -------
    VAE
        With ``latent_dim + 1`` dimensions and ``bulge_index=True``, in the mode of ``model``.

    Raises
    ------
    GalgenInputError
        If ``model`` is not such a VAE.

    Examples
    --------
    >>> vae = VAE(32, latent_dim=12, width=8, decoder="flux-shape", log_flux=(6.0, 1.0),
    ...           seed_profile="bulge-disk", seed_latents=True).eval()
    >>> grown = add_bulge_index(vae).eval()
    >>> grown.latent_dim, grown.config["bulge_index"]
    (13, True)
    >>> z = torch.randn(2, 12)
    >>> with torch.no_grad():  # the index's coordinate at 0: n = 4, the same galaxies
    ...     same = grown.decode(torch.cat([z, torch.zeros(2, 1)], 1))
    >>> bool(torch.allclose(same, vae.decode(z), rtol=1e-4, atol=1e-6))
    True
    """
    cfg = model.config if isinstance(model, VAE) else {}
    if cfg.get("decoder") != "flux-shape" or cfg.get("seed_profile") != "bulge-disk" or not cfg.get("seed_latents") \
            or cfg.get("bulge_index"):
        raise GalgenInputError("model: add_bulge_index needs a VAE with the flux-shape decoder, seed_profile="
                               f"'bulge-disk' and seed_latents=True, without a bulge index; got "
                               f"{type(model).__name__} with config {cfg!r}")
    new = _grown_with(model, 1, "bulge_index", ("decoder.bulge_index.",), generator)
    with torch.no_grad():  # the new coordinate's posterior: N(0, e^-4) rather than N(0, 1)
        new.head[1].bias[new.latent_dim + new.decoder.bulge_index.start] = -4.0
    return new.train(model.training)


def _latent_companion(model) -> SeedCoordinates | None:
    """The companion of a VAE's flux-shape decoder, if its parameters are latent coordinates."""
    dec = model.decoder if isinstance(model, VAE) else None
    comp = dec.companion if isinstance(dec, FluxShapeGenerator) else None
    return comp if isinstance(comp, SeedCoordinates) else None


def _companion_h_to_z(companion, h: torch.Tensor) -> torch.Tensor:
    """The coordinates ``z`` whose companion parameters (:class:`SeedCoordinates`) are ``h``."""
    return (h - companion.loc) / companion.log_scale.exp()


def _companion_position_z(companion, size: int, offset: torch.Tensor) -> torch.Tensor:
    """The position coordinates ``z[1:3]`` of a companion at ``offset`` ``(B, 2)`` (x, y intrinsic
    pixels from the centre pixel), inverting ``a tanh(h / a)``, ``a = size / 2 - 1``, inside
    the grid; the decoder's ``loc`` and ``scale`` held fixed (no gradient reaches them)."""
    a = size / 2 - 1
    h = a * torch.atanh(offset.clamp(-0.999 * a, 0.999 * a) / a)
    return (h - companion.loc.detach()[1:3]) / companion.log_scale.detach()[1:3].exp()


@torch.no_grad()
def companion_codes(model: VAE, batch: Batch, smoothing: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Companion coordinates that put each galaxy's companion on the brightest source in its residual.

    Each galaxy is reconstructed without its companion (the encoder's mean, the companion's
    flux fraction at ``sigmoid(-30)``, a latent gate at :meth:`VAE.gate_posterior`'s
    weight) and observed; the residual ``observed - model`` is filtered with a Gaussian of
    ``smoothing`` detector pixels and divided by the filtered noise
    (``sqrt(K^2 * variance)``), a matched filter for a source of about that size. Its
    highest peak (two pixels or more from the edge) is the source: its position is the
    residual's centroid over the 3 x 3 pixels about the peak, its flux the residual's sum
    within ``3 smoothing`` pixels, and its flux fraction ``flux / (model flux + flux)``
    (clipped to ``[1e-3, 0.6]``). The companion's other parameters (size, shear, index)
    are left at ``z = 0``. :func:`warm_start_companion` teaches the encoder these codes, so
    that ELBO training starts with companions where the data have them: from ``z = 0``
    the companion starts faint at the centre, and its gradient never reaches a galaxy
    beyond its light (a fine-tune of 400 steps from :func:`add_companion` faded it to a
    flux fraction of 0.007 in every galaxy).

    Parameters
    ----------
    model : VAE
        With the flux-shape decoder, ``seed_latents`` and a companion (:func:`add_companion`).
    batch : Batch
        Observed galaxies with their observation (PSF, noise).
    smoothing : float, optional
        Sigma of the matched filter, detector pixels.

    Returns
    -------
    codes : torch.Tensor
        ``(B, COMPANION_COORDINATES)`` float32: the companion's latent coordinates.
    significance : torch.Tensor
        ``(B,)`` float32: the source's matched-filter signal-to-noise ratio.

    Raises
    ------
    GalgenInputError
        If the model has no latent-coordinate companion.
    """
    dec = model.decoder
    comp = _latent_companion(model)
    if comp is None:
        raise GalgenInputError("model: companion_codes needs a VAE with a companion in latent coordinates "
                               "(seed_latents=True, companion=True; galgen.models.add_companion)")
    obs = batch.observation
    mu, _ = model.encoder_moments(batch.observed, batch.cond)
    z = mu.float().clone()
    h = comp.loc.expand(len(z), -1).clone()
    h[:, 0] = -30.0  # no companion
    z[:, comp.start:comp.start + comp.k] = _companion_h_to_z(comp, h)
    z = model.with_best_gate(z, batch)
    intrinsic = model.decode(z, batch.cond).float()
    recon = obs.noiseless(intrinsic)
    observed = batch.observed.to(recon.dtype)
    var = obs.noise.variance(recon)
    good = torch.isfinite(var) & (var > 0)
    r, var = torch.where(good, observed - recon, 0.0), torch.where(good, var, 0.0)
    radius = max(1, math.ceil(3 * smoothing))
    t = torch.arange(-radius, radius + 1, dtype=recon.dtype, device=recon.device)
    k1 = torch.exp(-0.5 * (t / smoothing) ** 2)
    k = (k1[:, None] * k1[None, :])[None, None]
    signal = torch.nn.functional.conv2d(r[:, None], k, padding=radius)[:, 0]
    noise = torch.nn.functional.conv2d(var[:, None], k * k, padding=radius)[:, 0].clamp_min(1e-30).sqrt()
    snr = signal / noise
    B, S = snr.shape[0], snr.shape[-1]
    snr[:, :2], snr[:, -2:], snr[:, :, :2], snr[:, :, -2:] = -math.inf, -math.inf, -math.inf, -math.inf
    significance, at = snr.flatten(1).max(1)
    py, px = at // S, at % S
    pix = torch.arange(S, device=recon.device)
    dy, dx = pix[None, :, None] - py[:, None, None], pix[None, None, :] - px[:, None, None]
    near = (dy.abs() <= 1) & (dx.abs() <= 1)
    weight = torch.where(near, signal.clamp_min(0), 0.0)
    total = weight.sum((1, 2)).clamp_min(1e-30)
    cy = py + (weight * dy).sum((1, 2)) / total
    cx = px + (weight * dx).sum((1, 2)) / total
    flux = torch.where(dy**2 + dx**2 <= (3 * smoothing) ** 2, r, 0.0).sum((1, 2)).clamp_min(0)
    fraction = (flux / (intrinsic.sum((1, 2)) + flux).clamp_min(1e-30)).clamp(1e-3, 0.6)
    offset = (torch.stack([cx, cy], 1).to(recon.dtype) - float(S // 2)) * (dec.size // S)  # intrinsic pixels
    h = comp.loc.expand(B, -1).clone()
    h[:, 0] = torch.logit(fraction)
    z = _companion_h_to_z(comp, h)
    z[:, 1:3] = _companion_position_z(comp, dec.size, offset)
    return z.float(), significance.float()


def warm_start_companion(model: VAE, loader, *, epochs: int = 3, batch_size: int = 64, lr: float = 1e-3,
                         threshold: float = 20.0, smoothing: float = 1.5, generator: torch.Generator | None = None,
                         log=None) -> dict:
    """Teach a VAE's encoder where each galaxy's companion is, before ELBO training (in place).

    The targets are :func:`companion_codes` of every galaxy in ``loader`` (computed once,
    with the model as it is) as posterior means: the flux fraction times
    ``sigmoid(2 (snr - threshold))`` (at least 1e-3, so that it fades continuously below
    the threshold), the position where the residual source has a signal-to-noise ratio of
    at least ``threshold`` (weighted by ``min(snr / threshold, 4)``: the bright companions
    first; elsewhere the position is not trained), size, shear and index
    at 0; and log-variances -4 for the flux fraction, -6 for the position, 0 for the
    rest. The encoder and its :class:`~galgen.models.networks.CompanionLocator` are
    trained by Adam on the squared error to these targets plus the squared error of every
    other posterior mean and log-variance to the encoder's outputs before it started (so
    the rest of each code stays where it was). The decoder is not touched.

    Parameters
    ----------
    model : VAE
        With a latent-coordinate companion (:func:`add_companion`).
    loader : galgen.data.ObservationLoader
        The training galaxies.
    epochs, batch_size, lr : optional
        Passes over the galaxies (shuffled), batch size, Adam's learning rate.
    threshold : float, optional
        Least matched-filter signal-to-noise ratio of a companion.
    smoothing : float, optional
        Matched filter's sigma, detector pixels.
    generator : torch.Generator, optional
        Shuffles the galaxies.
    log : callable, optional
        Called with a progress line at the end of every epoch.

    Returns
    -------
    dict
        ``found`` (fraction of galaxies given a companion), ``loss`` (the mean loss of
        the last epoch), ``steps``.

    Raises
    ------
    GalgenInputError
        If the model has no latent-coordinate companion.
    """
    comp = _latent_companion(model)
    if comp is None:
        raise GalgenInputError("model: warm_start_companion needs a VAE with a companion in latent coordinates")
    was_training = model.training
    model.eval()
    n = len(loader)
    own = slice(comp.start, comp.start + comp.k)
    codes, sig, mu0, lv0 = [], [], [], []
    for batch in loader.iter_batches(256):
        c, s = companion_codes(model, batch, smoothing=smoothing)
        with torch.no_grad():
            m, v = model.encoder_moments(batch.observed, batch.cond)
        codes.append(c), sig.append(s), mu0.append(m.float()), lv0.append(v.float())
    codes, sig, mu0, lv0 = (torch.cat(t) for t in (codes, sig, mu0, lv0))
    found = sig >= threshold
    with torch.no_grad():  # the flux fraction fades out below the threshold, continuously
        fraction = torch.sigmoid(comp.loc[0] + comp.log_scale[0].exp() * codes[:, 0])
        fraction = (fraction * torch.sigmoid(2 * (sig - threshold))).clamp_min(1e-3)
        codes[:, 0] = (torch.logit(fraction) - comp.loc[0]) / comp.log_scale[0].exp()
    target_mu, target_lv = mu0.clone(), lv0.clone()
    target_mu[:, own] = codes
    target_lv[:, own] = 0.0
    target_lv[:, comp.start], target_lv[:, comp.start + 1:comp.start + 3] = -4.0, -6.0
    # the position is learned where there is a companion (the brighter, the more), elsewhere left free
    weight = torch.ones_like(target_mu)
    weight[:, comp.start + 1:comp.start + 3] = (found * (sig / threshold).clamp(max=4.0))[:, None].to(weight)
    params = [p for name, p in model.named_parameters() if not name.startswith(("decoder.", "latent_flow."))]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    steps, last = 0, float("nan")
    for epoch in range(int(epochs)):
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            rows = order[i:i + batch_size]
            batch = loader.batch(rows)
            mu, lv = model.encoder_moments(batch.observed, batch.cond)
            rows = rows.to(codes.device)
            err = weight[rows] * (mu.float() - target_mu[rows]) ** 2 + (lv.float() - target_lv[rows]) ** 2
            loss = err.sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count, steps = total + float(loss.detach()) * len(rows), count + len(rows), steps + 1
        last = total / count
        if log is not None:
            log(f"companion warm start: epoch {epoch + 1}/{epochs}, loss {last:.4f}, "
                f"{float(found.float().mean()):.3f} of the galaxies with a companion")
    model.train(was_training)
    return {"found": float(found.float().mean()), "loss": last, "steps": steps}
