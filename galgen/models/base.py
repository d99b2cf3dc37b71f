"""What every galgen model provides to inference, sampling, evaluation and the trainer.

**The latent-model contract** (:class:`LatentModel`). Everything that inference,
sampling and evaluation do with a model goes through four names:

- ``latent_dim``: size of the latent code ``z``;
- ``decode(z, cond=None)``: ``(B, latent_dim)`` -> ``(B, H, W)`` intrinsic (PSF-free),
  non-negative images on the model's intrinsic grid;
- ``prior(cond=None)``: a :class:`torch.distributions.Distribution` over ``z``, batched
  over galaxies (:func:`standard_normal` for N(0, I); a zuko flow; a
  :class:`~torch.distributions.TransformedDistribution` for a parametric model);
- ``encode(observed, cond=None)``: an amortised first guess of ``z`` (a tensor, or a
  distribution whose ``mean`` is the guess), or None for a model without one.

A user's own module that implements these four (most simply by subclassing
:class:`LatentModel`) is fitted, sampled and evaluated like the shipped ones.
:func:`sample_latents` draws codes from any such prior with a
:class:`torch.Generator`, so that a seed gives the same codes on every run.

**Trainable models** (:class:`GenerativeModel`). A model is a :class:`torch.nn.Module` that knows nothing of files. It is built from a
JSON-serialisable ``config`` (which a checkpoint stores and checks), and it trains one
step at a time on a :class:`Batch`: observed cutouts with their own
:class:`~galgen.physics.Observation` (PSF, variance, mask) and, optionally, catalog
quantities it is conditioned on. The trainer owns the loop, the devices, mixed
precision, logging, checkpoints and data parallelism; the model owns its losses and
optimisers (a GAN has two).
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Iterable

import torch
from torch import nn
from torch.distributions import Distribution, Independent, MixtureSameFamily, Normal, TransformedDistribution

from ..errors import GalgenInputError
from ..physics import Batch

__all__ = ["Batch", "LatentModel", "GenerativeModel", "StandardNormal", "FlatPrior", "standard_normal",
           "sample_latents", "amortised_guess", "good_pixels", "make_optimizer", "no_sync"]

_LOG_2PI = math.log(2 * math.pi)


class StandardNormal(Independent):
    """N(0, I) over codes of size ``d``: ``Independent(Normal(0, 1), 1)`` with a closed-form density.

    ``log_prob(z) = -|z|^2 / 2 - d log(2 pi) / 2``, evaluated in the dtype of ``z``
    without argument validation (a diverging fit's non-finite codes give a non-finite
    density rather than an exception).

    Parameters
    ----------
    latent_dim : int
    device, dtype : optional
    """

    def __init__(self, latent_dim: int, *, device=None, dtype=None):
        loc = torch.zeros(int(latent_dim), device=device, dtype=dtype)
        super().__init__(Normal(loc, torch.ones_like(loc), validate_args=False), 1, validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log density in nats.

        Parameters
        ----------
        value : torch.Tensor
            ``(..., d)``.

        Returns
        -------
        torch.Tensor
            ``(...)``.
        """
        d = value.shape[-1]
        return -0.5 * (value**2).sum(-1) - 0.5 * d * _LOG_2PI


def standard_normal(latent_dim: int, *, device=None, dtype=None) -> StandardNormal:
    """The N(0, I) prior over latent codes: ``Independent(Normal(0, 1), 1)``.

    Parameters
    ----------
    latent_dim : int
        Size of ``z``.
    device, dtype : optional
        Of the distribution's parameters (and so of its draws).

    Returns
    -------
    StandardNormal
        An ``Independent(Normal(0, 1), 1)``: batch shape ``()``, event shape ``(latent_dim,)``.

    Examples
    --------
    >>> p = standard_normal(3)
    >>> p.log_prob(torch.zeros(2, 3)).shape
    torch.Size([2])
    """
    return StandardNormal(latent_dim, device=device, dtype=dtype)


class FlatPrior(StandardNormal):
    """The improper flat prior of a model that has no prior (an auto-encoder).

    ``log_prob`` is 0 everywhere, so that a MAP fit is a maximum-likelihood fit. An
    improper density has no draws; :meth:`sample` and :func:`sample_latents` give
    N(0, I) codes instead, which serve as random starting points of optimisers only.

    Parameters
    ----------
    latent_dim : int
    device, dtype : optional

    Examples
    --------
    >>> FlatPrior(2).log_prob(torch.randn(4, 2))
    tensor([0., 0., 0., 0.])
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Zero log density (nats) for every code.

        Parameters
        ----------
        value : torch.Tensor
            ``(..., latent_dim)``.

        Returns
        -------
        torch.Tensor
            ``(...)`` zeros in the dtype of ``value``.
        """
        return torch.zeros(value.shape[:-1], dtype=value.dtype, device=value.device)


def _standard_draws(dist: Distribution, shape: torch.Size, generator, temperature: float) -> torch.Tensor:
    """Draws of ``shape`` from ``dist`` whose randomness is standard normal noise from ``generator``."""
    from zuko.distributions import NormalizingFlow

    if isinstance(dist, Independent):
        return _standard_draws(dist.base_dist, shape, generator, temperature)
    if isinstance(dist, Normal):
        loc = dist.loc
        gdev = generator.device if generator is not None else loc.device
        eps = torch.randn(shape + dist.batch_shape, generator=generator, device=gdev, dtype=loc.dtype).to(loc.device)
        return dist.loc + dist.scale * (temperature * eps)
    if isinstance(dist, TransformedDistribution):
        x = _standard_draws(dist.base_dist, shape, generator, temperature)
        for t in dist.transforms:
            x = t(x)
        return x
    if isinstance(dist, NormalizingFlow):
        return dist.transform.inv(_standard_draws(dist.base, shape, generator, temperature))
    if isinstance(dist, MixtureSameFamily) and dist.batch_shape == () and isinstance(
            dist.component_distribution, (Normal, Independent)):  # a component each, then its Gaussian
        probs = dist.mixture_distribution.probs
        gdev = generator.device if generator is not None else probs.device
        k = torch.multinomial(probs.to(gdev), shape.numel(), replacement=True, generator=generator)
        comps = dist.component_distribution
        comps = comps.base_dist if isinstance(comps, Independent) else comps
        k = k.to(comps.loc.device)
        picked = Normal(comps.loc[k], comps.scale[k])
        return _standard_draws(picked, torch.Size([]), generator, temperature).reshape(shape + dist.event_shape)
    if temperature != 1.0:
        raise GalgenInputError(f"temperature: {type(dist).__name__} has no Gaussian base noise to scale")
    seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
    if seed is None:
        return dist.sample(shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dist.sample(shape)


@torch.no_grad()
def sample_latents(prior: Distribution, n: int, *, generator: torch.Generator | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """Draw ``n`` latent codes from a prior, reproducibly.

    :meth:`torch.distributions.Distribution.sample` takes no generator; this does. For
    the distributions galgen's models return (normals, transformed normals, zuko flows)
    the draws are made from standard normal noise drawn with ``generator`` (on the
    generator's device, then moved) and mapped through the distribution's transforms
    (a mixture of Gaussians, :class:`~galgen.models.CodeMixture`: a component per draw,
    then its noise, the temperature scaling its widths);
    any other distribution is sampled under the global random state re-seeded from
    ``generator`` (and restored afterwards).

    Parameters
    ----------
    prior : torch.distributions.Distribution
        Event shape ``(d,)``; batch shape ``()`` (one distribution for all) or ``(n,)``
        (one per galaxy, e.g. conditioned on each galaxy's catalog values).
    n : int
        Number of codes.
    generator : torch.Generator, optional
        Source of randomness (default: the global one).
    temperature : float, optional
        Scale of the Gaussian base noise (``< 1`` draws from the denser core).

    Returns
    -------
    torch.Tensor
        ``(n, d)`` on the prior's device.

    Examples
    --------
    >>> a = sample_latents(standard_normal(2), 3, generator=torch.Generator().manual_seed(0))
    >>> b = sample_latents(standard_normal(2), 3, generator=torch.Generator().manual_seed(0))
    >>> a.shape, torch.equal(a, b)
    (torch.Size([3, 2]), True)
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise GalgenInputError(f"n: expected an integer >= 1, got {n!r}")
    if not temperature > 0:
        raise GalgenInputError(f"temperature: must be > 0, got {temperature!r}")
    batch = tuple(prior.batch_shape)
    if batch == ():
        shape = torch.Size([n])
    elif batch == (n,):
        shape = torch.Size([])
    else:
        raise GalgenInputError(f"prior: batch shape {batch} cannot give {n} codes (expected () or ({n},))")
    return _standard_draws(prior, shape, generator, float(temperature))


#: amortised_guess adds noise to data whose empty-sky variance is below this fraction of the
#: variance the encoder was trained on (0.24 mag deeper or more; shallower data are left alone).
_NOISE_MATCH = 0.8


@torch.no_grad()
def amortised_guess(model, observed: torch.Tensor, cond=None, observation=None) -> torch.Tensor | None:
    """A model's amortised first guess of the latent codes of observed cutouts.

    An encoder trained on images of one depth does not extrapolate to deeper ones: the
    installed VAEs, trained on single SDSS exposures, guess fluxes 15-36 times too high for
    the same galaxies observed 2 mag deeper (docs/inference.md, "Deeper data than the
    training set's"). Given the galaxies' ``observation`` and a model that records the
    noise its encoder was trained on (:attr:`LatentModel.encoder_noise_rms`), images whose
    empty-sky variance is below 0.8 of it get Gaussian noise up to it before they are
    encoded (a fixed seed: the same images, the same guess). The guess is then as good as
    on the training depth, and a fit refines it with the data's own likelihood.

    Parameters
    ----------
    model : LatentModel
        Anything with the contract's ``encode``.
    observed : torch.Tensor
        ``(B, S, S)``.
    cond : torch.Tensor, optional
        ``(B, C)`` raw catalog values.
    observation : galgen.physics.Observation, optional
        The galaxies' PSFs and noise; without it the images are encoded as they are.

    Returns
    -------
    torch.Tensor or None
        ``(B, latent_dim)`` float32 codes (the mean of an approximate posterior), or
        None when the model has no encoder.
    """
    guess = model.encode(encoder_input(model, observed, observation), cond)
    if guess is None:
        return None
    if isinstance(guess, Distribution):
        guess = guess.mean
    return guess.float()


@torch.no_grad()
def encoder_input(model, observed: torch.Tensor, observation=None) -> torch.Tensor:
    """The images as a model's encoder should see them: noise-matched to its training data.

    Images whose empty-sky variance (``observation.noise.sky_variance``, which every noise
    model has: the median over the stamp of the variance of a blank image) is below 0.8 of ``model.encoder_noise_rms ** 2`` get
    Gaussian noise with the difference of the two variances (a fixed seed, so the same
    images give the same result); the other images, and all of them when ``observation``
    is None or the model records no training noise, are returned as they are (the same
    tensor). The added noise depends on the image's place in the batch, not on the image.
    :func:`amortised_guess` and the encoder features of an amortised posterior
    (:func:`galgen.inference.amortized.encoder_features`) encode these.

    Parameters
    ----------
    model : LatentModel
        Its :attr:`~LatentModel.encoder_noise_rms` (None: nothing to match).
    observed : torch.Tensor
        ``(B, S, S)`` detector images.
    observation : galgen.physics.Observation, optional
        Their PSFs and noise model.

    Returns
    -------
    torch.Tensor
        ``(B, S, S)``.
    """
    rms = model.encoder_noise_rms if isinstance(model, LatentModel) else None
    if observation is None or not rms:
        return observed
    rms = float(rms)
    sky = observation.noise.sky_variance(observed)
    extra = torch.where(sky < _NOISE_MATCH * rms**2, rms**2 - sky, torch.zeros_like(sky))
    if not bool((extra > 0).any()):
        return observed
    g = torch.Generator(device=observed.device).manual_seed(0)
    draw = torch.randn(observed.shape, generator=g, device=observed.device, dtype=observed.dtype)
    return observed + extra.sqrt().to(observed.dtype)[:, None, None] * draw


class LatentModel(nn.Module):
    """Base class of the latent-model contract (see the module docstring).

    Subclasses set ``latent_dim`` and implement :meth:`decode` and :meth:`prior`; those
    with an amortised first guess also :meth:`encode`. Conditional models list their
    catalog columns in ``conditions``.

    Attributes
    ----------
    latent_dim : int
        Size of ``z``.
    config : dict
        The model's options (``stamp``, ``oversampling``, ...); stages check data against it.
    checkpoint_path : str or None
        Where the model was loaded from.
    provenance : dict
        The data the model was trained on (``data``, ``data_fingerprint`` with the
        simulated survey, ...), set by the loaders; empty for a model built in code.
    conditions : tuple of str
        Catalog columns ``cond`` holds, in order (empty: unconditional).
    prior_choices : dict of str to str
        Alternative priors :meth:`with_prior` accepts, name -> label (e.g. a VAE's
        ``{"flow": "flow prior", "normal": "N(0,I)"}``); empty when the model has only
        its own.
    map_optimizer : str
        The optimiser :func:`galgen.inference.fit_map` uses by default: ``"adam"``
        (first order: one decoder gradient per step, the cheaper choice for deep decoders
        whose forward-mode Jacobian costs ``latent_dim`` passes) or ``"lm"``
        (Levenberg-Marquardt: a handful of second-order steps, the faster choice for
        models with few parameters and a cheap Jacobian).
    map_prior : str or None
        The prior :func:`galgen.inference.fit_file` (``galgen fit``) fits with when none
        is asked for: a key of :attr:`prior_choices`, or None for the model's own (the
        one it samples from).
    encoder_noise_rms : float or None
        The noise rms (ADU per pixel) of the images the encoder was trained on (the VAE's
        and auto-encoder's ``input_scale``, which ``galgen train`` sets to the training
        data's median noise rms); :func:`amortised_guess` brings deeper data up to it.
        None (the default): no encoder, or unknown.
    jacobian : str
        How second-order inference (:func:`galgen.inference.fit_map` with ``"lm"``, the
        Laplace approximation, :func:`galgen.inference.sample_posterior`) computes the
        model image's derivatives in the latent coordinates: ``"forward"`` (forward-mode
        autodiff, exact) or ``"central"`` (central differences of step 1e-2: two
        batched decodes per coordinate, for deep decoders whose forward mode costs ~4
        decodes per coordinate on a CPU; relative error ~1e-4; the gradient stays exact).
    """

    latent_dim: int
    conditions: tuple = ()
    prior_choices: dict = {}
    #: The optimiser fit_map uses by default for this model (measured: see docs/benchmarks.md).
    map_optimizer: str = "adam"
    #: The prior galgen fit uses by default for this model (None: its own; measured: docs/inference.md).
    map_prior: str | None = None
    #: Noise rms (ADU) of the images the encoder was trained on, or None (no encoder, or not known).
    encoder_noise_rms: float | None = None
    #: How second-order inference differentiates the model image (measured: see docs/benchmarks.md).
    jacobian: str = "forward"
    #: The model's options (stamp, oversampling, kind, ...), JSON-serialisable; empty for a bare module.
    config: dict = {}
    #: The checkpoint the model was loaded from (set by the loaders), else None.
    checkpoint_path = None
    #: The data the model was trained on (set by the loaders from its checkpoint), else empty.
    provenance: dict = {}

    @property
    def latent_names(self) -> list:
        """Names of the latent coordinates, as fit files and calibration label them (``z0``, ``z1``, ...).

        Returns
        -------
        list of str
        """
        return [f"z{i}" for i in range(self.latent_dim)]

    def physical(self, z: torch.Tensor) -> dict:
        """Named physical quantities of latent codes (e.g. a Sersic model's radius and index).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)``.

        Returns
        -------
        dict of str to torch.Tensor
            ``(B,)`` each; empty (the default) for a model whose codes have no physical meaning.
        """
        return {}

    def decode(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """Intrinsic (PSF-free) images of latent codes.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, latent_dim)``.
        cond : torch.Tensor, optional
            ``(B, C)`` raw catalog values of ``conditions``.

        Returns
        -------
        torch.Tensor
            ``(B, H, W)`` non-negative images on the model's intrinsic grid.
        """
        raise NotImplementedError

    def prior(self, cond=None) -> Distribution:
        """The prior over latent codes.

        Parameters
        ----------
        cond : torch.Tensor, optional
            ``(B, C)`` raw catalog values: the prior of each galaxy.

        Returns
        -------
        torch.distributions.Distribution
            Event shape ``(latent_dim,)``; batch shape ``()`` or ``(B,)``.
        """
        raise NotImplementedError

    def encode(self, observed: torch.Tensor, cond=None):
        """An amortised first guess of the latent codes of observed cutouts.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)`` detector images.
        cond : torch.Tensor, optional
            ``(B, C)`` raw catalog values.

        Returns
        -------
        torch.Tensor or torch.distributions.Distribution or None
            ``(B, latent_dim)`` codes, an approximate posterior whose ``mean`` is the
            guess, or None (the default) for a model without one.
        """
        return None

    def with_prior(self, name: str) -> "LatentModel":
        """The same model (sharing its weights) with another of its priors.

        Parameters
        ----------
        name : str
            A key of :attr:`prior_choices`.

        Returns
        -------
        LatentModel

        Raises
        ------
        GalgenInputError
            A name the model does not offer.
        """
        if name not in self.prior_choices:
            offered = sorted(self.prior_choices) or "none but its own"
            raise GalgenInputError(f"prior: a {type(self).__name__} offers {offered}, not {name!r}")
        other = copy.copy(self)
        other._prior_choice = name
        return other


def no_sync(params: Iterable[torch.nn.Parameter]) -> None:
    """Gradient synchronisation of a single process: nothing to do.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        Ignored.
    """


#: Rows of training-set conditions a conditional model keeps to draw conditions from.
COND_BANK_SIZE = 4096


def _fill_missing_bank(module, state_dict, prefix, *args):
    """Load-state-dict pre-hook: a checkpoint without a condition bank leaves it unset (NaN)."""
    if prefix + "cond_bank" not in state_dict and hasattr(module, "cond_bank"):
        state_dict[prefix + "cond_bank"] = torch.full_like(module.cond_bank, math.nan)


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(params, lr: float, name: str = "adam", **options) -> torch.optim.Optimizer:
    """An optimiser by name, with a clear error for unknown names or options.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
    lr : float
        Learning rate.
    name : {"adam", "adamw", "sgd"}, optional
    **options
        Optimiser keyword arguments.

    Returns
    -------
    torch.optim.Optimizer
    """
    if name not in _OPTIMIZERS:
        raise GalgenInputError(f"optimizer.name: one of {sorted(_OPTIMIZERS)}, got {name!r}")
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    try:
        return _OPTIMIZERS[name](params, lr=lr, **options)
    except TypeError as exc:
        raise GalgenInputError(f"optimizer: bad option for {name} ({exc})") from None


def good_pixels(observed: torch.Tensor, observation) -> torch.Tensor:
    """Number of unmasked pixels of each cutout.

    Parameters
    ----------
    observed : torch.Tensor
        ``(B, S, S)``.
    observation : galgen.physics.Observation
        Its noise model's ``mask`` (True = excluded) is used when present.

    Returns
    -------
    torch.Tensor
        ``(B,)`` counts (at least 1), or a scalar when there is no mask.
    """
    mask = getattr(observation.noise, "mask", None)
    if mask is None:
        return torch.tensor(float(observed[0].numel()), device=observed.device)
    return (~mask).sum(dim=(-2, -1)).clamp(min=1).to(observed.dtype)


class GenerativeModel(LatentModel):
    """Base class of galgen's models (auto-encoder, VAE, WGAN-GP).

    Subclasses set ``kind`` and build ``self.config`` (a JSON-serialisable dict with
    ``kind`` and every constructor argument), and implement :meth:`make_optimizers`,
    :meth:`training_step` and :meth:`validation_step`; generative ones also
    :meth:`sample`.

    Conditioning: a model built with ``conditions=("mag", "hlr")`` expects ``cond``
    ``(B, 2)`` of raw catalog values; :meth:`set_condition_stats` (called by the trainer
    with the training set's means and standard deviations) fixes the normalisation,
    which is stored with the weights as buffers. The trainer also stores a bank of
    ``COND_BANK_SIZE`` rows of the training set's conditions
    (:meth:`set_condition_bank`): the empirical distribution of the conditions, which
    :meth:`draw_conditions` samples when galaxies are drawn without conditions (``galgen
    sample`` without ``--cond``), so that a conditional model also draws the population.

    Parameters
    ----------
    conditions : sequence of str, optional
        Catalog columns the model is conditioned on.
    """

    kind: str = "base"
    latent_dim: int = 0
    #: Deep decoders: central differences are 2x faster than forward mode on a CPU (docs/benchmarks.md).
    jacobian = "central"

    def __init__(self, conditions=()):
        super().__init__()
        self.conditions = tuple(str(c) for c in conditions)
        n = len(self.conditions)
        self.register_buffer("cond_mean", torch.zeros(n))
        self.register_buffer("cond_std", torch.ones(n))
        if n:
            # NaN until the trainer stores the training set's conditions; checkpoints written
            # before the bank existed load with it unset (see _fill_missing_bank)
            self.register_buffer("cond_bank", torch.full((COND_BANK_SIZE, n), math.nan))
            self._register_load_state_dict_pre_hook(_fill_missing_bank, with_module=True)  # torch >= 2.2

    @property
    def cond_dim(self) -> int:
        """Number of conditioning quantities."""
        return len(self.conditions)

    @classmethod
    def from_config(cls, config: dict) -> "GenerativeModel":
        """Build a model from its ``config`` dict.

        Parameters
        ----------
        config : dict
            As in ``model.config`` (``kind`` is checked, the rest are constructor
            arguments).

        Returns
        -------
        GenerativeModel
        """
        config = dict(config)
        kind = config.pop("kind", cls.kind)
        if kind != cls.kind:
            raise GalgenInputError(f"config: kind {kind!r} cannot build a {cls.__name__} ({cls.kind!r})")
        try:
            return cls(**config)
        except TypeError as exc:
            raise GalgenInputError(f"config: bad {cls.kind} model option ({exc})") from None

    def set_condition_stats(self, mean, std) -> None:
        """Fix the normalisation of the conditioning quantities.

        Parameters
        ----------
        mean, std : array-like
            ``(C,)`` means and standard deviations of the raw values in the training set.
        """
        mean = torch.as_tensor(mean, dtype=self.cond_mean.dtype).reshape(-1)
        std = torch.as_tensor(std, dtype=self.cond_std.dtype).reshape(-1)
        if mean.numel() != self.cond_dim or std.numel() != self.cond_dim or not bool((std > 0).all()):
            raise GalgenInputError(f"condition stats: need {self.cond_dim} means and positive std devs")
        self.cond_mean.copy_(mean)
        self.cond_std.copy_(std)

    def set_condition_bank(self, values, seed: int = 0) -> None:
        """Store the training set's conditions, the distribution :meth:`draw_conditions` samples.

        Parameters
        ----------
        values : array-like
            ``(N, C)`` raw conditions of the training galaxies. ``COND_BANK_SIZE``
            rows are kept: a seeded random subset, or all of them repeated when ``N`` is
            smaller.
        seed : int, optional
            Seed of the subset.
        """
        if self.cond_dim == 0:
            raise GalgenInputError("condition bank: this model is not conditioned on catalog quantities")
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1, self.cond_dim)
        if len(values) == 0 or not bool(torch.isfinite(values).all()):
            raise GalgenInputError("condition bank: needs at least one row of finite conditions")
        gen = torch.Generator().manual_seed(int(seed))
        if len(values) >= COND_BANK_SIZE:
            rows = torch.randperm(len(values), generator=gen)[:COND_BANK_SIZE]
        else:
            rows = torch.arange(COND_BANK_SIZE) % len(values)
        self.cond_bank.copy_(values[rows].to(self.cond_bank))

    def draw_conditions(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw conditions from the training set's (the bank of :meth:`set_condition_bank`).

        Parameters
        ----------
        n : int
            Number of rows.
        generator : torch.Generator, optional
            Source of randomness (on the model's device).

        Returns
        -------
        torch.Tensor
            ``(n, C)`` raw conditions, rows of the training set's conditions.
        """
        if self.cond_dim == 0:
            raise GalgenInputError("cond: this model is not conditioned on catalog quantities")
        if not bool(torch.isfinite(self.cond_bank).all()):
            raise GalgenInputError(f"cond: this model needs the conditions {list(self.conditions)} (it stores "
                                   "no distribution of them to draw from: pass them, e.g. --cond "
                                   + ",".join(f"{c}=..." for c in self.conditions) + ")")
        idx = torch.randint(0, COND_BANK_SIZE, (int(n),), generator=generator, device=self.cond_bank.device)
        return self.cond_bank[idx]

    def condition_features(self, cond: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Normalised conditioning features, checked against the model's conditions.

        Parameters
        ----------
        cond : torch.Tensor or None
            ``(n, C)`` raw values (or ``(C,)``, broadcast to all ``n``).
        n : int
            Batch size.

        Returns
        -------
        torch.Tensor or None
            ``(n, C)`` standardised values; None for an unconditional model.
        """
        if self.cond_dim == 0:
            if cond is not None and cond.numel():
                raise GalgenInputError("cond: this model is not conditioned on catalog quantities")
            return None
        if cond is None:
            raise GalgenInputError(f"cond: this model needs the conditions {list(self.conditions)}")
        cond = torch.as_tensor(cond, dtype=self.cond_mean.dtype, device=self.cond_mean.device)
        if cond.ndim == 1:
            cond = cond.expand(n, -1)
        if cond.shape != (n, self.cond_dim):
            raise GalgenInputError(f"cond: expected shape ({n}, {self.cond_dim}) for {list(self.conditions)}, "
                                   f"got {tuple(cond.shape)}")
        return (cond - self.cond_mean) / self.cond_std

    def make_optimizers(self, lr: float = 1e-3, name: str = "adam", **options) -> dict:
        """The model's optimisers, by name.

        Parameters
        ----------
        lr : float, optional
            Learning rate.
        name : {"adam", "adamw", "sgd"}, optional
            Optimiser.
        **options
            Passed to the optimiser (e.g. ``betas``, ``weight_decay``, ``momentum``).

        Returns
        -------
        dict of str to torch.optim.Optimizer
            ``{"model": optimizer}``.
        """
        return {"model": make_optimizer(self.parameters(), lr, name, **options)}

    def training_step(self, batch: Batch, optimizers: dict, step: int,
                      sync: Callable = no_sync) -> dict:
        """One optimisation step on a batch.

        Zero the gradients, compute the loss, ``backward()``, call ``sync`` on the
        parameters about to be stepped (it averages gradients across data-parallel
        processes), step the optimiser(s). The physics layer runs in float32 (call it
        on ``intrinsic.float()``), even under bf16 autocast.

        Parameters
        ----------
        batch : Batch
        optimizers : dict
            From :meth:`make_optimizers`.
        step : int
            Global step (0-based), for schedules such as the KL warm-up or ``n_critic``.
        sync : callable, optional
            ``sync(parameters)`` after ``backward`` and before ``optimizer.step()``.

        Returns
        -------
        dict of str to torch.Tensor
            Scalar metrics, detached; ``"loss"`` is checked for NaN/inf by the trainer.
        """
        raise NotImplementedError

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict:
        """Per-galaxy validation metrics.

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        dict of str to torch.Tensor
            Each ``(B,)``; ``"loss"`` is the figure the trainer reports as validation loss.
        """
        raise NotImplementedError

    def reconstruct(self, observed: torch.Tensor, cond=None) -> torch.Tensor:
        """The model's intrinsic galaxy for observed cutouts (encoder, then decoder).

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        cond : torch.Tensor, optional
            Raw conditioning values.

        Returns
        -------
        torch.Tensor
            ``(B, S*k, S*k)`` intrinsic images.
        """
        raise GalgenInputError(f"a {self.kind} model has no encoder to reconstruct observations")

    @torch.no_grad()
    def denoise(self, observed: torch.Tensor, observation, cond=None) -> torch.Tensor:
        """Noise-free model of observed cutouts: the reconstruction seen through the physics layer.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        observation : galgen.physics.Observation
            Their PSFs and noise.
        cond : torch.Tensor, optional
            Raw conditioning values.

        Returns
        -------
        torch.Tensor
            ``(B, S, S)``.
        """
        return observation.noiseless(self.reconstruct(observed, cond).float())

    @torch.no_grad()
    def anomaly_score(self, observed: torch.Tensor, observation, cond=None) -> torch.Tensor:
        """Reduced chi-square of each galaxy's reconstruction (about 1 for a typical galaxy).

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        observation : galgen.physics.Observation
            Their PSFs and noise.
        cond : torch.Tensor, optional
            Raw conditioning values.

        Returns
        -------
        torch.Tensor
            ``(B,)``: chi-square over good pixels divided by their number.
        """
        chi2 = observation.noise.chi2(observed, self.denoise(observed, observation, cond))
        return chi2 / good_pixels(observed, observation)

    @torch.no_grad()
    def sample(self, n: int, cond=None, generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Draw intrinsic (PSF-free) galaxy images.

        Parameters
        ----------
        n : int
            Number of galaxies.
        cond : torch.Tensor, optional
            Raw conditioning values, ``(n, C)`` or ``(C,)``.
        generator : torch.Generator, optional
            Source of randomness.
        **options
            Model-specific (e.g. ``prior="flow"`` or ``"normal"`` for the VAE).

        Returns
        -------
        torch.Tensor
            ``(n, S*k, S*k)``.
        """
        raise GalgenInputError(f"a {self.kind} model cannot sample new galaxies")
