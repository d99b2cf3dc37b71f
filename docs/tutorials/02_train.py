"""Tutorial 2: train a VAE and a GAN on simulated galaxies (a few minutes on a CPU).

Writes under ./tutorial_out/02_train/:
  train.h5                   the simulated training set (32x32 SDSS stamps)
  vae.yaml, gan.yaml         the training configurations
  vae/, gan/                 run directories: config.yaml, model.pt (the final model),
                             last.pt and best.pt (checkpoints), train_log.csv, val_log.csv
  vae_curves.png, gan_curves.png   training curves
  vae_samples.png            intrinsic galaxies drawn from the trained VAE

The same from the shell, for the VAE:
  galgen simulate --survey sdss --n 512 --stamp 32 --psf-size 15 --seed 3 --out train.h5
  galgen train --config vae.yaml --data train.h5 --out vae
A real model is trained with the recipes of pipelines/configs/ (vae_sdss.yaml,
gan_sdss_r1.yaml) on 50,000 galaxies of 64x64 pixels: hours on a CPU, or use the
pretrained ones, galgen.load_pretrained("sdss-vae").
"""

import os
from pathlib import Path

import numpy as np
import torch
import yaml

from galgen.plotting import asinh_stretch, pyplot, save_figure, training_curves
from galgen.simulate import simulate
from galgen.train import load_model, train
from galgen.train.logs import read_log

QUICK = os.environ.get("GALGEN_QUICK") == "1"  # the test suite runs every tutorial at reduced size
N = 128 if QUICK else 512
VAE_STEPS = 30 if QUICK else 400
GAN_STEPS = 20 if QUICK else 300

torch.manual_seed(0)
out = Path("tutorial_out/02_train")
out.mkdir(parents=True, exist_ok=True)

# Small stamps (32x32, 12.7 arcsec) and 15x15 PSF grids keep the tutorial fast.
data = simulate(out / "train.h5", survey="sdss", n=N, stamp=32, psf_size=15, seed=3)

# The model section names the kind and its options; stamp, oversampling, input_scale
# (the noise rms) and flux_scale (the typical peak) are filled in from the data.
# The train section is galgen.train.TrainConfig.
common = {"batch_size": 16, "lr": 2e-3, "seed": 0, "val_fraction": 0.125, "device": "cpu",
          "log_every": max(VAE_STEPS // 20, 1), "progress": False}
vae_cfg = {
    "model": {"kind": "vae", "latent_dim": 8, "width": 8, "beta": 1.0, "warmup_steps": VAE_STEPS // 4,
              "prior": {"kind": "nsf", "transforms": 2, "hidden": [32, 32]}},
    "train": {**common, "steps": VAE_STEPS, "val_every": max(VAE_STEPS // 3, 1),
              "checkpoint_every": max(VAE_STEPS // 3, 1), "prior_epochs": 3 if QUICK else 20},
}
gan_cfg = {  # the R1-regularised GAN of pipelines/configs/gan_sdss_r1.yaml, smaller
    "model": {"kind": "gan", "latent_dim": 8, "width": 4, "loss": "non-saturating", "spectral_norm": False,
              "head": "flux-shape", "ema": 0.9, "r1_gamma": 1.0, "r1_every": 4},
    "train": {**common, "steps": GAN_STEPS, "lr": 1e-3, "optimizer": {"betas": [0.5, 0.999]},
              "val_every": max(GAN_STEPS // 2, 1), "checkpoint_every": max(GAN_STEPS // 2, 1)},
}
(out / "vae.yaml").write_text(yaml.safe_dump(vae_cfg, sort_keys=False))
(out / "gan.yaml").write_text(yaml.safe_dump(gan_cfg, sort_keys=False))

results = {}
for name in ("vae", "gan"):
    run = out / name
    # resume=True continues an interrupted run; a finished run (model.pt) is not retrained.
    if (run / "model.pt").exists():
        print(f"{run} is already trained")
    else:
        results[name] = train(out / f"{name}.yaml", data, run, resume=(run / "last.pt").exists())
    training_curves(run, out / f"{name}_curves.png")

# What the logs hold: the VAE's loss is the negative ELBO in nats per galaxy (the
# chi-square-like likelihood term plus the KL term); the GAN's validation loss is the
# mean Kolmogorov-Smirnov distance of flux, size and ellipticity between generated and
# held-out galaxies observed the same way (0: indistinguishable, 1: disjoint).
vae_val = read_log(out / "vae" / "val_log.csv")
gan_val = read_log(out / "gan" / "val_log.csv")
vae_train = read_log(out / "vae" / "train_log.csv")

# Load the trained VAE like any checkpoint and draw PSF-free galaxies from its flow prior.
vae = load_model(out / "vae", device="cpu")
with torch.no_grad():
    images = vae.sample(8, generator=torch.Generator().manual_seed(1)).numpy()
plt = pyplot()
fig, axes = plt.subplots(1, 8, figsize=(12, 1.8))
for ax, img in zip(axes, images):
    ax.imshow(asinh_stretch(img), origin="lower", cmap="magma")
    ax.set_axis_off()
fig.suptitle(f"VAE samples after {VAE_STEPS} steps (intrinsic, PSF-free)", fontsize=9)
save_figure(fig, out / "vae_samples.png")

# Key numbers
print(f"training galaxies: {N} (of which {int(round(0.125 * N))} held out for validation)")
print(f"VAE: {VAE_STEPS} steps, first logged loss {float(vae_train[0]['loss']):.1f}, "
      f"last {float(vae_train[-1]['loss']):.1f} nats/galaxy")
print(f"VAE validation -ELBO at the last validation: {float(vae_val[-1]['loss']):.1f} nats/galaxy "
      f"(bits/pixel {float(vae_val[-1]['bits_per_pixel']):.3f})")
ks = {k: float(gan_val[-1][k]) for k in ("ks_flux", "ks_sigma", "ks_e")}
print(f"GAN: {GAN_STEPS} steps, validation KS distances " + ", ".join(f"{k} {v:.2f}" for k, v in ks.items()))
print(f"VAE sample fluxes (ADU): median {np.median(images.sum((1, 2))):.0f}")
print(f"model files: {out / 'vae' / 'model.pt'}, {out / 'gan' / 'model.pt'}")
