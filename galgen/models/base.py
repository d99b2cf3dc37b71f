"""What every galgen generative model provides to the trainer, the CLI and inference.

A model is a :class:`torch.nn.Module` that knows nothing of files. It is built from a
JSON-serialisable ``config`` (which a checkpoint stores and checks), and it trains one
step at a time on a :class:`Batch`: observed cutouts with their own
:class:`~galgen.physics.Observation` (PSF, variance, mask) and, optionally, catalog
quantities it is conditioned on. The trainer owns the loop, the devices, mixed
precision, logging, checkpoints and data parallelism; the model owns its losses and
optimisers (a GAN has two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import GalgenInputError

__all__ = ["Batch", "GenerativeModel", "good_pixels", "make_optimizer", "no_sync"]


def no_sync(params: Iterable[torch.nn.Parameter]) -> None:
    """Gradient synchronisation of a single process: nothing to do.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        Ignored.
    """


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


@dataclass
class Batch:
    """A training batch: observations, their physics, optional conditions.

    Parameters
    ----------
    observed : torch.Tensor
        ``(B, S, S)`` observed cutouts (ADU).
    observation : galgen.physics.Observation
        Per-galaxy PSF, pixel scale, oversampling and noise (variance, mask).
    cond : torch.Tensor, optional
        ``(B, C)`` raw catalog values of the model's ``conditions`` (e.g. magnitude,
        half-light radius in arcsec); the model normalises them.
    index : torch.Tensor, optional
        ``(B,)`` rows of the galaxies in their file.
    """

    observed: torch.Tensor
    observation: object
    cond: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.observed.shape[0]


class GenerativeModel(nn.Module):
    """Base class of galgen's models (auto-encoder, VAE, WGAN-GP).

    Subclasses set ``kind`` and build ``self.config`` (a JSON-serialisable dict with
    ``kind`` and every constructor argument), and implement :meth:`make_optimizers`,
    :meth:`training_step` and :meth:`validation_step`; generative ones also
    :meth:`sample`.

    Conditioning: a model built with ``conditions=("mag", "hlr")`` expects ``cond``
    ``(B, 2)`` of raw catalog values; :meth:`set_condition_stats` (called by the trainer
    with the training set's means and standard deviations) fixes the normalisation,
    which is stored with the weights as buffers.

    Parameters
    ----------
    conditions : sequence of str, optional
        Catalog columns the model is conditioned on.
    """

    kind: str = "base"

    def __init__(self, conditions=()):
        super().__init__()
        self.conditions = tuple(str(c) for c in conditions)
        n = len(self.conditions)
        self.register_buffer("cond_mean", torch.zeros(n))
        self.register_buffer("cond_std", torch.ones(n))

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
