"""The training loop: devices, mixed precision, logs, validation, checkpoints, exact resume, DDP.

One :class:`Trainer` trains any :class:`galgen.models.GenerativeModel`. Determinism is
built in rather than recorded: the order of the batches depends only on (seed, epoch),
and the random numbers of step ``s`` on process ``r`` come from a generator re-seeded
with (seed, s, r). A run resumed from a checkpoint therefore continues with the very
batches and noise draws an uninterrupted run would use, and ends with identical weights
on the CPU.

Outputs of a run directory::

    config.yaml        the resolved configuration (model and training)
    last.pt            checkpoint every ``checkpoint_every`` steps (atomic)
    best.pt            checkpoint with the lowest validation loss
    model.pt           the final model (weights, config, provenance, quality figures)
    train_log.csv      step, epoch, wall time and the model's metrics every ``log_every`` steps
    val_log.csv        validation metrics every ``val_every`` steps
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import build_dataclass, read_yaml
from ..data.atomic import atomic_output
from ..errors import GalgenInputError, TrainingDiverged
from ..runtime import derive_seed, resolve_device
from .checkpoints import load_checkpoint, save_checkpoint
from .data import TrainingData, epoch_order, split_indices
from .distributed import DistributedContext, init_distributed

__all__ = ["TrainConfig", "RunConfig", "Trainer", "TrainingDiverged", "load_run_config", "train",
           "resolve_device"]

log = logging.getLogger("galgen.train")

#: Training options that change the trajectory; a resume must keep them.
_TRAJECTORY_KEYS = ("batch_size", "lr", "seed", "val_fraction", "optimizer", "lr_schedule", "lr_warmup",
                    "lr_min", "init")


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
    tensorboard : bool
        Also write TensorBoard event files (needs the ``tensorboard`` package).
    progress : bool, optional
        Progress bar (default: when stderr is a terminal).
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
    tensorboard: bool = False
    progress: bool | None = None

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


def _json(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def _step_seed(seed: int, step: int, rank: int) -> int:
    return derive_seed(seed, int(step) * 101 + int(rank))


class _CSVLog:
    """Rows of metrics, kept in memory and written atomically with each checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def load(self, max_step: int) -> None:
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= max_step]

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(self.rows)
        with atomic_output(self.path) as tmp:
            tmp.write_text(buf.getvalue())


class Trainer:
    """Train a generative model on a cutout file.

    Parameters
    ----------
    model : galgen.models.GenerativeModel
        The model (on the CPU; the trainer moves it).
    train_data : TrainingData
        Training galaxies.
    val_data : TrainingData or None
        Validation galaxies.
    config : TrainConfig
        Loop options.
    out : str or os.PathLike
        Run directory.
    provenance : dict, optional
        Where the data came from; stored in every checkpoint.
    run_config : dict, optional
        The whole configuration (stored in checkpoints and checked on resume).
    context : DistributedContext, optional
        Data-parallel context (default: single process).
    device : torch.device, optional
        Device (default: from ``config.device``).

    Examples
    --------
    See :func:`train`, which builds everything from a YAML file and a cutout file.
    """

    def __init__(self, model, train_data: TrainingData, val_data, config: TrainConfig, out, *,
                 provenance: dict | None = None, run_config: dict | None = None,
                 context: DistributedContext | None = None, device=None):
        self.config = config
        self.ctx = context or DistributedContext()
        self.device = torch.device(device) if device is not None else resolve_device(config.device)
        self.model = model.to(self.device)
        self.train_data, self.val_data = train_data, val_data
        self.out = Path(out)
        self.provenance = provenance or {}
        self.run_config = _json(run_config or {"model": model.config, "train": asdict(config)})
        if config.batch_size % self.ctx.world_size:
            raise GalgenInputError(f"train.batch_size: {config.batch_size} is not divisible by the "
                                   f"{self.ctx.world_size} data-parallel processes")
        self.steps_per_epoch = len(train_data) // config.batch_size
        if self.steps_per_epoch < 1:
            raise GalgenInputError(f"train.batch_size: {config.batch_size} is larger than the "
                                   f"{len(train_data)} training galaxies")
        self.optimizers = model.make_optimizers(lr=config.lr, **config.optimizer)
        self._base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()}
        self.step = 0
        self.best_val = math.inf
        self.train_log = _CSVLog(self.out / "train_log.csv")
        self.val_log = _CSVLog(self.out / "val_log.csv")
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self._tb = None

    # -- checkpoints --------------------------------------------------------------------
    def _save(self, name: str, metrics: dict | None = None, with_optimizer: bool = True) -> Path:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        opt = {k: o.state_dict() for k, o in self.optimizers.items()} if with_optimizer else None
        return save_checkpoint(self.out / name, model_state=state, config=self.run_config, step=self.step,
                               optimizer_state=opt, provenance=self.provenance,
                               metrics={"best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
                                        **(metrics or {})})

    def resume(self, path=None) -> int:
        """Continue from a checkpoint (default ``last.pt`` of the run directory).

        Parameters
        ----------
        path : str or os.PathLike, optional
            Checkpoint file.

        Returns
        -------
        int
            The step training continues from.

        Raises
        ------
        GalgenInputError
            No checkpoint, or one of another model or training trajectory.
        """
        path = Path(path) if path is not None else self.out / "last.pt"
        ck = load_checkpoint(path, map_location="cpu")
        have, want = ck["config"], self.run_config
        if have.get("model") != want.get("model"):
            raise GalgenInputError(f"{path}: checkpoint of another model config "
                                   f"({have.get('model')} vs {want.get('model')})")
        keys = _TRAJECTORY_KEYS + (("steps",) if self.config.lr_schedule != "constant" else ())
        diff = [k for k in keys if have.get("train", {}).get(k) != want.get("train", {}).get(k)]
        if diff:
            raise GalgenInputError(f"{path}: training options {diff} differ from the checkpoint's; "
                                   "an exact resume needs the same ones")
        self.model.load_state_dict(ck["model"])
        if ck["optimizer"] is None:
            raise GalgenInputError(f"{path}: holds no optimiser state (a final model, not a checkpoint)")
        for k, o in self.optimizers.items():
            o.load_state_dict(ck["optimizer"][k])
        self.step = int(ck["step"])
        best = ck["metrics"].get("best_val_loss")
        self.best_val = math.inf if best is None else float(best)
        self.train_log.load(self.step)
        self.val_log.load(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return self.step

    def initialise(self, path) -> None:
        """Start from the weights of another run (``train.init``): fine-tuning.

        Parameters
        ----------
        path : str or os.PathLike
            Run directory (its ``model.pt``, else ``last.pt``) or checkpoint file.

        Raises
        ------
        GalgenInputError
            No checkpoint there, or one of another model configuration.
        """
        from .checkpoints import load_model

        source = load_model(path)
        mine = self.model.config
        try:
            if source.config.get("kind") != mine.get("kind"):
                raise RuntimeError("kind")
            self.model.load_state_dict(source.state_dict())
        except RuntimeError:
            keys = sorted(k for k in set(source.config) | set(mine) if source.config.get(k) != mine.get(k))
            raise GalgenInputError(f"train.init: {path} holds a model of another architecture (its config "
                                   f"differs in {keys}); fine-tuning needs the same one") from None
        self.provenance = {**self.provenance, "init": str(getattr(source, "checkpoint_path", path))}
        log.info("initialised from %s", path)

    def _set_lr(self, step: int) -> float:
        factor = self.config.lr_at(step) / self.config.lr
        for k, o in self.optimizers.items():
            for g, base in zip(o.param_groups, self._base_lr[k]):
                g["lr"] = base * factor
        return self.config.lr * factor

    # -- one step -----------------------------------------------------------------------
    def _global_positions(self, step: int) -> torch.Tensor:
        epoch, b = divmod(step, self.steps_per_epoch)
        B = self.config.batch_size
        order = epoch_order(len(self.train_data), epoch, self.config.seed)
        batch = order[b * B:(b + 1) * B]
        per = B // self.ctx.world_size
        return batch[self.ctx.rank * per:(self.ctx.rank + 1) * per]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict:
        """Run one optimisation step on the next batch.

        Returns
        -------
        dict of str to float
            The model's metrics (on this process's share of the batch).

        Raises
        ------
        TrainingDiverged
            If the loss is NaN or infinite on any process.
        """
        self.model.train()
        lr = self._set_lr(self.step)
        batch = self.train_data.batch(self._global_positions(self.step))
        torch.manual_seed(_step_seed(self.config.seed, self.step, self.ctx.rank))
        with self._autocast():
            metrics = self.model.training_step(batch, self.optimizers, self.step, sync=self.ctx.sync)
        loss = metrics["loss"].detach().float()
        bad = self.ctx.all_reduce_sum((~torch.isfinite(loss)).float().reshape(1))
        if bad.item() > 0:
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step}; stopped. The last good "
                                   f"checkpoint is {self.out / 'last.pt'} (lower the learning rate or check the "
                                   "data for bad pixels)")
        self.step += 1
        out = {k: float(v) for k, v in metrics.items()}
        if self.config.lr_schedule != "constant" or self.config.lr_warmup:
            out["lr"] = lr
        return out

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean validation metrics over (at most ``max_val``) held-out galaxies.

        Returns
        -------
        dict of str to float
            Averages over all processes' shares.
        """
        if self.val_data is None or len(self.val_data) == 0:
            return {}
        self.model.eval()
        n = min(len(self.val_data), self.config.max_val)
        share = torch.arange(n)[self.ctx.rank::self.ctx.world_size]
        sums, count = {}, 0
        gen_state = torch.get_rng_state()
        torch.manual_seed(_step_seed(self.config.seed, -1, self.ctx.rank))
        for batch in self.val_data.iter_batches(self.config.batch_size, share):
            with self._autocast():
                out = self.model.validation_step(batch)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().sum()
            count += len(batch)
        torch.set_rng_state(gen_state)
        keys = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], device=self.device) for k in keys]
                          + [torch.tensor(float(count), device=self.device)])
        vec = self.ctx.all_reduce_sum(vec)
        return {k: float(vec[i] / vec[-1]) for i, k in enumerate(keys)}

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``config.steps``, validating, logging and checkpointing on the way.

        Returns
        -------
        dict
            ``step``, ``best_val_loss`` and the last validation metrics.

        Raises
        ------
        TrainingDiverged
            On a NaN/inf loss (``last.pt`` keeps the last good state).
        """
        from tqdm.auto import tqdm

        cfg = self.config
        main = self.ctx.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard and self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise GalgenInputError("train.tensorboard: needs the 'tensorboard' package "
                                           "(pip install tensorboard)") from None
                self._tb = SummaryWriter(str(self.out / "tensorboard"))
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (show and main), desc="train",
                   dynamic_ncols=True)
        t0 = time.perf_counter()
        start = self.step
        last_val = {}
        while self.step < cfg.steps:
            metrics = self.train_step()
            s = self.step
            bar.update(1)
            if s % cfg.log_every == 0 or s == cfg.steps:
                row = {"step": s, "epoch": (s - 1) // self.steps_per_epoch,
                       "images": s * cfg.batch_size, "wall_s": round(time.perf_counter() - t0, 3)}
                row.update({k: f"{v:.6g}" for k, v in sorted(metrics.items())})
                self.train_log.add(row)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                if main:
                    rate = (s - start) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                    log.info("step %d/%d  %s  (%.1f images/s)", s, cfg.steps,
                             "  ".join(f"{k} {v:.5g}" for k, v in sorted(metrics.items())), rate)
                if self._tb is not None:
                    for k, v in metrics.items():
                        self._tb.add_scalar(f"train/{k}", v, s)
            if s % cfg.val_every == 0 or s == cfg.steps:
                last_val = self.validate()
                if last_val:
                    self.val_log.add({"step": s, **{k: f"{v:.6g}" for k, v in last_val.items()}})
                    if self._tb is not None:
                        for k, v in last_val.items():
                            self._tb.add_scalar(f"val/{k}", v, s)
                    if main:
                        log.info("step %d validation: %s", s,
                                 "  ".join(f"{k} {v:.5g}" for k, v in sorted(last_val.items())))
                    if last_val["loss"] < self.best_val:
                        self.best_val = last_val["loss"]
                        if main:
                            self._save("best.pt", {"val": last_val})
            if s % cfg.checkpoint_every == 0 or s == cfg.steps:
                if main:
                    self._save("last.pt", {"val": last_val})
                    self.train_log.flush()
                    self.val_log.flush()
                self.ctx.barrier()
        bar.close()
        return {"step": self.step, "best_val_loss": self.best_val, "val": last_val}

    def finish(self, quality: dict | None = None) -> Path | None:
        """Fit the VAE's latent prior (if any) and write ``model.pt``.

        Parameters
        ----------
        quality : dict, optional
            Extra figures to store with the model.

        Returns
        -------
        pathlib.Path or None
            ``model.pt`` (on the main process).
        """
        self.model.eval()
        metrics = {"val": {}, **(quality or {})}
        if hasattr(self.model, "fit_prior") and self.config.prior_epochs > 0:
            g = torch.Generator(device="cpu").manual_seed(self.config.seed)
            torch.manual_seed(_step_seed(self.config.seed, -2, 0))
            codes, cond = self.model.aggregate_posterior(
                self.train_data.iter_batches(self.config.batch_size), samples_per_galaxy=self.config.prior_samples)
            if self.ctx.is_main:
                hist = self.model.fit_prior(codes, cond, epochs=self.config.prior_epochs, generator=g)
                best = hist.get("best_val_loss") if isinstance(hist, dict) else None
                metrics["prior_val_nll"] = best
            self.ctx.broadcast_module(self.model)
        if self.val_data is not None and len(self.val_data):
            metrics["val"] = self.validate()
        if not self.ctx.is_main:
            return None
        path = self._save("model.pt", metrics, with_optimizer=False)
        if self._tb is not None:
            self._tb.close()
        return path


def _provenance(data: TrainingData, train_idx, val_idx, seed: int) -> dict:
    m = data.meta
    return {"data": str(data.path.resolve()), "data_fingerprint": m.fingerprint, "survey": m.survey,
            "pixel_scale": m.pixel_scale, "oversampling": m.oversampling, "stamp": m.stamp,
            "n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "split_seed": int(seed)}


def train(config, data, out, *, resume: bool = False, overrides: dict | None = None) -> dict:
    """Train a model from a YAML configuration on a cutout file (``galgen train``).

    Under ``torchrun`` every process calls this; they split each batch and average
    gradients (see :mod:`galgen.train.distributed`).

    Parameters
    ----------
    config : str, os.PathLike or RunConfig
        Training configuration (``model:`` and ``train:`` sections).
    data : str or os.PathLike
        Cutout file of training galaxies (a ``val_fraction`` of them is held out).
    out : str or os.PathLike
        Run directory.
    resume : bool, optional
        Continue from ``out/last.pt``; without it an existing ``last.pt`` is an error.
    overrides : dict, optional
        ``train`` options replacing the configuration's.

    Returns
    -------
    dict
        ``model`` (path of ``model.pt``), ``step``, ``best_val_loss``, ``val``.
    """
    from ..data.cutouts import CutoutFile
    from ..models.registry import build_model

    if isinstance(config, RunConfig):
        cfg = config if not overrides else RunConfig(config.model, TrainConfig(**{**asdict(config.train),
                                                                                 **overrides}))
        cfg.train.check()
    else:
        cfg = load_run_config(config, overrides)
    tc = cfg.train
    out = Path(out)
    if (out / "last.pt").exists() and not resume:
        raise GalgenInputError(f"{out}: holds a training run (last.pt); pass --resume to continue it, "
                               "or choose another --out")
    if resume and not (out / "last.pt").exists():
        raise GalgenInputError(f"{out}: nothing to resume (no last.pt)")
    device = resolve_device(tc.device)
    ctx = init_distributed(str(device))
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        with CutoutFile(data) as f:
            n = len(f)
        train_idx, val_idx = split_indices(n, tc.val_fraction, tc.seed)
        conditions = tuple(cfg.model.get("conditions", ()) or ())
        dev = device if tc.in_memory else "cpu"
        train_data = TrainingData(data, train_idx, conditions, tc.in_memory, tc.num_workers, device=dev)
        val_data = TrainingData(data, val_idx, conditions, tc.in_memory, 0, device=dev) if len(val_idx) else None
        meta = train_data.meta
        stats = train_data.statistics()
        model_cfg = dict(cfg.model)
        for key, value in (("stamp", meta.stamp), ("oversampling", meta.oversampling)):
            if model_cfg.setdefault(key, value) != value:
                raise GalgenInputError(f"model.{key}: {model_cfg[key]} does not match the data file's "
                                       f"{key} {value} ({data})")
        model_cfg.setdefault("input_scale", round(stats["noise_rms"], 6))
        model_cfg.setdefault("flux_scale", round(max(stats["peak"], 1e-3) / meta.oversampling**2, 6))
        torch.manual_seed(tc.seed)
        model = build_model(model_cfg)
        if conditions:
            model.set_condition_stats(stats["cond_mean"], stats["cond_std"])
        run_config = {"model": model.config, "train": asdict(tc)}
        trainer = Trainer(model, train_data, val_data, tc, out, provenance=_provenance(train_data, train_idx,
                                                                                          val_idx, tc.seed),
                          run_config=run_config, context=ctx, device=device)
        trainer.ctx.broadcast_module(trainer.model)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            import yaml

            with atomic_output(out / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(_json(run_config), sort_keys=False))
        if resume:
            trainer.resume()
        elif tc.init:
            trainer.initialise(tc.init)
        summary = trainer.fit()
        summary["model"] = trainer.finish()
        return summary
    finally:
        ctx.close()
