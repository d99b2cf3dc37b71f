#!/usr/bin/env python
"""Simulation-based calibration of a galgen model's posteriors, with a plot.

    python pipelines/sbc.py --model sdss-vae --data sdss_holdout_5k.h5 --n 1000 \
        --batch-size 250 --samples 200 --chains 4 --out report/sbc

For ``--n`` galaxies, draws a latent code from the model's prior, observes the decoded
galaxy through the PSF and noise of a held-out galaxy of ``--data``, samples the
posterior with galgen's MAP + HMC, NUTS or importance sampling (the code of ``galgen fit``) and ranks the true flux,
half-light radius, e1, e2 and latent coordinates among 199 posterior draws
(:func:`galgen.inference.calibration.simulation_based_calibration`). Writes
``<out>/sbc.json`` (coverage of 68% and 95% intervals with standard errors, rank
uniformity p-values, sampler diagnostics, settings, wall time), ``<out>/sbc_ranks.npz``
and ``<out>/sbc.png`` (rank histograms and coverage). Batches are saved as they finish
and a rerun with the same arguments skips them (resumable). ``--shard k/N`` runs only
the k-th contiguous block of the batches (SLURM arrays, or several processes on one
machine), each writing its own batch files into the shared ``--out``; the report counts
the batches done so far; ``--report-only`` writes it from the batches done, running
none.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from galgen.data.atomic import atomic_output
from galgen.data.cutouts import CutoutFile
from galgen.inference.calibration import coverage, rank_uniformity, simulation_based_calibration
from galgen.inference.fit import SCALE_TREATMENTS
from galgen.data.loading import observation_from_cutouts
from galgen.models.parametric import SersicModel
from galgen.runtime import derive_seed, resolve_device, resolve_model
from galgen.sharding import parse_shard

N_DRAWS = 199


def plot(names, ranks, cov, out):
    """Rank histograms of the derived quantities and coverage of every quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = names[:4]
    fig, axes = plt.subplots(1, len(show) + 1, figsize=(3.2 * (len(show) + 1), 3.0))
    bins = 20
    edges = np.linspace(0, N_DRAWS + 1, bins + 1)
    n = len(ranks)
    for j, ax in enumerate(axes[:-1]):
        ax.hist(ranks[:, j], bins=edges, color="C0", alpha=0.8)
        mu = n / bins
        ax.axhspan(mu - 2 * np.sqrt(mu), mu + 2 * np.sqrt(mu), color="0.8", zorder=0)
        ax.set_title(f"rank of {show[j]}")
        ax.set_xlabel(f"rank among {N_DRAWS} draws")
    ax = axes[-1]
    x = np.arange(len(names))
    for lev, c in zip(sorted(cov), ("C1", "C2")):
        frac, nominal, se = cov[lev]
        ax.errorbar(x, np.asarray(frac) * 100, yerr=se * 100, fmt="o", color=c, ms=3, label=f"{lev:.0%}")
        ax.axhline(nominal * 100, color=c, lw=0.8)
        ax.axhspan((nominal - 0.03) * 100, (nominal + 0.03) * 100, color=c, alpha=0.15)
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_ylabel("coverage [%]")
    ax.legend(fontsize=7)
    fig.suptitle(f"simulation-based calibration, {n} galaxies")
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", required=True, help="pretrained name, run directory or model.pt, or 'sersic' / "
                    "'bulge-disk' (the parametric model, its parameters drawn from its prior and its flux "
                    "from the observed galaxy's)")
    ap.add_argument("--data", required=True, help="cutout file whose PSFs and noise observe the simulated galaxies")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--n-leapfrog", type=int, default=16)
    ap.add_argument("--prior", choices=["flow", "normal"], default=None)
    ap.add_argument("--metric", choices=["diag", "dense"], default="diag", help="HMC mass matrix [diag]")
    ap.add_argument("--sampler", choices=["hmc", "nuts", "is", "laplace"], default="hmc",
                    help="posterior method: fixed-length HMC, NUTS, importance sampling, Laplace [hmc]")
    ap.add_argument("--draws", type=int, default=None, help="importance sampling: proposals per galaxy")
    ap.add_argument("--no-fallback", action="store_true",
                    help="importance sampling: keep galaxies whose Pareto k is too large (no NUTS)")
    ap.add_argument("--proposal", choices=["auto", "laplace", "amortized"], default="auto",
                    help="importance sampling: the Laplace t alone, or mixed with the model's amortised "
                         "posterior (auto: where the model has one) [auto]")
    ap.add_argument("--min-ess", type=float, default=None,
                    help="importance sampling: galaxies go on drawing until this effective sample size")
    ap.add_argument("--scale", choices=SCALE_TREATMENTS, default="redraw",
                    help="importance sampling: the log flux scale proposed with the latents and redrawn from its "
                         "exact conditional, integrated out, proposed only, or held at the truth's 0 [redraw]")
    ap.add_argument("--max-draws", type=int, default=None, help="importance sampling with --min-ess: cap")
    ap.add_argument("--max-depth", type=int, default=8, help="NUTS tree depth at most [8]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", default=None, help="k/N: run only the k-th of N contiguous blocks of batches")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--report-only", action="store_true", help="report the batches done so far, run none")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args()
    if args.samples * args.chains < N_DRAWS:
        raise SystemExit(f"--samples x --chains must be >= {N_DRAWS} (posterior draws ranked per galaxy)")
    shard = parse_shard(args.shard)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    with CutoutFile(args.data) as f:
        model = resolve_model(args.model, dev, data=(f.stamp_size, f.oversampling, f.pixel_scale),
                              prior=args.prior).eval()
        if len(f) < args.n:
            raise SystemExit(f"--n {args.n}: {args.data} has only {len(f)} galaxies to lend PSFs and noise")
    unit_flux = isinstance(model, SersicModel)  # renders unit flux: give it the observed galaxies' fluxes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("model", "data", "n", "batch_size", "samples", "chains", "warmup",
                                               "n_leapfrog", "prior", "metric", "seed")}
    if args.sampler != "hmc":  # (settings of earlier HMC runs stay valid for their batches)
        settings.update(sampler=args.sampler, max_depth=args.max_depth)
    if args.sampler == "is":
        settings.update(draws=args.draws, fallback=not args.no_fallback)
        if args.proposal != "auto" or args.min_ess is not None:  # (earlier runs' batches stay valid)
            settings.update(proposal=args.proposal, min_ess=args.min_ess, max_draws=args.max_draws)
    if args.sampler == "is" and args.scale != "joint":  # (earlier runs' batches, the joint scale, stay valid)
        settings.update(scale=args.scale)
    parts = []
    starts = list(range(0, args.n, args.batch_size))
    lo, hi = shard.bounds(len(starts))
    same = {k: v for k, v in settings.items() if k != "n"}  # a batch does not depend on --n
    for b, start in enumerate(starts):
        part = out / f"batch{b:04d}.npz"
        if part.exists() and {k: v for k, v in json.loads(str(np.load(part)["settings"])).items()
                              if k != "n"} == same:
            parts.append(dict(np.load(part)))
            continue
        if args.report_only or not lo <= b < hi:  # another shard's batch, not done yet
            continue
        rows = list(range(start, min(start + args.batch_size, args.n)))
        obs = observation_from_cutouts(args.data, rows, device=dev)
        log_scale = None
        if unit_flux:  # the observed galaxy's total flux
            with CutoutFile(args.data) as f:
                images = torch.as_tensor(f.read("observed", np.asarray(rows)), device=dev)
            log_scale = model.initial_log_scale(images)
        r = simulation_based_calibration(model, obs, samples=args.samples, chains=args.chains, warmup=args.warmup,
                                         n_leapfrog=args.n_leapfrog, n_draws=N_DRAWS, log_scale=log_scale,
                                         metric=args.metric, sampler=args.sampler, max_depth=args.max_depth,
                                         seed=derive_seed(args.seed, start), latent_names=model.latent_names,
                                         draws=args.draws, fallback=None if args.no_fallback else "nuts",
                                         proposal=args.proposal, min_ess=args.min_ess, max_draws=args.max_draws,
                                         scale=args.scale)
        r["settings"] = np.array(json.dumps(settings))
        r["names"] = np.array(r["names"])
        with atomic_output(part) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **r)
        parts.append(r)
        print(f"batch {b}: {len(rows)} galaxies in {r['wall_s']:.0f} s", flush=True)
    if not parts:
        raise SystemExit(f"{out}: no batches done yet")
    names = [str(s) for s in parts[0]["names"]]
    ranks = np.concatenate([p["ranks"] for p in parts])
    cov = coverage(ranks, N_DRAWS)
    _, pval = rank_uniformity(ranks, N_DRAWS, bins=20)
    truth = np.concatenate([p["truth"] for p in parts])
    by_size = {}  # coverage of the derived quantities by true half-light radius (column 1)
    for a, b in ((0.0, 0.3), (0.3, 0.7), (0.7, 1.5), (1.5, np.inf)):
        sel = (truth[:, 1] >= a) & (truth[:, 1] < b)
        if sel.sum() >= 10:
            c = coverage(ranks[sel], N_DRAWS)
            by_size[f"{a}-{b}"] = {"n": int(sel.sum()), **{f"{lev:.2f}": dict(zip(names[:4], map(float, frac[:4])))
                                                          for lev, (frac, _, _) in c.items()}}
    rhat = np.concatenate([p["rhat_max"] for p in parts])
    ess = np.concatenate([p["ess_bulk_min"] for p in parts])
    div = np.concatenate([p["divergences"] for p in parts])
    k_hat = np.concatenate([p.get("pareto_k", np.full(len(p["ranks"]), np.nan)) for p in parts])
    is_ess = np.concatenate([p.get("is_ess", np.full(len(p["ranks"]), np.nan)) for p in parts])
    report = {
        "n": int(len(ranks)), "settings": settings, "names": names,
        "coverage": {f"{lev:.2f}": {"fraction": dict(zip(names, map(float, frac))), "nominal": nominal,
                                    "standard_error": se} for lev, (frac, nominal, se) in cov.items()},
        "rank_uniformity_p": dict(zip(names, map(float, pval))),
        "coverage_by_true_hlr_arcsec": by_size,
        "rhat_max_median": float(np.median(rhat)), "frac_rhat_below_1.05": float((rhat < 1.05).mean()),
        "ess_bulk_min_median": float(np.median(ess)), "divergent_fraction": float((div > 0).mean()),
        **({"pareto_k_median": float(np.nanmedian(k_hat)), "frac_pareto_k_ok": float(np.mean(k_hat <= 0.7)),
            "is_ess_median": float(np.nanmedian(is_ess))} if np.isfinite(k_hat).any() else {}),
        "wall_s": float(sum(float(p["wall_s"]) for p in parts)),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {dev}",
        "date": time.strftime("%Y-%m-%d"),
    }
    with atomic_output(out / "sbc.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    plot(names, ranks, cov, out / "sbc.png")
    for lev, (frac, nominal, se) in cov.items():
        print(f"coverage {lev:.0%}: " + ", ".join(f"{n} {f:.3f}" for n, f in zip(names[:4], frac[:4]))
              + f" (nominal {nominal:.3f} +- {se:.3f})")
    print(out / "sbc.json")


if __name__ == "__main__":
    main()
