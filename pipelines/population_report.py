"""The simulated SDSS population against published real-galaxy morphology statistics.

    python pipelines/population_report.py --n 600 --out report/population

Simulates ``--n`` galaxies of the SDSS preset twice with the same seed (``--morphology
rich`` and ``bulge-disk``), at oversampling 3, so that each has a PSF-free intrinsic
image at 0.132 arcsec per pixel beside its observed SDSS stamp (0.396 arcsec, PSF,
noise). It measures concentration, asymmetry, smoothness, Gini and M20 with
:func:`galgen.evaluation.morphology_statistics` (statmorph's definitions) on both, groups
the galaxies by their catalog type, and compares:

* the intrinsic (well-resolved) statistics of each type with the CAS type means of nearby
  galaxies (Conselice 2003, ApJS 147, 1, Table 1: R-band images of resolved galaxies);
* the Gini-M20 classes of Lotz et al. 2008 (ApJ 672, 177): mergers above
  ``G = -0.14 M20 + 0.33``, E/S0/Sa above ``G = 0.14 M20 + 0.80``, Sb-Ir below it;
* the Petrosian half-light radius measured on the SDSS stamps against magnitude with the
  apparent size-magnitude relation of the SDSS main sample the catalog follows (Shen et
  al. 2003).

Writes ``<out>/population.json`` (per-type medians, quartiles, Lotz class fractions, the
published values and the pass/fail of each tolerance) and ``<out>/population_cas.png``,
``population_gini_m20.png``, ``population_sizes.png``, ``population_examples.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

#: Conselice (2003), Table 1: mean and standard deviation of C, A and S by class.
CONSELICE_2003 = {
    "E": {"concentration": (4.4, 0.3), "asymmetry": (0.02, 0.02), "smoothness": (0.00, 0.04),
             "published_class": "ellipticals"},
    "early disk": {"concentration": (3.9, 0.5), "asymmetry": (0.07, 0.04), "smoothness": (0.08, 0.08),
                   "published_class": "early-type disks (S0-Sb)"},
    "late disk": {"concentration": (3.1, 0.4), "asymmetry": (0.15, 0.06), "smoothness": (0.29, 0.13),
                  "published_class": "late-type disks (Sc-Sd)"},
    "irregular": {"concentration": (2.9, 0.3), "asymmetry": (0.17, 0.10), "smoothness": (0.40, 0.20),
                  "published_class": "irregulars"},
}
GROUPS = ("E", "early disk", "late disk", "irregular", "with companion")


def lotz_class(gini, m20):
    """Lotz et al. (2008) Gini-M20 class: 'merger', 'E/S0/Sa' or 'Sb-Ir'."""
    merger = gini > -0.14 * m20 + 0.33
    early = gini > 0.14 * m20 + 0.80
    return np.where(merger, "merger", np.where(early, "E/S0/Sa", "Sb-Ir"))


#: B/T boundaries between the comparison groups: ellipticals above 0.7, S0-Sb disks from 0.2,
#: Sc-Sd below (r-band B/T by Hubble type: Graham & Worley 2008, MNRAS 388, 1708;
#: Simard et al. 2011; Meert et al. 2015).
BT_ELLIPTICAL, BT_EARLY = 0.7, 0.2


def groups_of(cat):
    """The comparison group of each galaxy from its truth columns."""
    bt = np.asarray(cat["bt"], float)
    rich = "irregular" in cat.colnames
    irr = np.asarray(cat["irregular"]) == 1 if rich else np.zeros(len(bt), bool)
    comp = np.asarray(cat["comp_flux_ratio"], float) > 0 if rich else np.zeros(len(bt), bool)
    g = np.where(bt >= BT_ELLIPTICAL, "E", np.where(bt >= BT_EARLY, "early disk", "late disk")).astype(object)
    g[irr] = "irregular"
    g[comp] = "with companion"
    return g


def measure(path):
    """Statistics of the intrinsic (0.132") and observed (0.396") images of a cutout file."""
    from galgen.data.cutouts import CutoutFile
    from galgen.evaluation import morphology_statistics

    with CutoutFile(path) as f:
        cat = f.catalog
        intr = f.read("intrinsic")
        obs, var = f.read("observed"), f.read("variance")
        scale, k = f.pixel_scale, f.oversampling
    return cat, {"intrinsic": morphology_statistics(intr, scale / k),
                 "observed": morphology_statistics(obs, scale, variance=var)}


def summarise(stats, groups, names=("concentration", "asymmetry", "smoothness", "gini", "m20", "r50")):
    out = {}
    for grp in GROUPS:
        sel = (groups == grp) & stats["ok"]
        if not sel.any():
            continue
        row = {"n": int(sel.sum())}
        for n in names:
            q = np.percentile(stats[n][sel], [25, 50, 75])
            row[n] = {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2])}
        cls = lotz_class(stats["gini"][sel], stats["m20"][sel])
        row["lotz"] = {c: float(np.mean(cls == c)) for c in ("E/S0/Sa", "Sb-Ir", "merger")}
        out[grp] = row
    return out


def checks(summary):
    """Tolerances: a type's median C and A within one published standard deviation of its mean."""
    res = {}
    for grp, pub in CONSELICE_2003.items():
        if grp not in summary:
            continue
        for n in ("concentration", "asymmetry"):
            mean, sd = pub[n]
            got = summary[grp][n]["median"]
            res[f"{grp} {n}"] = {"simulated_median": got, "published_mean": mean, "published_sd": sd,
                                 "pass": bool(abs(got - mean) <= sd)}
    return res


def figures(out, data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(GROUPS, ("C3", "C1", "C0", "C2", "C4")))
    # CAS plane (intrinsic) with Conselice's type means
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key in zip(axes, ("rich", "bulge-disk")):
        st, grp = data[key]["stats"]["intrinsic"], data[key]["groups"]
        for g in GROUPS:
            sel = (grp == g) & st["ok"]
            if sel.any():
                ax.scatter(st["asymmetry"][sel], st["concentration"][sel], s=5, alpha=0.5, color=colours[g], label=g)
        for g, pub in CONSELICE_2003.items():
            (c, sc), (a, sa) = pub["concentration"], pub["asymmetry"]
            ax.errorbar(a, c, xerr=sa, yerr=sc, fmt="s", color=colours[g], mec="k", ms=8, capsize=3)
        ax.set_xlim(-0.05, 0.6)
        ax.set_xlabel("asymmetry A")
        ax.set_title(f"{key}: intrinsic, 0.132\"/px (squares: Conselice 2003)")
    axes[0].set_ylabel("concentration C")
    axes[0].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(out / "population_cas.png", dpi=100)
    plt.close(fig)
    # Gini-M20 with Lotz et al. 2008 lines
    fig, axes = plt.subplots(2, 2, figsize=(10, 9), sharex=True, sharey=True)
    m = np.linspace(-3.0, 0.0, 10)
    for row, key in enumerate(("rich", "bulge-disk")):
        for col, which in enumerate(("intrinsic", "observed")):
            ax = axes[row, col]
            st, grp = data[key]["stats"][which], data[key]["groups"]
            for g in GROUPS:
                sel = (grp == g) & st["ok"]
                if sel.any():
                    ax.scatter(st["m20"][sel], st["gini"][sel], s=5, alpha=0.5, color=colours[g], label=g)
            ax.plot(m, -0.14 * m + 0.33, "k-", lw=1)
            mm = m[m <= -1.68]
            ax.plot(mm, 0.14 * mm + 0.80, "k--", lw=1)
            ax.set_title(f"{key}, {which}", fontsize=9)
            ax.set_xlim(-3.0, -0.5)
            ax.set_ylim(0.3, 0.75)
            ax.invert_xaxis()
    for ax in axes[1]:
        ax.set_xlabel("M20")
    for ax in axes[:, 0]:
        ax.set_ylabel("Gini")
    axes[0, 0].legend(fontsize=7, markerscale=3)
    fig.suptitle("Gini-M20 (lines: Lotz et al. 2008 merger and E/S0/Sa | Sb-Ir boundaries)")
    fig.tight_layout()
    fig.savefig(out / "population_gini_m20.png", dpi=100)
    plt.close(fig)
    # size-magnitude on the observed SDSS stamps
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for key, c in (("rich", "C0"), ("bulge-disk", "C1")):
        st, cat = data[key]["stats"]["observed"], data[key]["catalog"]
        sel = st["ok"]
        ax.scatter(np.asarray(cat["mag"])[sel], st["r50"][sel], s=4, alpha=0.4, color=c, label=f"{key}: measured r50")
    mags = np.linspace(14, 17.77, 10)
    ax.plot(mags, 1.8 * 10 ** (-0.13 * (mags - 17)), "k-", label="catalog relation (intrinsic, disks)")
    ax.set_yscale("log")
    ax.set_xlabel("r [mag]")
    ax.set_ylabel("Petrosian r50 on SDSS stamps [arcsec]")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "population_sizes.png", dpi=100)
    plt.close(fig)


def examples(out, path, groups, n_per=6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from galgen.data.cutouts import CutoutFile

    with CutoutFile(path) as f:
        intr, obs = f.read("intrinsic"), f.read("observed")
    rows = [g for g in GROUPS if (groups == g).any()]
    fig, axes = plt.subplots(len(rows), 2 * n_per, figsize=(2 * n_per * 1.3, len(rows) * 1.45))
    for r, g in enumerate(rows):
        idx = np.flatnonzero(groups == g)[:n_per]
        for j in range(n_per):
            for a, img, stretch in ((axes[r, 2 * j], intr, 0.01), (axes[r, 2 * j + 1], obs, None)):
                a.axis("off")
                if j < len(idx):
                    im = img[idx[j]]
                    s = stretch * im.max() if stretch else 3 * np.std(im[:6, :])
                    a.imshow(np.arcsinh(im / max(s, 1e-9)), cmap="gray", origin="lower")
        axes[r, 0].set_title(g, fontsize=8, loc="left")
    fig.suptitle("rich morphology: intrinsic (0.132\"/px) and observed SDSS stamp, pairs", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "population_examples.png", dpi=90)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="report/population")
    args = ap.parse_args()
    from galgen.simulate import simulate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = {}
    for key in ("rich", "bulge-disk"):
        path = out / f"sdss_{key}.h5"
        simulate(path, survey="sdss", n=args.n, stamp=64, seed=args.seed, oversampling=3, psf_size=99,
                 morphology=key, workers=args.workers, overwrite=True)
        cat, stats = measure(path)
        groups = groups_of(cat)
        data[key] = {"catalog": cat, "stats": stats, "groups": groups, "path": path}
    report = {"settings": vars(args), "machine": platform.processor() or platform.machine(),
              "published": {"conselice_2003": CONSELICE_2003,
                            "lotz_2008": "merger: G > -0.14 M20 + 0.33; E/S0/Sa: G > 0.14 M20 + 0.80"}}
    for key, d in data.items():
        report[key] = {which: summarise(d["stats"][which], d["groups"]) for which in ("intrinsic", "observed")}
        report[key]["checks"] = checks(report[key]["intrinsic"])
        report[key]["failed_fraction"] = {w: float(1 - d["stats"][w]["ok"].mean()) for w in ("intrinsic", "observed")}
    figures(out, data)
    examples(out, data["rich"]["path"], data["rich"]["groups"])
    report["wall_s"] = time.perf_counter() - t0
    (out / "population.json").write_text(json.dumps(report, indent=1))
    for key in data:
        print(f"== {key}")
        for which in ("intrinsic", "observed"):
            for g, row in report[key][which].items():
                print(f"{which:9s} {g:15s} n={row['n']:4d} C={row['concentration']['median']:.2f} "
                      f"A={row['asymmetry']['median']:.3f} S={row['smoothness']['median']:.3f} "
                      f"G={row['gini']['median']:.3f} M20={row['m20']['median']:.2f} lotz={row['lotz']}")
        for name, c in report[key]["checks"].items():
            print(f"  {name}: {c['simulated_median']:.3f} vs {c['published_mean']} +- {c['published_sd']}: "
                  f"{'pass' if c['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
