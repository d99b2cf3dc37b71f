"""Amortised posterior proposals: a conditional normalizing flow trained on the model's own prior predictive.

The posterior of a deep prior's latent code is far from Gaussian: along the directions
an image barely constrains it follows the flow prior, curved and multimodal, so that a
proposal about one mode (the Laplace approximation) misses much of its mass
(docs/inference.md). :class:`AmortizedPosterior` is a neural posterior estimator: a
conditional neural spline flow ``q(z, s | image, PSF, noise)`` over the latent code and
the log flux scale, trained by maximum likelihood on simulations from the model itself
(``z`` from its prior, ``s`` from ``N(0, log_scale_sd^2)``, the decoded galaxy observed
through the PSFs and noise of real cutouts; :func:`train_amortized_posterior`). Trained
on the forward KL divergence, the flow covers every mode of the posterior rather than
seeking one (the reverse-KL fit of a VAE's own encoder is too narrow to propose from).

It is used as an importance-sampling proposal, not as the posterior itself:
:func:`galgen.inference.sample_posterior` draws from a defensive mixture of the flow and
the Student-t about the Laplace approximation and weights every draw by the exact
physics likelihood times the prior, with PSIS diagnostics, so that an imperfect flow
costs effective samples, never correctness.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import load_checkpoint, save_checkpoint
from ..errors import GalgenInputError
from ..models.base import sample_latents
from ..models.networks import Encoder
from ..models.prior import LatentFlowPrior

__all__ = ["AmortizedPosterior", "train_amortized_posterior", "observation_features", "load_amortized_posterior",
           "amortized_proposal", "attach_amortized_posterior", "attached_amortized_posterior", "AMORTIZED_KIND"]

log = logging.getLogger("galgen.amortized")

#: ``kind`` of an amortised-posterior checkpoint.
AMORTIZED_KIND = "amortized-posterior"

#: Scalar features of an observation fed to the flow's context (see :func:`observation_features`).
N_SCALAR_FEATURES = 5


def _psf_moments(psf: torch.Tensor, scale: float) -> torch.Tensor:
    """Size (arcsec, ``sqrt((Ixx + Iyy) / 2)``) and ellipticity ``e1, e2`` of unit-sum PSFs ``(..., P, P)``."""
    p = psf.double()
    p = p / p.sum((-2, -1), keepdim=True)
    n = p.shape[-1]
    c = torch.arange(n, dtype=p.dtype, device=p.device) - n // 2
    y, x = c[:, None], c[None, :]
    mx, my = (p * x).sum((-2, -1)), (p * y).sum((-2, -1))
    ixx = (p * x * x).sum((-2, -1)) - mx * mx
    iyy = (p * y * y).sum((-2, -1)) - my * my
    ixy = (p * x * y).sum((-2, -1)) - mx * my
    tr = (ixx + iyy).clamp(min=1e-12)
    return torch.stack([(0.5 * tr).sqrt() * scale, (ixx - iyy) / tr, 2 * ixy / tr], -1)


def observation_features(observed: torch.Tensor, observation) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of an amortised posterior: a noise-scaled image and five scalars per galaxy.

    Parameters
    ----------
    observed : torch.Tensor
        ``(B, S, S)`` observed cutouts (ADU).
    observation : galgen.physics.Observation
        Their PSFs and noise model.

    Returns
    -------
    image : torch.Tensor
        ``(B, S, S)``: ``asinh(observed / (3 sigma))``, ``sigma`` the median noise
        standard deviation of the empty stamp.
    scalars : torch.Tensor
        ``(B, 5)``: ``log sigma``, ``asinh`` of the stamp's total flux in units of
        ``sigma * S``, and the PSF's size (arcsec) and ellipticity ``e1, e2``.
    """
    B, S = observed.shape[0], observed.shape[-1]
    if observation.noise is None:
        raise GalgenInputError("observation: an amortised posterior needs the noise model of the observation")
    var = observation.noise.variance(torch.zeros_like(observed))
    sigma = var.reshape(var.shape[0] if var.ndim == 3 else 1, -1).median(1).values.clamp(min=1e-30).sqrt()
    sigma = sigma.expand(B).to(observed.dtype)
    image = torch.asinh(observed / (3 * sigma[:, None, None]))
    flux = torch.asinh(observed.sum((-2, -1)) / (sigma * S))
    psf = _psf_moments(observation.psf, observation.intrinsic_scale).to(observed.dtype)
    psf = psf.expand(B, 3) if psf.ndim == 1 else psf
    return image, torch.cat([sigma.log()[:, None], flux[:, None], psf], 1)


class AmortizedPosterior(nn.Module):
    """A conditional neural spline flow ``q(z, s | observed, PSF, noise)`` for one model.

    The context of the flow is a small convolutional embedding of the noise-scaled image,
    the scalars of :func:`observation_features` and, for a model with an encoder (a VAE),
    the mean and log variance of its ``q(z | x)``.

    Parameters
    ----------
    stamp : int
        Detector stamp size of the observations.
    latent_dim : int
        The model's latent dimension (the flow is over ``latent_dim + 1`` values: ``z``
        and the log flux scale ``s``).
    encoder_features : int, optional
        Features of the model's encoder fed to the context (``2 * latent_dim`` for a
        VAE's mean and log variance; 0: none).
    width : int, optional
        Channels of the embedding's first level.
    embed : int, optional
        Size of the image embedding.
    crop : int, optional
        The embedding sees the central ``crop x crop`` pixels of the image (galaxies
        are small; the encoder features and the total flux cover the whole stamp).
    context : int, optional
        Size of the flow's context vector.
    transforms : int, optional
        Spline transforms of the flow.
    hidden : sequence of int, optional
        Hidden layers of each transform's network.
    log_scale_sd : float, optional
        Standard deviation of the log flux scale ``s`` of the training simulations (the
        fits' ``s`` has a flat prior; a broad training distribution keeps the flow at
        least as wide as the posterior along ``s``).

    Examples
    --------
    >>> q = AmortizedPosterior(32, 4, transforms=2, hidden=(16,))
    >>> q.flow.features, q.config["latent_dim"]
    (5, 4)
    """

    def __init__(self, stamp: int, latent_dim: int, *, encoder_features: int = 0, width: int = 8, embed: int = 64,
                 crop: int = 32, context: int = 64, transforms: int = 4, hidden=(128, 128), log_scale_sd: float = 1.0):
        super().__init__()
        self.config = dict(kind=AMORTIZED_KIND, stamp=int(stamp), latent_dim=int(latent_dim),
                           encoder_features=int(encoder_features), width=int(width), embed=int(embed),
                           crop=min(int(crop), int(stamp)), context=int(context), transforms=int(transforms), hidden=[int(h) for h in hidden],
                           log_scale_sd=float(log_scale_sd))
        self.embedding = Encoder(self.config["crop"], int(embed), width=int(width), max_width=64)
        n_in = int(embed) + N_SCALAR_FEATURES + int(encoder_features)
        self.context_net = nn.Sequential(nn.Linear(n_in, 128), nn.SiLU(), nn.Linear(128, int(context)))
        self.flow = LatentFlowPrior(int(latent_dim) + 1, context=int(context), kind="nsf",
                                    transforms=int(transforms), hidden=tuple(hidden))
        n_feat = N_SCALAR_FEATURES + int(encoder_features)
        self.register_buffer("feature_mean", torch.zeros(n_feat))
        self.register_buffer("feature_std", torch.ones(n_feat))
        self.register_buffer("trained_steps", torch.tensor(0))

    def check_model(self, model):
        """Raise unless ``model`` is the kind of model this flow was built for.

        Parameters
        ----------
        model : galgen.models.LatentModel
        """
        d = int(getattr(model, "latent_dim", -1))
        if d != self.config["latent_dim"]:
            raise GalgenInputError(f"amortised posterior: built for latent_dim {self.config['latent_dim']}, "
                                   f"the model has {d}")
        if getattr(model, "cond_dim", 0):
            raise GalgenInputError("amortised posterior: conditional models are not supported")
        if self.config["encoder_features"] and not hasattr(model, "encoder_moments"):
            raise GalgenInputError("amortised posterior: built on a model with an encoder; this one has none")

    def _raw_features(self, model, observed, observation):
        image, scalars = observation_features(observed, observation)
        feats = [scalars]
        if self.config["encoder_features"]:
            mu, logvar = model.encoder_moments(observed)
            feats += [mu, logvar]
        return image, torch.cat([f.to(image.dtype) for f in feats], 1)

    def context(self, model, observed: torch.Tensor, observation) -> torch.Tensor:
        """The flow's context vector of each observed galaxy.

        Parameters
        ----------
        model : galgen.models.LatentModel
            The model whose posterior is approximated (its encoder feeds the context).
        observed : torch.Tensor
            ``(B, S, S)``.
        observation : galgen.physics.Observation
            Of the ``B`` galaxies.

        Returns
        -------
        torch.Tensor
            ``(B, context)``.
        """
        dtype = self.feature_mean.dtype
        image, feats = self._raw_features(model, observed.to(dtype), observation)
        feats = (feats.to(dtype) - self.feature_mean) / self.feature_std
        c, S = self.config["crop"], image.shape[-1]
        a = S // 2 - c // 2
        image = image[:, a:a + c, a:a + c]
        return self.context_net(torch.cat([self.embedding(image.to(dtype)), feats], 1))

    def log_prob(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``log q(x | context)`` of rows ``x = (z, s)``.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, latent_dim + 1)``.
        context : torch.Tensor
            ``(N, context)``.

        Returns
        -------
        torch.Tensor
            ``(N,)`` nats.
        """
        return self.flow.log_prob(x, context)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, n: int, generator: torch.Generator | None = None):
        """``n`` draws of ``(z, s)`` per galaxy and their log density.

        Parameters
        ----------
        context : torch.Tensor
            ``(B, context)``.
        n : int
            Draws per galaxy.
        generator : torch.Generator, optional

        Returns
        -------
        x : torch.Tensor
            ``(B, n, latent_dim + 1)`` (float64).
        log_q : torch.Tensor
            ``(B, n)`` (float64).
        """
        B = context.shape[0]
        ctx = context.repeat_interleave(int(n), 0)
        x = sample_latents(self.flow.distribution(ctx), B * int(n), generator=generator)
        lq = self.flow.log_prob(x, ctx)
        k = x.shape[-1]
        return x.double().view(B, int(n), k), lq.double().view(B, int(n))

    def save(self, path, *, provenance: dict | None = None, metrics: dict | None = None):
        """Write the flow as a galgen checkpoint (atomic; read with :func:`load_amortized_posterior`).

        Parameters
        ----------
        path : str or os.PathLike
        provenance, metrics : dict, optional
            JSON-serialisable records kept with the weights.

        Returns
        -------
        pathlib.Path
        """
        return save_checkpoint(path, model_state=self.state_dict(), config=self.config,
                               step=int(self.trained_steps), provenance=provenance, metrics=metrics)


def load_amortized_posterior(path, *, device="cpu") -> AmortizedPosterior:
    """Read an :class:`AmortizedPosterior` checkpoint (``torch.load(weights_only=True)``).

    Parameters
    ----------
    path : str or os.PathLike
    device : str or torch.device, optional

    Returns
    -------
    AmortizedPosterior
        In eval mode.
    """
    ck = load_checkpoint(path, map_location=device)
    cfg = dict(ck["config"])
    if cfg.pop("kind", None) != AMORTIZED_KIND:
        raise GalgenInputError(f"{path}: not an amortised-posterior checkpoint")
    q = AmortizedPosterior(cfg.pop("stamp"), cfg.pop("latent_dim"), **cfg)
    q.load_state_dict(ck["model"])
    return q.to(device).eval()


class _Proposal:
    """An amortised posterior conditioned on a batch of galaxies, in the form importance sampling takes."""

    def __init__(self, q, context):
        self.q, self.context = q, context

    def draw(self, idx, n, generator=None):
        return self.q.sample(self.context[idx], n, generator)

    @torch.no_grad()
    def log_prob(self, idx, x):
        m, n, k = x.shape
        ctx = self.context[idx].repeat_interleave(n, 0)
        return self.q.log_prob(x.reshape(m * n, k).to(self.context.dtype), ctx).double().view(m, n)


@torch.no_grad()
def amortized_proposal(q: AmortizedPosterior, model, observed: torch.Tensor, observation):
    """The proposal :func:`~galgen.inference.importance.importance_sample` mixes in, for a batch.

    Parameters
    ----------
    q : AmortizedPosterior
    model : galgen.models.LatentModel
    observed : torch.Tensor
        ``(B, S, S)``.
    observation : galgen.physics.Observation

    Returns
    -------
    object
        With ``draw(idx, n, generator)`` and ``log_prob(idx, x)`` over galaxies ``idx``.
    """
    q.check_model(model)
    q = q.to(observed.device).eval()
    return _Proposal(q, q.context(model, observed, observation))


def attach_amortized_posterior(model, q: AmortizedPosterior | None):
    """Keep an amortised posterior with a model (not as a submodule: the model's weights are unchanged).

    :func:`galgen.inference.sample_posterior` and ``galgen fit`` mix it into the
    importance-sampling proposal of the model's posteriors.

    Parameters
    ----------
    model : torch.nn.Module
    q : AmortizedPosterior or None
        None detaches.

    Returns
    -------
    torch.nn.Module
        ``model``.
    """
    if q is not None:
        q.check_model(model)
    model.__dict__["_amortized_posterior"] = q
    return model


def attached_amortized_posterior(model) -> AmortizedPosterior | None:
    """The amortised posterior kept with a model by :func:`attach_amortized_posterior`, or None.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    AmortizedPosterior or None
    """
    return model.__dict__.get("_amortized_posterior")


def _decode_bank(model, n, batch, generator, log_every=None):
    """``n`` latent codes from the model's prior and their decoded intrinsic images."""
    zs, imgs = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, n, batch):
            z = sample_latents(model.prior(), min(batch, n - a), generator=generator).float()
            zs.append(z)
            imgs.append(model.decode(z).float())
            if log_every and (a // batch) % log_every == 0:
                log.info("bank: %d / %d decoded (%.0f s)", a + len(z), n, time.perf_counter() - t0)
    return torch.cat(zs), torch.cat(imgs)


def train_amortized_posterior(model, observation, *, steps: int = 3000, batch_size: int = 256,
                              bank: int = 50_000, lr: float = 1e-3, seed: int = 0, posterior=None,
                              out=None, checkpoint_every: int = 250, log_every: int = 50,
                              progress=None, **options) -> AmortizedPosterior:
    """Train an :class:`AmortizedPosterior` for a model on its own prior predictive.

    ``bank`` latent codes are drawn from the model's prior and decoded once; every step
    takes ``batch_size`` of them, multiplies each by ``exp(s)``, ``s ~ N(0,
    log_scale_sd^2)``, observes it through the PSF and noise of a random galaxy of
    ``observation`` with fresh noise, and takes an Adam step (cosine learning rate) on
    ``-log q(z, s | observed)``.

    Parameters
    ----------
    model : galgen.models.LatentModel
        Unconditional, in eval mode; its weights are not changed.
    observation : galgen.physics.Observation
        A pool of per-galaxy PSFs and noise (e.g. :func:`galgen.data.observation_from_cutouts`
        of a simulated or ingested file that is not the one to be fitted).
    steps, batch_size : int, optional
    bank : int, optional
        Decoded prior draws (each is reused with new PSFs, noise and flux scales).
    lr : float, optional
        Peak Adam learning rate.
    seed : int, optional
    posterior : AmortizedPosterior, optional
        A flow to continue training (default: a new one with ``options``).
    out : str or os.PathLike, optional
        Checkpoint written every ``checkpoint_every`` steps and at the end; if it exists
        with the same settings, training resumes from it (the bank is redrawn from the
        seed).
    checkpoint_every, log_every : int, optional
    progress : callable, optional
        ``progress(step, loss)`` after every logged step.
    **options
        :class:`AmortizedPosterior` options (``width``, ``embed``, ``context``,
        ``transforms``, ``hidden``, ``log_scale_sd``).

    Returns
    -------
    AmortizedPosterior
        In eval mode, with ``trained_steps == steps``.
    """
    if observation.batch_size is None:
        raise GalgenInputError("observation: needs per-galaxy PSFs or noise (a pool to draw observations from)")
    dev = observation.psf.device
    stamp = observation.stamp or model.config["stamp"]
    enc = 2 * int(model.latent_dim) if hasattr(model, "encoder_moments") else 0
    q = posterior if posterior is not None else AmortizedPosterior(stamp, int(model.latent_dim),
                                                                   encoder_features=enc, **options)
    q.check_model(model)
    q = q.to(dev)
    settings = dict(steps=int(steps), batch_size=int(batch_size), bank=int(bank), lr=float(lr), seed=int(seed))
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / 100) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))))
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    z_bank, img_bank = _decode_bank(model, int(bank), 256, gen, log_every=20)
    sd = q.config["log_scale_sd"]
    n_pool = observation.batch_size
    start = 0
    if out is not None and Path(out).exists():
        ck = load_checkpoint(out, map_location=dev)
        if ck["config"] != q.config or ck["provenance"].get("settings") != settings:
            raise GalgenInputError(f"{out}: a checkpoint of other settings; remove it or choose another --out")
        q.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"]["adam"])
        sched.load_state_dict(ck["optimizer"]["schedule"])
        gen.set_state(ck["rng_state"].cpu())
        start = int(ck["step"])
        log.info("resumed from %s at step %d", out, start)

    def batch(g):
        idx = torch.randint(len(z_bank), (batch_size,), generator=g, device=dev)
        obs = observation.select(torch.randint(n_pool, (batch_size,), generator=g, device=dev))
        s = sd * torch.randn(batch_size, generator=g, device=dev)
        with torch.no_grad():
            _, noisy = obs.observe(img_bank[idx] * s.exp()[:, None, None], generator=g)
        return torch.cat([z_bank[idx], s[:, None]], 1), noisy, obs

    if start == 0:  # standardise the context scalars and the targets on a first batch
        x0, noisy0, obs0 = batch(torch.Generator(device=dev).manual_seed(int(seed) + 1))
        with torch.no_grad():
            _, f = q._raw_features(model, noisy0, obs0)
            q.feature_mean.copy_(f.mean(0))
            q.feature_std.copy_(f.std(0).clamp(min=1e-3))
            q.flow.z_mean.copy_(torch.cat([z_bank.mean(0), z_bank.new_zeros(1)]))
            q.flow.z_std.copy_(torch.cat([z_bank.std(0), z_bank.new_full((1,), sd)]))

    def save(step, metrics):
        if out is None:
            return
        q.trained_steps.fill_(step)
        save_checkpoint(out, model_state=q.state_dict(), config=q.config, step=step,
                        optimizer_state={"adam": opt.state_dict(), "schedule": sched.state_dict()},
                        provenance={"settings": settings}, metrics=metrics, rng_state=gen.get_state())

    q.train()
    running, t0 = None, time.perf_counter()
    for step in range(start, int(steps)):
        x, noisy, obs = batch(gen)
        loss = -q.log_prob(x, q.context(model, noisy, obs)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(q.parameters(), 10.0)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if (step + 1) % log_every == 0:
            log.info("step %d: loss %.3f (running %.3f), %.2f s/step", step + 1, lv, running,
                     (time.perf_counter() - t0) / (step + 1 - start))
            if progress is not None:
                progress(step + 1, running)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1, {"loss": running})
    q.trained_steps.fill_(int(steps))
    return q.eval()
