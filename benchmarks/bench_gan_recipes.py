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
   between held-out galaxies and generated ones observed with their PSFs and noise
   (what the trainer's validation measures), the mean ``|e|`` and HSM size of both and the
   ratio of the 10-90% ranges of log flux: on the validation split that training used
   (``--val-fraction``, ``--seed``) or on the first ``--n`` galaxies of ``--held-out``.

    python benchmarks/bench_gan_recipes.py --data sdss_train_50k.h5 \\
        --model sdss-wgan --model runs/sdss-gan/step_3500.pt [--held-out holdout.h5 --n 5000] [--json out.json]
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


def held_out_statistics(model_ref, data, indices):
    """Flux, HSM size and |e| of held-out galaxies and of fakes observed like them.

    What the trainer's validation measures (``validation_fakes``, ``observed_statistics``):
    one fake per galaxy from the averaged generator, with that galaxy's PSF and noise,
    latent vectors and noise seeded by the galaxies' indices.
    """
    from galgen.checkpoints import load_model
    from galgen.evaluation import observed_statistics
    from galgen.pretrained import available_pretrained, load_pretrained
    from galgen.train.data import TrainingData

    model = load_pretrained(model_ref) if model_ref in available_pretrained() else load_model(model_ref)
    model.eval()
    val = TrainingData(data, indices)
    real, fake = {}, {}
    t = time.perf_counter()
    with torch.no_grad():
        for batch in val.iter_batches(64, torch.arange(len(val))):
            _, observed = model.validation_fakes(batch)
            mask = getattr(batch.observation.noise, "mask", None)
            for store, images in ((real, batch.observed), (fake, observed)):
                for name, v in observed_statistics(images, mask).items():
                    store.setdefault(name, []).append(v)
    real = {k: np.concatenate(v) for k, v in real.items()}
    fake = {k: np.concatenate(v) for k, v in fake.items()}
    return model, real, fake, time.perf_counter() - t


def summarise(model_ref, kind, real, fake, seconds):
    """KS distances and the issue's population figures (mean |e|, mean size, log-flux range)."""
    from galgen.evaluation.distances import ks_distance

    def spread(x):
        lx = np.log10(x[np.isfinite(x) & (x > 0)])
        return float(np.percentile(lx, 90) - np.percentile(lx, 10))

    out = {"model": str(model_ref), "kind": kind, "n": int(len(real["flux"])), "seconds": seconds}
    for name in ("flux", "sigma", "e"):
        out[f"ks_{name}"] = ks_distance(real[name], fake[name])
    out["mean_e_real"], out["mean_e_fake"] = float(np.nanmean(real["e"])), float(np.nanmean(fake["e"]))
    out["mean_sigma_ratio"] = float(np.nanmean(fake["sigma"]) / np.nanmean(real["sigma"]))
    out["log_flux_10_90_ratio"] = spread(fake["flux"]) / spread(real["flux"])
    out["hsm_failed_fake"] = float(np.mean(~np.isfinite(fake["sigma"])))
    out["hsm_failed_real"] = float(np.mean(~np.isfinite(real["sigma"])))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data", required=True, help="the training file (its validation split is used)")
    ap.add_argument("--model", action="append", default=[], help="checkpoint, run directory or pretrained name")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per recipe")
    ap.add_argument("--held-out", default=None, help="file of held-out galaxies (default: the validation "
                    "split of --data, as in training)")
    ap.add_argument("--n", type=int, default=1000, help="held-out galaxies used")
    ap.add_argument("--val-fraction", type=float, default=0.02, help="the training runs' val_fraction")
    ap.add_argument("--seed", type=int, default=0, help="the training runs' seed (their split)")
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
    rows = []
    for m in args.model:
        if args.held_out:
            indices, path = np.arange(args.n), args.held_out
        else:  # the validation split of the model's training run
            from galgen.data.cutouts import CutoutFile
            from galgen.train.data import split_indices

            with CutoutFile(args.data) as f:
                n_file = len(f)
            indices, path = split_indices(n_file, args.val_fraction, args.seed)[1][:args.n], args.data
        model, real, fake, sec = held_out_statistics(m, path, indices)
        rows.append(summarise(m, model.kind, real, fake, sec))
    for r in rows:
        print(f"{r['model']} ({r['n']} galaxies): KS flux {r['ks_flux']:.3f}  size {r['ks_sigma']:.3f}  "
              f"|e| {r['ks_e']:.3f}; mean |e| {r['mean_e_fake']:.3f} vs {r['mean_e_real']:.3f}; "
              f"mean size ratio {r['mean_sigma_ratio']:.3f}; log-flux 10-90% range ratio "
              f"{r['log_flux_10_90_ratio']:.3f}")
    info = machine_info()
    info.update(threads=torch.get_num_threads())
    print(json.dumps(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "seconds_per_step": costs,
                                               "wgan_step_in_gan_steps": ratio, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
