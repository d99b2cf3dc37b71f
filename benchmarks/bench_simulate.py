#!/usr/bin/env python
"""Benchmark: throughput of ``galgen.simulate`` against plain GalSim on the same galaxies.

galgen's ``simulate`` is timed end to end (per galaxy: pixel-integrated intrinsic image,
PSF image, noiseless and noisy observation, variance, HDF5 write, truth table) for each
worker count. Two peers run in the same process on the identical GalSim profiles:

* **GalSim default** draws the same images with plain GalSim defaults: intrinsic with
  ``profile.drawImage(nx, ny, scale, use_true_center=False)`` (GalSim's FFT pixel
  integration), PSF with ``method="no_pixel"``, the observation with
  ``galsim.Convolve(gal, psf).drawImage`` and ``CCDNoise``. Its intrinsic draw is slow
  for cuspy bulges, so it runs on the first galaxies until ``--budget`` seconds elapse.
* **observation only** draws only the noisy observed stamp (Convolve + noise), the
  least a plain GalSim script does; galgen does more per stamp, so this ratio is an
  overhead figure (below 1).

It also checks that galgen's intrinsic images (as written to the file) match GalSim's
default pixel-integrated draw, relative to each image's peak. Galaxies with star-forming
knots are reported apart: galgen draws knots itself (``Knots.draw``), GalSim draws them
as a sum of Gaussians.

Run ``python benchmarks/bench_simulate.py --help``; record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine_info


# -- the galaxies -------------------------------------------------------------------------
def make_truths(survey: str, n: int, seed: int):
    """Truth rows of the galaxies ``simulate(survey=survey, n=n, seed=seed)`` renders.

    Mirrors :func:`galgen.simulate.simulate`: rows from ``select_rows``, truths from
    ``draw_truth``, truncations from the catalog's model metadata.
    """
    from galgen.simulate import draw_truth, load_catalog, load_survey, select_rows

    sv = load_survey(survey)
    cat = load_catalog(sv.catalog)
    model = cat.meta.get("model", {}) or {}
    trunc = (float(model.get("trunc_disk", 3.0)), float(model.get("trunc_bulge", 6.0)))
    rows = select_rows(len(cat), n, seed)
    cols = list(cat.colnames)
    data = {c: np.asarray(cat[c]) for c in cols}
    truths = [draw_truth({c: data[c][r] for c in cols}, sv, seed, i) for i, r in enumerate(rows)]
    return sv, truths, trunc


def profiles(truth, sv, trunc):
    """Galaxy profile (smooth + knots as GalSim Gaussians), PSF profile, has-knots flag."""
    import galsim

    from galgen.simulate import galaxy_profile

    smooth, knots = galaxy_profile(truth, trunc[0], trunc[1], truth.get("knot_seed"))
    parts = [p for p in (smooth, knots.galsim() if knots is not None else None) if p is not None]
    gal = galsim.Add(parts) if len(parts) > 1 else parts[0]
    psf = sv.psf.build(truth["psf_fwhm"], truth["psf_g1"], truth["psf_g2"])
    return gal, psf, knots is not None


def noise_for(truth, sv):
    import galsim

    return galsim.CCDNoise(galsim.BaseDeviate(int(truth["noise_seed"])), sky_level=sv.sky_level,
                           gain=sv.gain, read_noise=sv.read_noise)


# -- galgen -------------------------------------------------------------------------------
def time_galgen(args, workers: int) -> tuple[list[float], Path]:
    """Wall times of ``repeat`` simulate() runs, each into a fresh file; keeps the last file."""
    from galgen.simulate import simulate

    times = []
    keep = Path(tempfile.mkdtemp(prefix="bench_simulate_")) / "cutouts.h5"
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench_simulate_") as d:
            out = Path(d) / "cutouts.h5"
            t0 = time.perf_counter()
            simulate(out, survey=args.survey, n=args.n, stamp=args.stamp, seed=args.seed,
                     workers=workers, overwrite=True, progress=False)
            times.append(time.perf_counter() - t0)
            if r == args.repeat - 1:
                out.replace(keep)
    return times, keep


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.parent.rmdir()


# -- peers --------------------------------------------------------------------------------
def peer_default(truths, sv, trunc, stamp, budget):
    """GalSim defaults for everything galgen makes; stops after ``budget`` seconds.

    Returns the per-galaxy times, the per-galaxy times of the intrinsic draw alone
    (profile construction included) and the intrinsic images.
    """
    import galsim

    times, t_intr, intrinsic = [], [], []
    scale = sv.pixel_scale
    spent = 0.0
    for t in truths:
        t0 = time.perf_counter()
        gal, psf, _ = profiles(t, sv, trunc)
        img = gal.drawImage(nx=stamp, ny=stamp, scale=scale, use_true_center=False)
        t1 = time.perf_counter()
        psf_img = psf.drawImage(nx=stamp, ny=stamp, scale=scale, method="no_pixel", use_true_center=False)
        psf_img /= psf_img.array.sum()
        obs = galsim.Convolve(gal, psf).drawImage(nx=stamp, ny=stamp, scale=scale, use_true_center=False)
        noiseless = obs.copy()
        obs.addNoise(noise_for(t, sv))
        dt = time.perf_counter() - t0
        del noiseless
        times.append(dt)
        t_intr.append(t1 - t0)
        intrinsic.append(img.array.astype(np.float64))
        spent += dt
        if spent >= budget:
            break
    return times, t_intr, intrinsic


def peer_observation(truths, sv, trunc, stamp):
    """Only the noisy observed stamp, as a minimal GalSim script makes it."""
    import galsim

    t0 = time.perf_counter()
    for t in truths:
        gal, psf, _ = profiles(t, sv, trunc)
        obs = galsim.Convolve(gal, psf).drawImage(nx=stamp, ny=stamp, scale=sv.pixel_scale,
                                                  use_true_center=False)
        obs.addNoise(noise_for(t, sv))
    return time.perf_counter() - t0


def galgen_intrinsic_times(truths, sv, trunc, stamp):
    """Per-galaxy time of galgen's intrinsic drawing alone (draw_integrated + Knots.draw)."""
    from galgen.simulate import draw_integrated, galaxy_profile

    times = []
    for t in truths:
        t0 = time.perf_counter()
        smooth, knots = galaxy_profile(t, trunc[0], trunc[1], t.get("knot_seed"))
        img = np.zeros((stamp, stamp))
        if smooth is not None:
            img += draw_integrated(smooth, stamp, sv.pixel_scale)
        if knots is not None:
            img += knots.draw(stamp, sv.pixel_scale)
        times.append(time.perf_counter() - t0)
    return times


def exact_check(truths, sv, trunc, stamp, count):
    """Both intrinsic draws against the exact pixel integral, on knot-free galaxies.

    The reference is GalSim's real-space convolution with the pixel (slow, ~1 s per
    stamp, but free of FFT and sampling errors). Returns, per galaxy, the largest
    |galgen - exact| / peak, |GalSim default - exact| / peak, and the elliptical radius
    of galgen's worst pixel in units of the disk truncation radius.
    """
    import galsim

    from galgen.simulate import draw_integrated, galaxy_profile

    scale = sv.pixel_scale
    out = []
    for t in truths:
        if len(out) >= count:
            break
        smooth, knots = galaxy_profile(t, trunc[0], trunc[1], t.get("knot_seed"))
        if knots is not None or smooth is None:
            continue
        ref = galsim.Convolve(smooth, galsim.Pixel(scale), real_space=True).drawImage(
            nx=stamp, ny=stamp, scale=scale, method="no_pixel", use_true_center=False).array
        gg = draw_integrated(smooth, stamp, scale)
        df = smooth.drawImage(nx=stamp, ny=stamp, scale=scale, use_true_center=False).array
        peak = np.abs(ref).max()
        err = np.abs(gg - ref)
        iy, ix = np.unravel_index(err.argmax(), err.shape)
        a = galsim.Shear(g1=t["g1_disk"], g2=t["g2_disk"]).getMatrix()
        u = np.linalg.solve(a, [(ix - stamp // 2) * scale, (iy - stamp // 2) * scale])
        out.append((float(err.max() / peak), float(np.abs(df - ref).max() / peak),
                    float(np.hypot(*u) / (trunc[0] * t["hlr_disk"]))))
    return out


# -- report -------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="galaxies per simulate() run")
    p.add_argument("--stamp", type=int, default=64, help="stamp size in pixels")
    p.add_argument("--survey", default="sdss", help="survey preset or YAML")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts for galgen")
    p.add_argument("--seed", type=int, default=2024, help="simulation seed (same galaxies for all)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per galgen setting (median reported)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of GalSim-default drawing (it runs on the first galaxies until spent)")
    p.add_argument("--omp-threads", type=int, metavar="N",
                   help="set OMP_NUM_THREADS=N (GalSim's OpenMP threads) for this process and the "
                        "simulate() workers; default: leave the environment as it is")
    p.add_argument("--exact", type=int, default=0, metavar="K",
                   help="also compare both intrinsic draws with the exact pixel integral (real-space "
                        "convolution, ~1 s each) on the first K knot-free galaxies")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="n=40, repeat=1, budget=15 s (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeat, args.budget = 40, 1, 15.0
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if args.n < 1 or args.repeat < 1 or not workers or min(workers) < 1:
        p.error("--n, --repeat and --workers must be positive")

    if args.omp_threads is not None:
        if "galsim" in sys.modules:
            p.error("--omp-threads must be applied before GalSim is imported")
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)  # spawned workers inherit it
    import galsim  # (import cost outside the timings)

    from galgen.simulate import simulate

    info = machine_info()
    info["omp_threads"] = galsim.get_omp_threads()
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    print("machine: {cpu}, {cores} cores ({cores_usable} usable); Python {python}, GalSim {galsim}, "
          "numpy {numpy}, h5py {h5py}, galgen {galgen}; {date}".format(**info))
    print(f"GalSim OpenMP threads: {info['omp_threads']} (OMP_NUM_THREADS={info['OMP_NUM_THREADS']})")
    print(f"command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"survey={args.survey} n={args.n} stamp={args.stamp} seed={args.seed} repeat={args.repeat} "
          f"budget={args.budget:g}s\n", flush=True)

    sv, truths, trunc = make_truths(args.survey, args.n, args.seed)

    # Warm-up on other galaxies: imports, HDF5, GalSim's caches (the first timed run still
    # meets new Sersic indices; its time is printed as "first", the median is reported).
    with tempfile.TemporaryDirectory() as d:
        simulate(Path(d) / "warm.h5", survey=args.survey, n=4, stamp=args.stamp, seed=args.seed + 1,
                 overwrite=True, progress=False)
    _, wtruths, _ = make_truths(args.survey, 2, args.seed + 1)
    peer_default(wtruths, sv, trunc, args.stamp, budget=0.0)
    peer_observation(wtruths, sv, trunc, args.stamp)

    results = {"machine": info, "args": {k: v for k, v in vars(args).items()}, "galgen": {}}
    last_file = None
    for w in workers:
        if last_file is not None:
            _remove(last_file)
        times, last_file = time_galgen(args, w)
        med = statistics.median(times)
        results["galgen"][w] = {"times_s": times, "median_s": med, "stamps_per_s": args.n / med}
        print(f"galgen simulate workers={w}: median {med:.2f} s over {args.repeat} run(s) "
              f"(first {times[0]:.2f} s) -> {args.n / med:.1f} stamps/s", flush=True)

    t_obs = [peer_observation(truths, sv, trunc, args.stamp) for _ in range(args.repeat)]
    obs_rate = args.n / statistics.median(t_obs)
    print(f"peer 'observation only': {obs_rate:.1f} stamps/s", flush=True)

    t_def, p_intr, peer_intr = peer_default(truths, sv, trunc, args.stamp, args.budget)
    m = len(t_def)
    def_rate = m / sum(t_def)
    print(f"peer 'GalSim default': {m} galaxies in {sum(t_def):.1f} s -> {def_rate:.2f} stamps/s", flush=True)

    # Same-galaxy comparison of the intrinsic drawing alone (the step that differs).
    g_intr = galgen_intrinsic_times(truths[:m], sv, trunc, args.stamp)
    intr_ratio = sum(p_intr) / sum(g_intr)

    # galgen's per-galaxy rendering (render_galaxy, in-process, no file) on the same first m
    # galaxies: checks that the headline ratio, which compares rates over n and m galaxies,
    # is not an artefact of which galaxies the budget let the peer reach.
    from galgen.simulate import render_galaxy
    t_render = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for t in truths[:m]:
            render_galaxy(t, sv, args.stamp, trunc_disk=trunc[0], trunc_bulge=trunc[1])
        t_render.append(time.perf_counter() - t0)
    render_rate_m = m / statistics.median(t_render)

    # Accuracy: galgen's file vs GalSim's default intrinsic draw, relative to the peak.
    import h5py

    with h5py.File(last_file, "r") as f:
        gg_intr = np.asarray(f["intrinsic"][:m], dtype=np.float64)
    has_knots = [profiles(t, sv, trunc)[2] for t in truths[:m]]
    rel = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(gg_intr, peer_intr)]
    rel_smooth = [r for r, k in zip(rel, has_knots) if not k]
    rel_knots = [r for r, k in zip(rel, has_knots) if k]
    _remove(last_file)

    # -- table ------------------------------------------------------------------------------
    rows = []
    for w in workers:
        rate = results["galgen"][w]["stamps_per_s"]
        rows.append((f"galgen simulate, workers={w}", rate, rate / def_rate, rate / obs_rate))
    rows.append(("GalSim default (peer A)", def_rate, 1.0, def_rate / obs_rate))
    rows.append(("observation only (peer B)", obs_rate, obs_rate / def_rate, 1.0))
    print()
    print(f"{'':34s} {'stamps/s':>9s} {'vs A':>8s} {'vs B':>7s}")
    for name, rate, ra, rb in rows:
        print(f"{name:34s} {rate:9.2f} {ra:8.3g} {rb:7.3g}")
    print(f"\nintrinsic draw only, same {m} galaxies: galgen draw_integrated is {intr_ratio:.1f}x faster "
          f"than GalSim drawImage ({m / sum(g_intr):.1f} vs {m / sum(p_intr):.2f} stamps/s)")
    print(f"render_galaxy in-process on the same {m} galaxies: {render_rate_m:.1f} stamps/s "
          f"({render_rate_m / def_rate:.1f}x peer A)")
    def fmt(v):
        return f"{max(v):.1e} (median {statistics.median(v):.1e}, {len(v)} galaxies)" if v else "n/a"

    print(f"max |galgen - GalSim default| / peak of intrinsic: without knots {fmt(rel_smooth)}; "
          f"with knots {fmt(rel_knots)}")

    exact = exact_check(truths, sv, trunc, args.stamp, args.exact) if args.exact > 0 else []
    if exact:
        e_g, e_d, r_w = (np.array(c) for c in zip(*exact))
        print(f"against the exact pixel integral ({len(exact)} knot-free galaxies), max error / peak: "
              f"galgen {e_g.max():.1e} (median {np.median(e_g):.1e}), GalSim default {e_d.max():.1e} "
              f"(median {np.median(e_d):.1e}); galgen's worst pixel at r / r_trunc,disk = "
              + ", ".join(f"{r:.2f}" for r in r_w))

    results.update({
        "exact_check": [{"galgen": a, "galsim_default": b, "worst_r_over_trunc_disk": c} for a, b, c in exact],
        "peer_default": {"galaxies": m, "time_s": sum(t_def), "stamps_per_s": def_rate},
        "peer_observation": {"times_s": t_obs, "stamps_per_s": obs_rate},
        "intrinsic_only": {"galaxies": m, "galgen_s": sum(g_intr), "galsim_s": sum(p_intr), "ratio": intr_ratio},
        "render_galaxy_same_m": {"stamps_per_s": render_rate_m, "ratio_vs_default": render_rate_m / def_rate},
        "ratios": {str(w): {"vs_default": results["galgen"][w]["stamps_per_s"] / def_rate,
                            "vs_observation": results["galgen"][w]["stamps_per_s"] / obs_rate} for w in workers},
        "intrinsic_rel_diff": {"no_knots": rel_smooth, "knots": rel_knots},
    })
    results["galgen"] = {str(k): v for k, v in results["galgen"].items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
