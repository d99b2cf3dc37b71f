#!/usr/bin/env python
"""Benchmark: morphology statistics of N galaxies, galgen (batched) vs statmorph (per galaxy).

The same N GalSim galaxies (Sersic n 0.7-4, hlr 0.5-2", e <= 0.5, two in three with an
off-centre knot, Moffat PSF, 64 x 64 at 0.396", Gaussian noise at 1e-4 of the peak) are
measured by ``galgen.evaluation.statistics.morphology_statistics`` (one call, the whole
batch; variance given) and by ``statmorph.source_morphology`` one galaxy at a time
(segmap ``noise-free image > sigma``, ``n_sigma_outlier=0``), as a statmorph user would.
Note that statmorph's call also fits a Sersic profile and computes MID and shape
asymmetry, which galgen does not; the figure is what a user who needs C, A, S, Gini, M20
pays with each. Beside the speed, the median and maximum absolute differences per statistic
(relative for r50) over the galaxies statmorph does not flag as bad (flag <= 1).

    python benchmarks/bench_morphology.py [--n 200] [--threads 2] [--rotation fourier|bilinear]
        [--json out.json] [--plot out.png]

``--plot`` draws galgen's value against statmorph's for each statistic (the scatter plot of
``docs/benchmarks.md``), flagged galaxies in grey.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from common import finish, machine_info

KEYS = ("r50", "concentration", "asymmetry", "smoothness", "gini", "m20")


def make_galaxies(n, stamp=64, scale=0.396, noise=1e-4, seed=0):
    import galsim

    rng = np.random.default_rng(seed)
    noisy, segs, sigmas = [], [], []
    for i in range(n):
        gal = galsim.Sersic(n=rng.uniform(0.7, 4), half_light_radius=(hlr := rng.uniform(0.5, 2.0)), flux=1e4)
        gal = gal.shear(e=rng.uniform(0, 0.5), beta=rng.uniform(0, np.pi) * galsim.radians)
        if i % 3:
            ang, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5) * hlr
            gal = gal + galsim.Gaussian(sigma=rng.uniform(0.1, 0.3), flux=1e4 * rng.uniform(0.05, 0.25)).shift(
                rr * np.cos(ang), rr * np.sin(ang))
        psf = galsim.Moffat(beta=3.5, fwhm=rng.uniform(0.8, 1.4))
        clean = galsim.Convolve(gal, psf).drawImage(nx=stamp, ny=stamp, scale=scale,
                                                    use_true_center=False).array.astype(np.float64)
        s = noise * clean.max()
        noisy.append(clean + rng.normal(0, s, clean.shape))
        segs.append((clean > s).astype(int))
        sigmas.append(s)
    return np.stack(noisy), np.stack(segs), np.array(sigmas)


def bench_galgen(images, variance, scale, chunk, rotation="fourier"):
    from galgen.evaluation.statistics import morphology_statistics

    morphology_statistics(images[:8], scale, variance=variance[:8], rotation=rotation)  # warm-up
    t = time.perf_counter()
    st = morphology_statistics(images, scale, variance=variance, chunk=chunk, rotation=rotation)
    return len(images) / (time.perf_counter() - t), st


def bench_statmorph(images, segs):
    import statmorph

    out = []
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for img, seg in zip(images, segs):
            out.append(statmorph.source_morphology(img, seg, gain=1e8, n_sigma_outlier=0)[0])
    return len(images) / (time.perf_counter() - t), out


def scatter(pairs, good, out):
    """galgen against statmorph, one panel per statistic (flag > 1 or not ok in grey)."""
    from galgen.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.4))
    for ax, (k, (theirs, ours)) in zip(axes.flat, pairs.items()):
        ax.plot(theirs[~good], ours[~good], ".", color="0.7", ms=3, label="statmorph flag > 1")
        ax.plot(theirs[good], ours[good], ".", ms=3, label="compared")
        fin = np.isfinite(theirs) & np.isfinite(ours)
        lo, hi = np.min(theirs[fin]), np.max(theirs[fin])
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.7)
        ax.set_xlabel(f"statmorph {k}" + (" (pixels)" if k == "r50" else ""))
        ax.set_ylabel(f"galgen {k}")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"galgen morphology_statistics vs statmorph on {len(good)} GalSim galaxies", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="galaxies [200]")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads [2]")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--rotation", choices=("fourier", "bilinear"), default="fourier",
                    help="galgen's asymmetry rotation [fourier, the default; bilinear is statmorph's]")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of galgen vs statmorph per statistic")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = 0.396
    images, segs, sigmas = make_galaxies(args.n, scale=scale)
    variance = np.broadcast_to((sigmas ** 2)[:, None, None], images.shape).copy()
    rate_galgen, st = bench_galgen(images, variance, scale, args.chunk, args.rotation)
    rate_sm, ref = bench_statmorph(images, segs)
    good = np.array([r.flag <= 1 for r in ref]) & st["ok"]
    diffs, pairs = {}, {}
    for k in KEYS:
        theirs = np.array([r[k] for r in ref], float)
        ours = st[k] / scale if k == "r50" else st[k]
        d = np.abs(ours / theirs - 1) if k == "r50" else np.abs(ours - theirs)
        diffs[k] = {"median": float(np.median(d[good])), "max": float(np.max(d[good]))}
        pairs[k] = (theirs, ours)
    if args.plot:
        scatter(pairs, good, args.plot)
    result = {
        "machine": machine_info(), "torch_threads": args.threads, "n": args.n, "chunk": args.chunk, "rotation": args.rotation,
        "galgen_galaxies_per_s": rate_galgen, "statmorph_galaxies_per_s": rate_sm,
        "ratio": rate_galgen / rate_sm, "n_compared": int(good.sum()), "abs_differences": diffs,
    }
    print(f"galgen morphology_statistics (batched, {args.threads} threads, {args.rotation} rotation): "
          f"{rate_galgen:10.1f} galaxies/s")
    print(f"statmorph source_morphology (per galaxy):               {rate_sm:10.1f} galaxies/s")
    print(f"ratio galgen / statmorph: {result['ratio']:.1f}x")
    print(f"|galgen - statmorph| over {int(good.sum())} galaxies (statmorph flag <= 1; r50 relative):")
    for k, d in diffs.items():
        print(f"  {k:14s} median {d['median']:.2e}   max {d['max']:.2e}")
    return finish(result, args.json)


if __name__ == "__main__":
    main()
