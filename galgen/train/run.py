"""The ``galgen train`` stage: :func:`train` builds a model and its training data, then trains it.

The model's options default to values derived from the training data (its stamp and
oversampling, the noise level as ``input_scale`` and the peak brightness as
``flux_scale``), and the resolved configuration is written to ``config.yaml`` in the run
directory beside the outputs of :class:`~galgen.train.Trainer`.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.atomic import atomic_output
from ..errors import GalgenInputError
from ..runtime import resolve_device
from .config import RunConfig, TrainConfig, load_run_config, plain_config
from .data import TrainingData, split_indices
from .distributed import init_distributed
from .trainer import Trainer

__all__ = ["train"]


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
    from ..models.registry import build_model, model_class

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
        accepts = inspect.signature(model_class(model_cfg.get("kind", "")).__init__).parameters
        if "log_flux" in accepts:
            model_cfg.setdefault("log_flux", [round(v, 6) for v in stats["log_flux"]])
        if "encoder_noise_rms" in accepts:  # the lowest noise the encoder sees: the file's
            model_cfg.setdefault("encoder_noise_rms", round(stats["noise_rms"], 6))
        torch.manual_seed(tc.seed)
        model = build_model(model_cfg)
        if conditions:
            model.set_condition_stats(stats["cond_mean"], stats["cond_std"])
            model.set_condition_bank(train_data.cond, seed=tc.seed)
        run_config = {"model": model.config, "train": asdict(tc)}
        trainer = Trainer(model, train_data, val_data, tc, out, provenance=_provenance(train_data, train_idx,
                                                                                          val_idx, tc.seed),
                          run_config=run_config, context=ctx, device=device)
        trainer.ctx.broadcast_module(trainer.model)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            import yaml

            with atomic_output(out / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(plain_config(run_config), sort_keys=False))
        if resume:
            trainer.resume()
        elif tc.init:
            trainer.initialise(tc.init)
            if conditions:
                # fine-tuning keeps the standardisation the weights learned with, but draws
                # unconditioned samples from this training set's conditions
                model.set_condition_bank(train_data.cond, seed=tc.seed)
        summary = trainer.fit()
        summary["model"] = trainer.finish()
        return summary
    finally:
        ctx.close()
