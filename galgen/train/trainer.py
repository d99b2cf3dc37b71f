"""The training loop: devices, mixed precision, logs, validation, checkpoints, exact resume, DDP.

One :class:`Trainer` trains any :class:`galgen.models.GenerativeModel`. Determinism is
built in rather than recorded: the order of the batches depends only on (seed, epoch),
and the random numbers of step ``s`` on process ``r`` come from a generator re-seeded
with (seed, s, r). A run resumed from a checkpoint therefore continues with the very
batches and noise draws an uninterrupted run would use, and ends with identical weights
on the CPU. :func:`galgen.train.train` builds a trainer from a YAML file and a cutout file.

What a trainer writes into its run directory::

    last.pt            checkpoint every ``checkpoint_every`` steps (atomic)
    best.pt            checkpoint with the lowest validation loss
    model.pt           the final model (weights, config, provenance, quality figures)
    train_log.csv      step, epoch, wall time (seconds of training, summed over resumes) and the
                       model's metrics every ``log_every`` steps
    val_log.csv        validation metrics every ``val_every`` steps (:mod:`galgen.train.logs`)
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import GalgenInputError, TrainingDiverged
from ..inference.map import map_codes
from ..models.base import good_pixels
from ..runtime import derive_seed, resolve_device
from ..checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig, plain_config
from .data import TrainingData, epoch_order
from .distributed import DistributedContext
from .logs import TRAIN_LOG, VAL_LOG, CSVLog

__all__ = ["Trainer", "depth_factors"]

log = logging.getLogger("galgen.train")

#: Training options that change the trajectory; a resume must keep them.
_TRAJECTORY_KEYS = ("batch_size", "lr", "seed", "val_fraction", "optimizer", "lr_schedule", "lr_warmup",
                    "lr_min", "init")


def _step_seed(seed: int, step: int, rank: int) -> int:
    return derive_seed(seed, int(step) * 101 + int(rank))


def depth_factors(batch, depth_mix: float, snr_cap: float | None = None, deepest: float = 1.0) -> torch.Tensor:
    """Per-galaxy variance factors of a training step on a mixture of depths.

    Drawn log-uniformly in ``[deepest, depth_mix]`` (from torch's global generator, which
    the trainer seeds per step); with ``snr_cap``, at least ``(snr / snr_cap) ** 2``
    (capped at ``depth_mix``), where ``snr`` is the galaxy's signal-to-noise ratio in the
    batch, ``sqrt(max(sum(observed**2 / variance) - n_pixels, 0))`` over its unmasked pixels.

    Parameters
    ----------
    batch : galgen.physics.Batch
    depth_mix : float
        ``>= 1``.
    snr_cap : float, optional
    deepest : float, optional
        The smallest factor, in ``[1, depth_mix]`` (``train.depth_mix_steps`` moves it
        from ``depth_mix`` to 1).

    Returns
    -------
    torch.Tensor
        ``(B,)`` factors in ``[1, depth_mix]``, the observed images' dtype.
    """
    obs = batch.observed
    u = torch.rand(obs.shape[0], device=obs.device, dtype=obs.dtype)
    lo = math.log(min(max(float(deepest), 1.0), depth_mix))
    f = torch.exp(lo + u * (math.log(depth_mix) - lo))
    if snr_cap is not None:
        chi2 = batch.observation.noise.chi2(obs, torch.zeros_like(obs))
        snr2 = (chi2 - good_pixels(obs, batch.observation)).clamp(min=0)
        f = torch.maximum(f, (snr2 / float(snr_cap) ** 2).clamp(max=depth_mix))
    return f.clamp(1.0, float(depth_mix))


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
    See :func:`galgen.train.train`, which builds everything from a YAML file and a cutout file.
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
        self.run_config = plain_config(run_config or {"model": model.config, "train": asdict(config)})
        if config.batch_size % self.ctx.world_size:
            raise GalgenInputError(f"train.batch_size: {config.batch_size} is not divisible by the "
                                   f"{self.ctx.world_size} data-parallel processes")
        self.steps_per_epoch = len(train_data) // config.batch_size
        if self.steps_per_epoch < 1:
            raise GalgenInputError(f"train.batch_size: {config.batch_size} is larger than the "
                                   f"{len(train_data)} training galaxies")
        self._batches, self._batches_step = None, None  # the reader of the coming batches (prefetch)
        self.optimizers = model.make_optimizers(lr=config.lr, **config.optimizer)
        self._base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in self.optimizers.items()}
        self.step = 0
        self.best_val = math.inf
        self.train_log = CSVLog(self.out / TRAIN_LOG)
        self.val_log = CSVLog(self.out / VAL_LOG)
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
        if ck["provenance"].get("init"):  # a resumed fine-tuning still names the weights it started from
            self.provenance = {**self.provenance, "init": ck["provenance"]["init"]}
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
        from ..checkpoints import load_model

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

    def _next_batch(self):
        """The batch of ``self.step``: from the training data's read-ahead (``num_workers``) when in step."""
        if self._batches is None or self._batches_step != self.step:
            coming = (self._global_positions(s) for s in range(self.step, max(self.config.steps, self.step + 1)))
            self._batches, self._batches_step = iter(self.train_data.prefetch(coming)), self.step
        self._batches_step += 1
        return next(self._batches)

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
        batch = self._next_batch()
        torch.manual_seed(_step_seed(self.config.seed, self.step, self.ctx.rank))
        batch = self._at_training_depth(batch, self.step)
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
        from ..evaluation.morphology import OBSERVED_STATISTICS, observed_statistics

        sums, count, dists = {}, 0, {}
        gen_state = torch.get_rng_state()
        torch.manual_seed(_step_seed(self.config.seed, -1, self.ctx.rank))
        for batch in self.val_data.iter_batches(self.config.batch_size, share):
            with self._autocast():
                out = dict(self.model.validation_step(batch))
            fakes = out.pop("observed_fakes", None)
            if fakes is not None:  # a GAN: compare the populations, not per-galaxy losses
                mask = getattr(batch.observation.noise, "mask", None)
                real, fake = observed_statistics(batch.observed, mask), observed_statistics(fakes, mask)
                for name in OBSERVED_STATISTICS:
                    have = dists.setdefault(name, ([], []))
                    have[0].append(real[name])
                    have[1].append(fake[name])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().sum()
            count += len(batch)
        torch.set_rng_state(gen_state)
        keys = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], device=self.device) for k in keys]
                          + [torch.tensor(float(count), device=self.device)])
        vec = self.ctx.all_reduce_sum(vec)
        result = {k: float(vec[i] / vec[-1]) for i, k in enumerate(keys)}
        result.update(self._distribution_distances(dists))
        if "loss" not in result and "ks_mean" in result:
            result["loss"] = result["ks_mean"]
        return result

    @torch.no_grad()
    def validation_grid(self, step: int):
        """Write ``val_samples/step_<step>.png``: held-out galaxies and fakes observed like them.

        Only for models with ``validation_panels`` (the GANs); the first validation
        galaxies, with the same latent vectors and noise every time.

        Parameters
        ----------
        step : int

        Returns
        -------
        pathlib.Path or None
            The PNG, or None when the model or the data give nothing to show.
        """
        if not hasattr(self.model, "validation_panels") or self.val_data is None or not len(self.val_data):
            return None
        from ..evaluation.figures import sample_grid

        self.model.eval()
        batch = next(iter(self.val_data.iter_batches(8, torch.arange(min(8, len(self.val_data))))))
        with self._autocast():
            panels, noise = self.model.validation_panels(batch)
        return sample_grid(panels, noise, self.out / "val_samples" / f"step_{step:06d}.png",
                           title=f"step {step}: held-out galaxies and generated ones observed like them")

    def _distribution_distances(self, dists: dict) -> dict:
        """``ks_<name>`` of the real-vs-generated statistics gathered over all processes.

        Where the model's validation gives no per-galaxy loss (a GAN has no likelihood),
        ``loss`` is the mean of these KS distances, so ``best.pt`` keeps the model whose
        generated population matches the held-out one best.
        """
        from ..evaluation.distances import ks_distance

        out = {}
        for name in sorted(dists):
            real, fake = (np.concatenate(parts) for parts in dists[name])
            if self.ctx.active:
                gathered = [None] * self.ctx.world_size
                torch.distributed.all_gather_object(gathered, (real, fake))
                real = np.concatenate([g[0] for g in gathered])
                fake = np.concatenate([g[1] for g in gathered])
            ks = ks_distance(real, fake)
            if math.isfinite(ks):
                out[f"ks_{name}"] = ks
        ks_values = [v for k, v in out.items() if k.startswith("ks_")]
        if ks_values:
            out.setdefault("ks_mean", float(np.mean(ks_values)))
        return out

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
        # wall time is the run's, across resumes: continue from the last row kept
        wall0 = float(self.train_log.rows[-1].get("wall_s") or 0.0) if self.train_log.rows else 0.0
        last_val = {}
        while self.step < cfg.steps:
            metrics = self.train_step()
            s = self.step
            bar.update(1)
            if s % cfg.log_every == 0 or s == cfg.steps:
                row = {"step": s, "epoch": (s - 1) // self.steps_per_epoch,
                       "images": s * cfg.batch_size, "wall_s": round(wall0 + time.perf_counter() - t0, 3)}
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
                    if main and cfg.val_images:
                        self.validation_grid(s)
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

    def _at_training_depth(self, batch, step: int):
        """``batch`` as step ``step`` sees it: made shallower per galaxy with ``depth_mix`` (else as it is)."""
        cfg = self.config
        if cfg.depth_mix <= 1:
            return batch
        ramp = min(step / cfg.depth_mix_steps, 1.0) if cfg.depth_mix_steps else 1.0
        return batch.shallower(depth_factors(batch, cfg.depth_mix, cfg.snr_cap, cfg.depth_mix ** (1.0 - ramp)))

    def _prior_batches(self):
        """The training galaxies for the flow-prior fit, at the depths training ended on (``depth_mix``)."""
        for batch in self.train_data.iter_batches(self.config.batch_size):
            yield self._at_training_depth(batch, self.config.steps)

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
            if self.config.prior_codes == "map":
                codes, cond = map_codes(self.model, self._prior_batches(), max_iter=self.config.prior_map_steps,
                                        log=log.info)
            else:
                codes, cond = self.model.aggregate_posterior(self._prior_batches(),
                                                             samples_per_galaxy=self.config.prior_samples)
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
