"""Which model fits which galaxies: chi2/dof of deep and parametric MAP fits by morphology.

    galgen simulate --survey sdss --n 1000 --stamp 64 --seed 5151 --psf-size 33 --morphology rich --out holdout.h5
    for m in sersic bulge-disk sdss-vae; do galgen fit --model $m --data holdout.h5 --limit 300 --out fit_$m.h5; done
    python pipelines/compare_by_morphology.py --data holdout.h5 --deep fit_sdss-vae.fits \\
        --parametric fit_sersic.fits fit_bulge-disk.fits

``--deep`` takes the catalogs of a sharded fit (``galgen fit --shard k/N``) together; the
parametric fits may cover more galaxies (their rows are matched by index).

Prints a markdown table: per morphology group (from the truth columns,
:func:`galgen.simulate.morphology_label`) the median chi2/dof of each fit, the fraction of
galaxies where the deep model's chi2/dof is below every parametric one, and the median
difference (best parametric minus deep: positive where the deep model fits better).
"""

from __future__ import annotations

import argparse

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the simulated cutout file (with morphology columns)")
    ap.add_argument("--deep", required=True, nargs="+",
                    help="FITS catalog(s) of the deep model's galgen fit (the shards of one, e.g. --shard k/N)")
    ap.add_argument("--parametric", nargs="+", required=True, help="FITS catalogs of parametric fits")
    args = ap.parse_args()
    from astropy.table import Table, vstack

    from galgen.data.cutouts import CutoutFile
    from galgen.simulate import morphology_label

    with CutoutFile(args.data) as f:
        truth = f.catalog
    deep = vstack([Table.read(d) for d in args.deep])
    idx = np.asarray(deep["index"])
    par = []
    for p in args.parametric:  # the deep fit's galaxies, matched by index
        t = Table.read(p)
        row = {int(i): k for k, i in enumerate(t["index"])}
        missing = [int(i) for i in idx if int(i) not in row]
        if missing:
            raise SystemExit(f"{p}: lacks {len(missing)} of the deep fit's galaxies (e.g. index {missing[0]})")
        par.append(np.asarray(t["chi2_dof"], dtype=float)[[row[int(i)] for i in idx]])
    v, best = np.asarray(deep["chi2_dof"]), np.min(par, axis=0)
    rows = [dict(zip(truth.colnames, truth[i])) for i in idx]
    comp = np.array([float(r.get("comp_flux_ratio", 0.0)) > 0 for r in rows])
    label = np.array([morphology_label(r).split(" + ")[0] for r in rows])
    print("| group | n | deep median chi2/dof | " + " | ".join(args.parametric) +
          " | deep below all | median (best parametric - deep) |")
    print("|---|---:|---:|" + "---:|" * len(par) + "---:|---:|")

    def row(name, sel):
        if not sel.any():
            return
        meds = " | ".join(f"{np.median(p[sel]):.3f}" for p in par)
        print(f"| {name} | {sel.sum()} | {np.median(v[sel]):.3f} | {meds} | {np.mean(v[sel] < best[sel]):.2f} | "
              f"{np.median(best[sel] - v[sel]):+.3f} |")

    row("all", np.ones(len(idx), bool))
    for g in ("spiral", "barred spiral", "barred disk", "disk", "irregular", "bulge"):
        row(g, (label == g) & ~comp)
    row("with companion", comp)
    row("arms, bars, clumps or companions", np.isin(label, ["spiral", "barred spiral", "barred disk", "irregular"])
        | comp)


if __name__ == "__main__":
    main()
