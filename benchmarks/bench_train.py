#!/usr/bin/env python
"""Benchmark: training throughput (images/s) of the VAE, the WGAN-GP and the GAN recipe at 64x64.

Each galgen step is the real one: the model's ``training_step`` on a batch of simulated
SDSS cutouts with per-galaxy PSFs and variance maps, through the physics layer
(convolution with each galaxy's PSF, pixel integration, masked Gaussian likelihood),
under bf16 autocast on a GPU. The peer, in the same run and on the same batch, is the
same networks trained the plain way, with no physics layer: the VAE on a pixel MSE
between input and output, the GAN with its critic on the generator output directly. The
ratio galgen/peer is therefore what forward-modelling the telescope costs.

    python benchmarks/bench_train.py [--steps 10] [--batch 64] [--width 8] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine_info


def make_data(n, stamp, seed):
    from galgen.simulate import simulate

    path = Path(tempfile.mkdtemp()) / "bench_train.h5"
    return simulate(path, survey="sdss", n=n, stamp=stamp, seed=seed, psf_size=33, workers=1)


def timed(fn, steps, device):
    fn(0)  # warm-up (allocations, cuFFT plans, autotuning)
    fn(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(2, steps + 2):
        fn(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_model(kind, batch, data, args, device):
    from galgen.models.registry import build_model

    stats = data.statistics()
    cfg = {"kind": kind, "stamp": data.meta.stamp, "latent_dim": 16 if kind == "vae" else 32, "width": args.width,
           "input_scale": stats["noise_rms"], "flux_scale": stats["peak"]}
    if kind == "gan":  # as pipelines/configs/gan_sdss.yaml
        cfg.update(log_flux=stats["log_flux"], r1_gamma=0.1, r1_every=16)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opts = model.make_optimizers(lr=1e-4)
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.bf16
           else contextlib.nullcontext())

    def galgen_step(s):
        with amp:
            model.training_step(batch, opts, s)

    t_galgen = timed(galgen_step, args.steps, device)

    # peer: the same networks, no physics layer
    x = batch.observed
    if kind == "vae":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def peer_step(s):
            with amp:
                mu, logvar = model.encode(x)
                z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
                rec = model.decode(z).float()
                loss = ((rec - x) ** 2).mean() + 1e-3 * (mu**2 + logvar.exp() - logvar).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif kind == "gan":
        opt_c = torch.optim.Adam(model.critic.parameters(), lr=1e-4, betas=(0.5, 0.999))
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-4, betas=(0.5, 0.999))
        sp = torch.nn.functional.softplus

        def peer_step(s):
            with amp:
                fake = model.generate(torch.randn(len(x), model.config["latent_dim"], device=device)).float()
                loss = sp(model.critic_score(fake.detach())).mean() + sp(-model.critic_score(x)).mean()
            opt_c.zero_grad()
            loss.backward()
            opt_c.step()
            with amp:
                g = sp(-model.critic_score(model.generate(
                    torch.randn(len(x), model.config["latent_dim"], device=device)).float())).mean()
            opt_g.zero_grad()
            g.backward()
            opt_g.step()
    else:
        opt_c = torch.optim.Adam(model.critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=1e-4, betas=(0.0, 0.9))
        n_critic = model.config["n_critic"]

        def peer_step(s):
            with amp:
                fake = model.generate(torch.randn(len(x), model.config["latent_dim"], device=device)).float()
                gp = model.gradient_penalty(x, fake.detach())
                loss = model.critic_score(fake.detach()).mean() - model.critic_score(x).mean() + 10 * gp
            opt_c.zero_grad()
            loss.backward()
            opt_c.step()
            if (s + 1) % n_critic == 0:
                with amp:
                    g = -model.critic_score(model.generate(
                        torch.randn(len(x), model.config["latent_dim"], device=device)).float()).mean()
                opt_g.zero_grad()
                g.backward()
                opt_g.step()

    t_peer = timed(peer_step, args.steps, device)
    n_img = args.steps * batch.observed.shape[0]
    n_critic = model.config.get("n_critic", 1)
    return {"model": kind, "batch": batch.observed.shape[0], "steps": args.steps,
            "galgen_images_per_s": n_img / t_galgen, "peer_images_per_s": n_img / t_peer,
            # images through a generator update per second: what a GAN's learning is paced by
            "galgen_generator_images_per_s": n_img / t_galgen / n_critic if kind != "vae" else None,
            "ratio_galgen_over_peer": t_peer / t_galgen,
            "params": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false")
    ap.add_argument("--data", default=None, help="cutout file (default: simulate --batch SDSS galaxies)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from galgen.train.data import TrainingData

    device = torch.device(args.device)
    path = args.data or make_data(args.batch, 64, seed=0)
    data = TrainingData(path, np.arange(args.batch), device=device)
    batch = data.batch(torch.arange(args.batch))
    rows = [bench_model(kind, batch, data, args, device) for kind in ("vae", "wgan-gp", "gan")]
    info = machine_info()
    info.update(device=str(device), threads=torch.get_num_threads(),
                precision="bf16 autocast" if device.type == "cuda" and args.bf16 else "float32")
    for r in rows:
        gen = r["galgen_generator_images_per_s"]
        print(f"{r['model']:8s} batch {r['batch']}: galgen {r['galgen_images_per_s']:8.1f} img/s"
              + (f" ({gen:.1f} img/s through generator updates)" if gen else "")
              + f", plain (no physics) {r['peer_images_per_s']:8.1f} img/s, ratio {r['ratio_galgen_over_peer']:.2f}")
    print(json.dumps(info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
