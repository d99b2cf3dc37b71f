#!/usr/bin/env python
"""Posteriors of a deep prior for a batch of galaxies: cost and effective draws, per proposal.

    python benchmarks/bench_vae_posterior.py --data sdss_holdout_10k.h5 --n 64 \
        --proposals laplace,amortized --json bench_vae_posterior.json

The galaxies are the first ``--n`` cutouts of ``--data`` (``--galaxies data``: GalSim
galaxies, which the model only approximates) or the model's own prior draws observed
through their PSFs and noise (``--galaxies prior``: the setting of simulation-based
calibration). Each galaxy is fitted once (``fit_map``, galgen fit's default optimiser),
then its posterior is drawn by importance sampling (:func:`galgen.inference.sample_posterior`,
``method="is"``, no NUTS fallback so that each proposal is measured on its own) from
every proposal of ``--proposals``: ``laplace`` (the Student-t about the Laplace
approximation) and ``amortized`` (the modes found from the model's amortised
posterior), with the flux scale treated as ``--scale`` lists (see ``scale`` of
:func:`galgen.inference.sample_posterior`). Reports per proposal the wall time (MAP and posterior), the importance
sampling ESS per galaxy (median, 10th percentile, minimum, fraction >= 200), the Pareto
k (median, fraction <= 0.7), effective draws per second per galaxy, and, for the
galaxies where both pass, the difference of the posterior means of flux, hlr, e1, e2
in posterior standard deviations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_galaxies, finish, machine_info  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdss-vae")
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--galaxies", choices=("data", "prior"), default="data")
    ap.add_argument("--proposals", default="laplace,amortized")
    ap.add_argument("--scale", default="redraw",
                    help="comma list of sample_posterior's treatments of the flux scale: 'redraw' (its "
                         "default), 'integrated', 'joint', 'fixed' (held at 0, the MAP fitting z alone; with "
                         "--proposals laplace) [redraw]")
    ap.add_argument("--draws", type=int, default=1024, help="proposals per galaxy [1024]")
    ap.add_argument("--min-ess", type=float, default=200.0,
                    help="galaxies go on drawing until this ESS (0: a fixed --draws) [200]")
    ap.add_argument("--max-draws", type=int, default=None, help="with --min-ess: cap [4 x --draws]")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from galgen.inference import derived_quantities, fit_map, posterior_images, sample_posterior
    from galgen.runtime import resolve_model

    model = resolve_model(args.model, "cpu").eval()
    rows = list(range(args.start, args.start + args.n))
    gen = torch.Generator().manual_seed(args.seed)
    obs, observed, intr = benchmark_galaxies(model, args.data, rows, args.galaxies, gen)
    truth = None if intr is None else derived_quantities(intr, obs.intrinsic_scale).numpy()
    scales = [s for s in args.scale.split(",") if s]
    if not set(scales) <= {"redraw", "integrated", "joint", "fixed"}:
        raise SystemExit(f"--scale: 'redraw', 'integrated', 'joint' and/or 'fixed', got {args.scale!r}")
    out = {"model": args.model, "data": str(args.data), "n": args.n, "galaxies": args.galaxies,
           "draws": args.draws, "min_ess": args.min_ess, "max_draws": args.max_draws,
           "threads": torch.get_num_threads()}
    res, t_map = None, None
    if set(scales) - {"fixed"}:  # the MAP of (z, s), for the treatments of a free flux scale
        t0 = time.perf_counter()
        res = fit_map(model, observed, obs, generator=gen)
        t_map = out["map_wall_s"] = time.perf_counter() - t0
        print(f"MAP of {args.n} galaxies: {t_map:.1f} s, median chi2/dof {float(res.reduced_chi2.median()):.3f}",
              flush=True)
    means = {}
    res_fixed, t_fixed = None, None
    if "fixed" in scales:  # the flux scale held at 0: the MAP of z alone
        t0 = time.perf_counter()
        res_fixed = fit_map(model, observed, obs, generator=torch.Generator().manual_seed(args.seed), fit_flux=False)
        t_fixed = time.perf_counter() - t0
        out["map_fixed_wall_s"] = t_fixed
        print(f"MAP of z alone (flux scale held at 0): {t_fixed:.1f} s, median chi2/dof "
              f"{float(res_fixed.reduced_chi2.median()):.3f}", flush=True)
    for prop, scale in [(p, s) for s in scales for p in args.proposals.split(",") if p]:
        g = torch.Generator().manual_seed(args.seed + 1)
        t0 = time.perf_counter()
        h = sample_posterior(model, observed, obs, res if scale != "fixed" else res_fixed, samples=args.samples,
                             chains=args.chains, generator=g, method="is", draws=args.draws, fallback=None,
                             proposal=prop,
                             min_ess=args.min_ess or None, max_draws=args.max_draws,
                             scale=scale)
        prop = prop if scale == "redraw" else f"{prop}+{scale}"
        wall = time.perf_counter() - t0
        ess, k = h.is_ess.numpy(), h.pareto_k.numpy()
        derived, _, _ = posterior_images(model, obs, h.samples)
        d = derived.numpy()
        means[prop] = (d.mean(1), d.std(1), k <= 0.7)
        r = {"wall_s": wall, "total_wall_s": wall + (t_map if scale != "fixed" else t_fixed),
             "ess_median": float(np.median(ess)),
             "ess_p10": float(np.percentile(ess, 10)), "ess_min": float(ess.min()),
             "frac_ess_ge_200": float(np.mean(ess >= 200)), "k_median": float(np.median(k)),
             "frac_k_le_0.7": float(np.mean(k <= 0.7)), "frac_pass": float(np.mean((k <= 0.7) & (ess >= 200))),
             "ess_per_s_per_galaxy": float(np.median(ess) / wall)}
        if truth is not None:  # where the truth falls in the posterior, in standard deviations
            r["truth_z_rms"] = np.sqrt(np.mean(((truth - d.mean(1)) / d.std(1)) ** 2, 0)).tolist()
        out[prop] = r
        print(f"[{prop}] {wall:.1f} s (+ MAP {r['total_wall_s'] - wall:.1f} s): ESS median {r['ess_median']:.0f}, p10 "
              f"{r['ess_p10']:.0f}, min {r['ess_min']:.0f}, >= 200: {r['frac_ess_ge_200']:.0%}; k median "
              f"{r['k_median']:.2f}, <= 0.7: {r['frac_k_le_0.7']:.0%}; both: {r['frac_pass']:.0%}", flush=True)
    if len(means) >= 2:
        (a, (ma, sa, oka)), (b, (mb, sb, okb)) = list(means.items())[:2]
        both = oka & okb
        if both.any():
            diff = np.abs(ma[both] - mb[both]) / np.maximum(sa[both], sb[both])
            out["mean_difference_in_sd"] = {"galaxies": int(both.sum()), "median": np.median(diff, 0).tolist(),
                                            "p90": np.percentile(diff, 90, 0).tolist()}
            print(f"posterior means {a} vs {b} on {int(both.sum())} galaxies where both pass: median |diff| "
                  f"{np.round(np.median(diff, 0), 3).tolist()} sd (flux, hlr, e1, e2)")
    out["machine"] = machine_info()
    finish(out, args.json)


if __name__ == "__main__":
    main()
