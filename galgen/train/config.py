"""Configuration of a training run: the schema, its validation and the learning-rate schedule.

A training YAML has a ``model:`` section (the model's kind and constructor options) and a
``train:`` section (:class:`TrainConfig`); :func:`load_run_config` reads and validates it
into a :class:`RunConfig`. The learning-rate schedule is :meth:`TrainConfig.lr_at`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..config import build_dataclass, read_yaml
from ..errors import GalgenInputError

__all__ = ["TrainConfig", "RunConfig", "load_run_config", "plain_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Options of the training loop.

    Parameters
    ----------
    steps : int
        Optimisation steps (global batches).
    batch_size : int
        Galaxies per global batch (split over data-parallel processes).
    lr : float
        (Peak) learning rate.
    lr_schedule : {"constant", "cosine"}
        ``cosine`` decays the learning rate from ``lr`` to ``lr_min`` over the run
        (after the warm-up) along a half cosine (Loshchilov & Hutter 2017); the final
        steps then refine the weights with small updates instead of jittering around a
        minimum at the full rate. It depends on ``steps``, so a resumed cosine run must
        keep them.
    lr_warmup : int
        Steps of linear warm-up from ``lr / lr_warmup`` to ``lr`` (0: none).
    lr_min : float
        Final learning rate of the cosine schedule.
    init : str, optional
        Checkpoint (``model.pt``, ``last.pt`` or a run directory) whose weights start the
        run: fine-tuning, e.g. a longer or decayed continuation of a finished run. The
        architecture must be the checkpoint's (training-only model options, such as the
        VAE's ``beta`` and ``warmup_steps``, may differ); the optimiser and the step
        count start afresh.
    optimizer : dict
        Extra optimiser options passed to the model's ``make_optimizers`` (e.g. betas).
    seed : int
        Seed of the weights, the batch order, the split and the noise draws.
    val_fraction : float
        Fraction of the galaxies held out for validation.
    max_val : int
        At most this many validation galaxies per evaluation.
    log_every, val_every, checkpoint_every : int
        Periods in steps.
    device : str
        ``auto`` (cuda, then mps, then cpu), ``cuda``, ``cuda:1``, ``mps`` or ``cpu``.
    precision : str
        ``auto`` (bf16 autocast on CUDA, float32 elsewhere), ``bf16`` or ``fp32``.
    in_memory : bool
        Hold the training set in memory (on the device) or read it lazily.
    num_workers : int
        ``DataLoader`` workers when not in memory.
    prior_epochs : int
        Epochs of the latent flow prior fit after training (VAE only).
    prior_samples : int
        Codes drawn from q(z|x) per galaxy for the flow fit (VAE only).
    prior_codes : str
        What the flow prior is fitted to (VAE only): ``posterior``, ``prior_samples`` draws
        of each training galaxy's q(z|x); or ``map``, each galaxy's MAP code
        (:func:`galgen.inference.map_codes`, at most ``prior_map_steps`` Adam steps from the
        encoder's guess): codes that explain the galaxies where the encoder does not
        (docs/models.md, "A flow prior fitted to MAP codes"), at the cost of the fits.
    prior_map_steps : int
        Adam steps of each MAP fit at most, with ``prior_codes: map``.
    tensorboard : bool
        Also write TensorBoard event files (needs the ``tensorboard`` package).
    progress : bool, optional
        Progress bar (default: when stderr is a terminal).
    val_images : bool
        At every validation, write ``val_samples/step_<step>.png`` (held-out galaxies and
        generated ones observed like them; GANs only).
    depth_mix : float
        Train on a mixture of depths (1: the file's own, the default). Each training
        galaxy of each step is seen with its noise variance multiplied by a factor drawn
        log-uniformly in ``[1, depth_mix]`` (:meth:`galgen.physics.Batch.shallower`): a
        file of 40-exposure coadds with ``depth_mix: 40`` teaches every depth from the
        coadd's to one exposure's. Validation keeps the file's depth.
    depth_mix_steps : int
        With ``depth_mix``: a curriculum. The deepest factor drawn moves log-linearly from
        ``depth_mix`` (step 0: every galaxy as shallow as ``depth_mix`` makes it) to 1 (the
        file's depth) over these steps, so an encoder trained on shallow data meets deeper
        images gradually (0: the whole range from the start).
    snr_cap : float, optional
        With ``depth_mix``: a galaxy whose signal-to-noise ratio in the file (the square
        root of ``sum(observed**2 / variance)`` minus the pixel count) exceeds
        ``snr_cap`` is seen at least as shallow as brings it down to ``snr_cap`` (at most
        ``depth_mix`` times), so that the few brightest galaxies do not dominate a
        Gaussian likelihood of deep images.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    lr_min: float = 0.0
    init: str | None = None
    optimizer: dict = field(default_factory=dict)
    seed: int = 0
    val_fraction: float = 0.05
    max_val: int = 2000
    log_every: int = 50
    val_every: int = 500
    checkpoint_every: int = 500
    device: str = "auto"
    precision: str = "auto"
    in_memory: bool = True
    num_workers: int = 0
    prior_epochs: int = 50
    prior_samples: int = 4
    prior_codes: str = "posterior"
    prior_map_steps: int = 300
    tensorboard: bool = False
    progress: bool | None = None
    val_images: bool = True
    depth_mix: float = 1.0
    depth_mix_steps: int = 0
    snr_cap: float | None = None

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimisation step ``step`` (counted from 0).

        Parameters
        ----------
        step : int

        Returns
        -------
        float

        Examples
        --------
        >>> c = TrainConfig(steps=100, lr=1e-3, lr_schedule="cosine", lr_warmup=10, lr_min=1e-5)
        >>> c.lr_at(0), c.lr_at(9), round(c.lr_at(99), 8)
        (0.0001, 0.001, 1e-05)
        """
        if step < self.lr_warmup:
            return self.lr * (step + 1) / self.lr_warmup
        if self.lr_schedule == "constant":
            return self.lr
        span = max(self.steps - 1 - self.lr_warmup, 1)
        t = min((step - self.lr_warmup) / span, 1.0)
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * t))

    def check(self, where: str = "train") -> None:
        """Raise :class:`GalgenInputError` for out-of-range values.

        Parameters
        ----------
        where : str, optional
            Prefix of the messages (file name and section).
        """
        for key in ("steps", "batch_size", "log_every", "val_every", "checkpoint_every", "max_val"):
            if getattr(self, key) < 1:
                raise GalgenInputError(f"{where}.{key}: must be >= 1, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise GalgenInputError(f"{where}.lr: must be > 0, got {self.lr!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise GalgenInputError(f"{where}.lr_schedule: 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.lr_warmup < 0 or self.lr_warmup >= self.steps:
            raise GalgenInputError(f"{where}.lr_warmup: must be in [0, steps={self.steps}), got {self.lr_warmup!r}")
        if not 0 <= self.lr_min <= self.lr:
            raise GalgenInputError(f"{where}.lr_min: must be in [0, lr={self.lr}], got {self.lr_min!r}")
        if not 0 <= self.val_fraction < 1:
            raise GalgenInputError(f"{where}.val_fraction: must be in [0, 1), got {self.val_fraction!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise GalgenInputError(f"{where}.precision: one of auto, bf16, fp32; got {self.precision!r}")
        if not (math.isfinite(self.depth_mix) and self.depth_mix >= 1):
            raise GalgenInputError(f"{where}.depth_mix: must be >= 1 (1: the file's depth), got {self.depth_mix!r}")
        if self.depth_mix_steps < 0:
            raise GalgenInputError(f"{where}.depth_mix_steps: must be >= 0, got {self.depth_mix_steps!r}")
        if self.snr_cap is not None and not self.snr_cap > 0:
            raise GalgenInputError(f"{where}.snr_cap: must be > 0, got {self.snr_cap!r}")
        if self.prior_codes not in ("posterior", "map"):
            raise GalgenInputError(f"{where}.prior_codes: 'posterior' or 'map', got {self.prior_codes!r}")
        if self.prior_map_steps < 1:
            raise GalgenInputError(f"{where}.prior_map_steps: must be >= 1, got {self.prior_map_steps!r}")
        if self.num_workers < 0 or self.prior_epochs < 0 or self.prior_samples < 1:
            raise GalgenInputError(f"{where}: num_workers, prior_epochs must be >= 0 and prior_samples >= 1")


@dataclass(frozen=True)
class RunConfig:
    """A training run: the model's options and the loop's.

    Parameters
    ----------
    model : dict
        ``kind`` (``ae``, ``vae`` or ``wgan-gp``) and the model's constructor options;
        ``stamp``, ``oversampling``, ``input_scale`` and ``flux_scale`` default to values
        read from the training data.
    train : TrainConfig
        Loop options.
    """

    model: dict = field(default_factory=lambda: {"kind": "vae"})
    train: TrainConfig = field(default_factory=TrainConfig)


def load_run_config(path, overrides: dict | None = None) -> RunConfig:
    """Read a training configuration YAML (``model:`` and ``train:`` sections).

    Parameters
    ----------
    path : str or os.PathLike
        YAML file, read with ``yaml.safe_load``.
    overrides : dict, optional
        ``train`` options replacing the file's (e.g. from the command line).

    Returns
    -------
    RunConfig

    Raises
    ------
    GalgenInputError
        Missing file, unknown keys, wrong types, unknown model kind.
    """
    data = read_yaml(path)
    if overrides:
        data = dict(data)
        data["train"] = {**(data.get("train") or {}), **overrides}
    cfg = build_dataclass(RunConfig, data, str(path))
    from ..models.registry import MODEL_KINDS

    kind = cfg.model.get("kind")
    if kind not in MODEL_KINDS:
        raise GalgenInputError(f"{path}: model.kind must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    cfg.train.check(f"{path}: train")
    return cfg


def plain_config(obj):
    """The JSON round trip of a configuration: plain dicts, lists and scalars, keys sorted.

    How a run stores its configuration (in checkpoints and ``config.yaml``) and compares
    it on resume: tuples become lists and keys are sorted, as a JSON reader sees it.

    Parameters
    ----------
    obj : dict
        JSON-serialisable configuration (e.g. ``{"model": ..., "train": asdict(config)}``).

    Returns
    -------
    dict

    Examples
    --------
    >>> plain_config({"train": {"steps": 3}, "model": {"kind": "vae", "betas": (0.9, 0.99)}})
    {'model': {'betas': [0.9, 0.99], 'kind': 'vae'}, 'train': {'steps': 3}}
    """
    return json.loads(json.dumps(obj, sort_keys=True))
