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
from ..models.base import encoder_input, sample_latents
from ..models.networks import Encoder
from ..models.prior import LatentFlowPrior

__all__ = ["AmortizedPosterior", "train_amortized_posterior", "observation_features", "encoder_features", "load_amortized_posterior",
           "amortized_proposal", "multimodal_laplace", "attach_amortized_posterior", "attached_amortized_posterior", "AMORTIZED_KIND"]

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
    sigma = observation.noise.sky_variance(observed).clamp(min=1e-30).sqrt().to(observed.dtype)
    image = torch.asinh(observed / (3 * sigma[:, None, None]))
    flux = torch.asinh(observed.sum((-2, -1)) / (sigma * S))
    psf = _psf_moments(observation.psf, observation.intrinsic_scale).to(observed.dtype)
    psf = psf.expand(B, 3) if psf.ndim == 1 else psf
    return image, torch.cat([sigma.log()[:, None], flux[:, None], psf], 1)


def encoder_features(model, observed: torch.Tensor, observation=None) -> torch.Tensor | None:
    """The model's amortised guess of ``z`` as features: its mean and, for a distribution, log variance.

    Parameters
    ----------
    model : galgen.models.LatentModel
        Through the contract's ``encode`` (unconditional).
    observed : torch.Tensor
        ``(B, S, S)``.
    observation : galgen.physics.Observation, optional
        Their PSFs and noise: images deeper than the encoder's training data are
        noise-matched first (:func:`galgen.models.encoder_input`).

    Returns
    -------
    torch.Tensor or None
        ``(B, d)`` or ``(B, 2 d)``; None for a model without an encoder.
    """
    guess = model.encode(encoder_input(model, observed, observation), None)
    if guess is None:
        return None
    if not isinstance(guess, torch.distributions.Distribution):
        return guess
    feats = [guess.mean]
    try:
        feats.append(guess.variance.clamp(min=1e-30).log())
    except NotImplementedError:
        pass
    return torch.cat(feats, 1)


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
    temperature : float, optional
        Scale of the base noise when proposing (:func:`amortized_proposal`).

    Examples
    --------
    >>> q = AmortizedPosterior(32, 4, transforms=2, hidden=(16,))
    >>> q.flow.features, q.config["latent_dim"]
    (5, 4)
    """

    def __init__(self, stamp: int, latent_dim: int, *, encoder_features: int = 0, width: int = 8, embed: int = 64,
                 crop: int = 32, context: int = 64, transforms: int = 4, hidden=(128, 128),
                 log_scale_sd: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.config = dict(kind=AMORTIZED_KIND, stamp=int(stamp), latent_dim=int(latent_dim),
                           encoder_features=int(encoder_features), width=int(width), embed=int(embed),
                           crop=min(int(crop), int(stamp)), context=int(context), transforms=int(transforms), hidden=[int(h) for h in hidden],
                           log_scale_sd=float(log_scale_sd), temperature=float(temperature))
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
        d = int(model.latent_dim)
        if d != self.config["latent_dim"]:
            raise GalgenInputError(f"amortised posterior: built for latent_dim {self.config['latent_dim']}, "
                                   f"the model has {d}")

    def _raw_features(self, model, observed, observation):
        image, scalars = observation_features(observed, observation)
        feats = [scalars]
        if self.config["encoder_features"]:
            enc = encoder_features(model, observed, observation)
            if enc is None or enc.shape[1] != self.config["encoder_features"]:
                raise GalgenInputError(f"amortised posterior: built on a model whose encoder gives "
                                       f"{self.config['encoder_features']} features; this one gives "
                                       f"{0 if enc is None else enc.shape[1]}")
            feats.append(enc)
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

    def log_prob(self, x: torch.Tensor, context: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``log q(x | context)`` of rows ``x = (z, s)``.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, latent_dim + 1)``.
        context : torch.Tensor
            ``(N, context)``.
        temperature : float, optional
            Of the flow whose base noise is ``N(0, temperature^2 I)`` (wider tails than
            the trained flow for ``> 1``; see :meth:`sample`).

        Returns
        -------
        torch.Tensor
            ``(N,)`` nats.
        """
        lq = self.flow.log_prob(x, context)
        if temperature == 1.0:
            return lq
        u = self.flow.distribution(context).transform(x.to(self.flow.z_mean.dtype))
        t2 = float(temperature) ** 2
        return lq + (0.5 * (u * u).sum(-1) * (1 - 1 / t2) - u.shape[-1] * math.log(temperature)).to(lq.dtype)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, n: int, generator: torch.Generator | None = None,
               temperature: float = 1.0):
        """``n`` draws of ``(z, s)`` per galaxy and their log density.

        Parameters
        ----------
        context : torch.Tensor
            ``(B, context)``.
        n : int
            Draws per galaxy.
        generator : torch.Generator, optional
        temperature : float, optional
            Scale of the flow's Gaussian base noise: ``> 1`` widens the proposal's tails,
            which keeps importance weights bounded where the flow is a little too narrow.

        Returns
        -------
        x : torch.Tensor
            ``(B, n, latent_dim + 1)`` (float64).
        log_q : torch.Tensor
            ``(B, n)`` (float64).
        """
        B = context.shape[0]
        ctx = context.repeat_interleave(int(n), 0)
        x = sample_latents(self.flow.distribution(ctx), B * int(n), generator=generator, temperature=temperature)
        lq = self.log_prob(x, ctx, temperature)
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

    def __init__(self, q, context, temperature):
        self.q, self.context, self.temperature = q, context, float(temperature)

    def draw(self, idx, n, generator=None):
        return self.q.sample(self.context[idx], n, generator, self.temperature)

    @torch.no_grad()
    def log_prob(self, idx, x):
        m, n, k = x.shape
        ctx = self.context[idx].repeat_interleave(n, 0)
        return self.q.log_prob(x.reshape(m * n, k).to(self.context.dtype), ctx,
                               self.temperature).double().view(m, n)


@torch.no_grad()
def amortized_proposal(q: AmortizedPosterior, model, observed: torch.Tensor, observation,
                       temperature: float | None = None):
    """The proposal :func:`~galgen.inference.importance.importance_sample` mixes in, for a batch.

    Parameters
    ----------
    q : AmortizedPosterior
    model : galgen.models.LatentModel
    observed : torch.Tensor
        ``(B, S, S)``.
    observation : galgen.physics.Observation
    temperature : float, optional
        Of the base noise (see :meth:`AmortizedPosterior.sample`); default the flow's
        ``config["temperature"]``, chosen when it was installed.

    Returns
    -------
    object
        With ``draw(idx, n, generator)`` and ``log_prob(idx, x)`` over galaxies ``idx``.
    """
    q.check_model(model)
    q = q.to(observed.device).eval()
    t = q.config.get("temperature", 1.0) if temperature is None else temperature
    return _Proposal(q, q.context(model, observed, observation), t)


def _diverse_best(xs, lp, mode, n, radius: float = 0.5):
    """Indices ``(B, n)`` of the best-scoring draws that lie apart from each other and from ``mode``.

    Draws are taken in order of ``lp``; one closer than ``radius`` (in units of the
    draws' own standard deviation per coordinate) to the mode or to a draw already
    taken is passed over; where too few are apart, the best of the rest fill in.
    """
    B, C, k = xs.shape
    unit = xs.std(1, keepdim=True).clamp(min=1e-12)
    order = lp.argsort(1, descending=True)
    out = torch.empty(B, n, dtype=torch.long, device=xs.device)
    for b in range(B):
        taken, rest = [], []
        centres = [mode[b]]
        for i in order[b].tolist():
            far = all(float((((xs[b, i] - c) / unit[b, 0]) ** 2).mean().sqrt()) > radius for c in centres)
            (taken if far and len(taken) < n else rest).append(i)
            if far:
                centres.append(xs[b, i])
            if len(taken) == n:
                break
        out[b] = torch.as_tensor((taken + rest)[:n], dtype=torch.long)
    return out


@torch.no_grad()
def multimodal_laplace(model, observed: torch.Tensor, observation, mean: torch.Tensor, scale_tril: torch.Tensor,
                       proposal, *, starts: int = 3, candidates: int = 64, refine: int = 10,
                       generator: torch.Generator | None = None, max_batch: int = 64, floor: float = 0.05,
                       extra: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                       fit_flux: bool = True):
    """Posterior modes found from an amortised posterior's draws, each with its Laplace approximation.

    The posterior of a deep prior's latent code has several modes, and a MAP fit finds
    one of them, not always the highest. ``candidates`` draws of the amortised
    posterior per galaxy are scored by the exact log posterior; the best ``starts -
    1`` of them that lie apart (by half the draws' standard deviation, root mean square
    over the coordinates, from the MAP and from each other) are polished by Levenberg-Marquardt (``refine`` steps at most) beside
    the given mode, the Gauss-Newton matrix at each polished mode gives its Laplace
    approximation, modes that coincide are merged, and every mode is weighted by its
    Laplace evidence ``p(x, mode) |2 pi Sigma|^(1/2)`` (modes below 1e-3 of the best
    are dropped; the others get at least ``floor`` of the draws). The result is the
    mixture proposal of :func:`~galgen.inference.importance.importance_sample`.

    Parameters
    ----------
    model : galgen.models.LatentModel
    observed : torch.Tensor
        ``(B, S, S)``.
    observation : galgen.physics.Observation
    mean, scale_tril : torch.Tensor
        ``(B, k)``, ``(B, k, k)``: the Laplace approximation at the MAP
        (:func:`~galgen.inference.importance.laplace_approximation`).
    proposal : object or None
        Of :func:`amortized_proposal` for these galaxies; ``None``: the candidates are
        ``extra`` alone.
    starts : int, optional
        Modes per galaxy at most, the MAP's included.
    candidates : int, optional
        Draws of the amortised posterior scored per galaxy.
    refine : int, optional
        Levenberg-Marquardt steps at most from each start.
    generator : torch.Generator, optional
    max_batch : int, optional
        Rows per decoder call when scoring.
    floor : float, optional
        Smallest share of the draws of a mode that is kept.
    extra : torch.Tensor, optional
        ``(B, E, k)`` further candidates, scored with the draws (e.g. the draws of an
        earlier importance sampling that carried its weight).
    cond : torch.Tensor, optional
        ``(B, C)`` raw conditions of a conditional model.
    fit_flux : bool, optional
        ``False``: the log flux scale of every candidate is set to that of ``mean`` and
        held there (``scale="fixed"`` of :func:`~galgen.inference.sample_posterior`);
        ``scale_tril`` and the returned factors are then of ``z`` alone.

    Returns
    -------
    means : torch.Tensor
        ``(B, K, k)`` modes (float64), ``K = starts``.
    scale_trils : torch.Tensor
        ``(B, K, k, k)`` (``(B, K, k - 1, k - 1)`` without ``fit_flux``).
    log_weights : torch.Tensor
        ``(B, K)`` normalised log weights (``-inf`` for merged or negligible modes).
    """
    from types import SimpleNamespace

    from .fit import posterior_log_prob
    from .importance import laplace_approximation, mixture_log_weights

    B, k = mean.shape
    d = k - 1
    dev = observed.device
    every = torch.arange(B, device=dev)
    if proposal is None and extra is None:
        raise GalgenInputError("multimodal_laplace: candidates come from a proposal, extra, or both; got neither")
    xs = extra.to(dev, torch.float64) if proposal is None else proposal.draw(every, int(candidates), generator)[0]
    if proposal is not None and extra is not None:
        xs = torch.cat([xs, extra.to(xs)], 1)  # (B, C, k)
    if not fit_flux:  # the candidates at the held flux scale
        xs = xs.clone()
        xs[..., d] = mean.to(xs)[:, None, d]
    C = xs.shape[1]
    flat = xs.reshape(-1, k).float()
    lp_of = posterior_log_prob(model, observation, observed, cond, chains=C)
    rows = torch.arange(B * C, device=dev)
    lp = torch.cat([lp_of(flat[a:a + max_batch], rows[a:a + max_batch])
                    for a in range(0, len(flat), max_batch)]).double().view(B, C)
    lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -math.inf))
    n_new = max(0, min(int(starts) - 1, C))
    top = _diverse_best(xs, lp, mean.double(), n_new)
    start = torch.gather(xs, 1, top[..., None].expand(B, n_new, k)).reshape(-1, k)
    gi = every.repeat_interleave(n_new)
    m_new, t_new = laplace_approximation(model, observed[gi], observation.select(gi),
                                         SimpleNamespace(z=start[:, :d].float(), log_scale=start[:, d].float()),
                                         None if cond is None else cond[gi.to(cond.device)], refine=int(refine),
                                         fit_flux=fit_flux)
    kt = k if fit_flux else d  # the parameters the Laplace factors cover
    means = torch.cat([mean.double()[:, None], m_new.double().view(B, n_new, k)], 1)
    trils = torch.cat([scale_tril.double()[:, None], t_new.double().view(B, n_new, kt, kt)], 1)
    K = means.shape[1]
    lp_k = posterior_log_prob(model, observation, observed, cond, chains=K)
    lps = lp_k(means.reshape(-1, k).float()).double().view(B, K)
    logdet = torch.diagonal(trils, dim1=-2, dim2=-1).log().sum(-1)
    logw = torch.where(torch.isfinite(lps) & torch.isfinite(logdet), lps + logdet, torch.full_like(lps, -math.inf))
    for j in range(1, K):  # merge a mode with an earlier one it lies within about a standard deviation of
        for i in range(j):
            dji = (means[:, j] - means[:, i])[:, :kt]
            wi = torch.linalg.solve_triangular(trils[:, i], dji[..., None], upper=False)[..., 0]
            wj = torch.linalg.solve_triangular(trils[:, j], dji[..., None], upper=False)[..., 0]
            same = ((wi * wi).sum(1) < kt) & ((wj * wj).sum(1) < kt) & torch.isfinite(logw[:, i])
            logw[:, j] = torch.where(same, torch.full_like(logw[:, j], -math.inf), logw[:, j])
    return means, trils, mixture_log_weights(logw, floor)


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
        A trained flow to go on training with a new schedule (default: a new one with
        ``options``). It keeps its standardisation of the context and targets, and its
        ``trained_steps`` count on from its own.
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
        In eval mode, with ``trained_steps`` = ``steps`` plus those of ``posterior``.
    """
    if observation.batch_size is None:
        raise GalgenInputError("observation: needs per-galaxy PSFs or noise (a pool to draw observations from)")
    dev = observation.psf.device
    stamp = observation.stamp or model.config["stamp"]
    probe = encoder_features(model, torch.zeros(1, stamp, stamp, device=dev))
    enc = 0 if probe is None else int(probe.shape[1])
    if posterior is None:
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed, not the global state
            torch.manual_seed(int(seed))
            posterior = AmortizedPosterior(stamp, int(model.latent_dim), encoder_features=enc, **options)
    q = posterior
    q.check_model(model)
    q = q.to(dev)
    base = int(q.trained_steps)  # steps the flow had before this schedule (0: untrained, standardised below)
    settings = dict(steps=int(steps), batch_size=int(batch_size), bank=int(bank), lr=float(lr), seed=int(seed))
    if base:
        settings["init_steps"] = base
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / 100) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))))
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    sd = q.config["log_scale_sd"]
    n_pool = observation.batch_size
    start = 0
    ck = load_checkpoint(out, map_location=dev) if out is not None and Path(out).exists() else None
    if ck is not None:
        same = {k: v for k, v in ck["config"].items() if k != "temperature"} == {
            k: v for k, v in q.config.items() if k != "temperature"}
        if not same or ck["provenance"].get("settings") != settings:
            raise GalgenInputError(f"{out}: a checkpoint of other settings; remove it or choose another --out")
        if int(ck["step"]) >= int(steps):  # finished: nothing to draw
            q.load_state_dict(ck["model"])
            return q.eval()
    # the bank comes first from the seeded generator, on a fresh start and on a resume alike
    z_bank, img_bank = _decode_bank(model, int(bank), 256, gen, log_every=20)
    if ck is not None:
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

    if start == 0 and base == 0:  # standardise the context scalars and the targets on a first batch
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
        q.trained_steps.fill_(base + step)
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
    q.trained_steps.fill_(base + int(steps))
    return q.eval()
