#!/usr/bin/env python
"""Benchmark: the GAN recipes at equal CPU time — cost per step, and what a run has learnt.

Two parts, on the same machine and in the same run:

1. **Cost per training step** of each recipe on the same batch of 64 simulated SDSS
   cutouts (64x64, per-galaxy PSFs and variance maps, through the physics layer): the
   WGAN-GP of ``pipelines/configs/wgan_sdss.yaml`` (one critic update with the gradient
   penalty's double backward, a generator update every 5 steps) and the GAN of
   ``pipelines/configs/gan_sdss.yaml`` (one critic and one generator update per step,
   R1 every 16). Their ratio converts a WGAN-GP run's steps into the GAN steps of the
   same CPU time.
2. **What trained models have learnt**: for each ``--model`` (a checkpoint, run
   directory or pretrained name), the KS distances of total flux, HSM size and ``|e|``
   between held-out galaxies and generated ones observed with their PSFs and noise, on
   the validation split that training used (``val_fraction`` and ``seed`` of the
   config), measured by the trainer's own validation code.

    python benchmarks/bench_gan_recipes.py --data sdss_train_50k.h5 \\
        --model sdss-wgan --model runs/sdss-gan/step_3500.pt [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import machine_info

ROOT = Path(__file__).resolve().parents[1]


def step_cost(config_path, batch, stats, steps):
    """Seconds per training step of the recipe of a shipped config (after 2 warm-up steps)."""
    from galgen.models.registry import build_model
    from galgen.train import load_run_config

    cfg = dict(load_run_config(config_path).model)
    cfg.update(stamp=batch.observed.shape[-1], input_scale=stats["noise_rms"], flux_scale=stats["peak"])
    if cfg["kind"] == "gan":
        cfg["log_flux"] = stats["log_flux"]
    torch.manual_seed(0)
    model = build_model(cfg)
    opts = model.make_optimizers(lr=1e-4, **load_run_config(config_path).train.optimizer)
    for s in range(2):
        model.training_step(batch, opts, s)
    t = time.perf_counter()
    for s in range(2, steps + 2):
        model.training_step(batch, opts, s)
    return (time.perf_counter() - t) / steps, cfg["kind"]


def validation_distances(model_ref, data, max_val):
    """KS of flux, HSM size and |e| on the validation split, by the trainer's validation."""
    from galgen.checkpoints import load_model
    from galgen.data.cutouts import CutoutFile
    from galgen.pretrained import available_pretrained, load_pretrained
    from galgen.train import Trainer
    from galgen.train.config import TrainConfig
    from galgen.train.data import TrainingData, split_indices

    model = load_pretrained(model_ref) if model_ref in available_pretrained() else load_model(model_ref)
    train_cfg = (getattr(model, "run_config", None) or {}).get("train", {})
    val_fraction, seed = train_cfg.get("val_fraction", 0.02), train_cfg.get("seed", 0)
    with CutoutFile(data) as f:
        n = len(f)
    _, val_idx = split_indices(n, val_fraction, seed)
    val = TrainingData(data, val_idx[:max_val])
    cfg = TrainConfig(steps=1, batch_size=64, max_val=max_val, device="cpu", seed=seed)
    trainer = Trainer(model, val, val, cfg, out=Path("/nonexistent"))
    t = time.perf_counter()
    out = trainer.validate()
    return {"model": str(model_ref), "kind": model.kind, "n_val": len(val),
            **{k: out[k] for k in ("ks_flux", "ks_sigma", "ks_e", "ks_mean") if k in out},
            "validate_s": time.perf_counter() - t}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data", required=True, help="the training file (its validation split is used)")
    ap.add_argument("--model", action="append", default=[], help="checkpoint, run directory or pretrained name")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per recipe")
    ap.add_argument("--max-val", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from galgen.train.data import TrainingData

    data = TrainingData(args.data, np.arange(64))
    batch = data.batch(torch.arange(64))
    stats = data.statistics()
    costs = {}
    for name in ("wgan_sdss.yaml", "gan_sdss.yaml"):
        sec, kind = step_cost(ROOT / "pipelines" / "configs" / name, batch, stats, args.steps)
        costs[kind] = sec
        print(f"{kind:8s} {sec * 1000:7.0f} ms/step  {64 / sec:6.1f} images/s")
    ratio = costs["wgan-gp"] / costs["gan"]
    print(f"one WGAN-GP step costs {ratio:.2f} GAN steps")
    rows = [validation_distances(m, args.data, args.max_val) for m in args.model]
    for r in rows:
        print(f"{r['model']}: " + "  ".join(f"{k} {r[k]:.3f}" for k in ("ks_flux", "ks_sigma", "ks_e", "ks_mean")
                                            if k in r))
    info = machine_info()
    info.update(threads=torch.get_num_threads())
    print(json.dumps(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "seconds_per_step": costs,
                                               "wgan_step_in_gan_steps": ratio, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
