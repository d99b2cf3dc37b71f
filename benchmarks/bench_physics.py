#!/usr/bin/env python
"""Benchmark: PSF convolution of 64x64 stamps with per-galaxy PSFs, galgen vs GalSim.

galgen convolves a batch of N intrinsic images with N per-galaxy PSF images
(``galgen.physics.convolve``: zero-padded real FFTs at a 2-3-5-7-smooth size, batched);
GalSim does the same work one galaxy at a time, as a GalSim user would:
``galsim.Convolve(galsim.InterpolatedImage(image), psf).drawImage(...)`` with an analytic
per-galaxy Moffat PSF. Both run in the same process, on the same images and PSFs; the
figure of merit is stamps per second and their ratio.

    python benchmarks/bench_physics.py [--n 2000] [--threads 2] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import finish, machine_info


def make_inputs(n, stamp, psf_size, scale, seed=0):
    import galsim

    from galgen.physics import moffat_psf

    rng = np.random.default_rng(seed)
    fwhm = rng.uniform(1.0, 1.8, n)
    g1, g2 = rng.normal(0, 0.02, (2, n))
    images = np.empty((n, stamp, stamp), np.float32)
    for i in range(min(n, 64)):  # 64 distinct exponential galaxies, reused cyclically
        prof = galsim.Exponential(half_light_radius=rng.uniform(0.8, 3.0), flux=1e4).shear(
            g1=rng.uniform(-0.3, 0.3), g2=rng.uniform(-0.3, 0.3))
        images[i] = prof.drawImage(nx=stamp, ny=stamp, scale=scale, use_true_center=False).array
    for i in range(64, n):
        images[i] = images[i % 64]
    psfs = moffat_psf(torch.tensor(fwhm), 3.5, psf_size, scale, g1=torch.tensor(g1), g2=torch.tensor(g2))
    return images, psfs.float(), fwhm, g1, g2


def bench_galgen(images, psfs, device, batch, repeats=3):
    from galgen.physics import convolve

    x = torch.from_numpy(images).to(device)
    p = psfs.to(device)
    n = len(x)

    def run():
        out = None
        for s in range(0, n, batch):
            out = convolve(x[s:s + batch], p[s:s + batch], check=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    run()  # warm-up: FFT plans, allocator
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return n / best


def bench_galsim(images, fwhm, g1, g2, scale, budget):
    import galsim

    done, t0 = 0, time.perf_counter()
    for i in range(len(images)):
        psf = galsim.Moffat(beta=3.5, fwhm=fwhm[i]).shear(g1=g1[i], g2=g2[i])
        ii = galsim.InterpolatedImage(galsim.Image(images[i].astype(np.float64), scale=scale))
        galsim.Convolve(ii, psf).drawImage(nx=images.shape[1], ny=images.shape[2], scale=scale,
                                           method="no_pixel", use_true_center=False)
        done += 1
        if time.perf_counter() - t0 > budget:
            break
    return done / (time.perf_counter() - t0), done


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="stamps [2000]")
    ap.add_argument("--stamp", type=int, default=64)
    ap.add_argument("--psf-size", type=int, default=33)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads [2]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds for the GalSim loop [20]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = 0.396
    images, psfs, fwhm, g1, g2 = make_inputs(args.n, args.stamp, args.psf_size, scale)
    rate_galgen = bench_galgen(images, psfs, args.device, args.batch)
    rate_galsim, n_galsim = bench_galsim(images, fwhm, g1, g2, scale, args.budget)
    result = {
        "machine": machine_info(), "device": args.device, "torch_threads": args.threads, "n": args.n,
        "stamp": args.stamp, "psf_size": args.psf_size, "batch": args.batch,
        "galgen_stamps_per_s": rate_galgen, "galsim_stamps_per_s": rate_galsim,
        "galsim_stamps_timed": n_galsim, "ratio": rate_galgen / rate_galsim,
    }
    print(f"galgen convolve ({args.device}, {args.threads} threads, batch {args.batch}): {rate_galgen:10.0f} stamps/s")
    print(f"GalSim Convolve(InterpolatedImage, Moffat).drawImage:           {rate_galsim:10.0f} stamps/s")
    print(f"ratio galgen / GalSim: {result['ratio']:.1f}x")
    return finish(result, args.json)


if __name__ == "__main__":
    main()
