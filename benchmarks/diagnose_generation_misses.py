#!/usr/bin/env python
"""Where does a generated population's miss come from: the noise model, the decoder or the prior?

    python benchmarks/diagnose_generation_misses.py --vae sdss-vae-bd-comp --data rich_5k.h5 \
        --n 5000 --gan runs/gan-vae/model.pt --json misses.json

``galgen evaluate`` compares the morphology statistics of a model's galaxies with the
held-out ones'. A statistic beyond its floor there can come from three places, and this
script measures each on the same held-out galaxies, observed the same way (their PSFs, the
survey's CCD noise, :func:`galgen.evaluation.generated_observations`):

- ``truth``: simulated galaxies' own intrinsic images, observed anew: those of the next
  ``n`` galaxies of the file where it has ``2 n`` (otherwise the same ``n``, whose
  statistics then pair up with the real ones: W1 below the floor and a C2ST below
  chance). What is left here is the noise model's (galgen's CCD noise against the file's
  simulated one).
- ``reconstruction``: the VAE's decoder at the encoder's mean code of each held-out
  galaxy. What is added here is the decoder's: what it cannot draw of a galaxy it has seen.
- ``reconstruction (MAP codes)`` with ``--codes``: the decoder at given codes of the
  first galaxies of ``--data`` (e.g. the MAP codes of training galaxies a prior was
  fitted to, with ``--data`` their training file): the decoder at its best.
- ``prior`` (each of the VAE's priors) and every ``--gan``: drawn galaxies. What is added
  here is the prior's (or the game's).

Per set: the W1 / floor of every statistic and the C2ST of the statistics (as
``galgen evaluate --measure-on observed``), and the medians.

With ``--by-type`` and ``--codes``, galaxy by galaxy: the statistics of each galaxy's
reconstruction at its given code minus those of its own intrinsic image observed anew
(the same PSF and noise model), medians over the catalog's morphological types (arms,
bar, irregular, companion, lopsided, dust lane, knots, none of these), bulge-to-total
ranges and bulge Sersic-index ranges: where the decoder's light goes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_info  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--vae", required=True, help="VAE (checkpoint, run directory or pretrained name)")
    ap.add_argument("--data", required=True, help="held-out simulated cutout file (with intrinsic images)")
    ap.add_argument("--gan", action="append", default=[], help="GAN(s) to measure beside the VAE's priors")
    ap.add_argument("--codes", help="torch file of (N, latent_dim) codes of the first N galaxies of --data")
    ap.add_argument("--n", type=int, default=1000, help="held-out galaxies [1000]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--by-type", action="store_true",
                    help="with --codes: reconstruction minus the same galaxies' truth, by catalog type")
    ap.add_argument("--only-by-type", action="store_true", help="with --by-type: only the galaxy-by-galaxy part")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.by_type = args.by_type or args.only_by_type
    from galgen.data import CutoutFile, ObservationLoader
    from galgen.errors import GalgenInputError
    from galgen.evaluation import generated_observations, morphology_statistics
    from galgen.evaluation.distances import c2st_statistics, compare_statistics
    from galgen.runtime import resolve_model

    torch.set_num_threads(args.threads)
    with CutoutFile(args.data) as f:
        if "intrinsic" not in f.keys:
            raise GalgenInputError(f"--data: {args.data} holds no intrinsic images (a simulated file does)")
        n = min(args.n, len(f))
        scale = f.pixel_scale
        real = f.read("observed", slice(0, n)).astype(np.float64)
        real_var = f.read("variance", slice(0, n)).astype(np.float64)
        mask = f.read("mask", slice(0, n)).astype(bool) if "mask" in f.keys else None
        other = len(f) >= 2 * n
        intrinsic = f.read("intrinsic", slice(n, 2 * n) if other else slice(0, n))
        own = f.read("intrinsic", slice(0, n)) if args.by_type else None
        catalog = f.catalog[:n] if args.by_type else None
    if args.by_type and not args.codes:
        raise GalgenInputError("--by-type: needs --codes (the reconstructions compared galaxy by galaxy)")
    vae = resolve_model(args.vae, "cpu")
    if vae.kind != "vae" or vae.cond_dim:
        raise GalgenInputError(f"--vae: {args.vae} is a {vae.kind} with {vae.cond_dim} conditions; an "
                               f"unconditional VAE is needed")

    def observe(**how):
        return generated_observations(how.pop("model", None), args.data, n=n, seed=args.seed,
                                      batch_size=args.batch_size, **how)

    with torch.no_grad():
        loader = ObservationLoader(args.data, np.arange(n), in_memory=True)
        codes = torch.cat([vae.encode(b.observed).mean for b in loader.iter_batches(args.batch_size)])
    sets = [("truth" + ("" if other else " (the same galaxies)"), dict(images=intrinsic)),
            ("reconstruction", dict(model=vae, latents=(codes, torch.zeros(n))))]
    if args.codes:
        given = torch.load(args.codes, weights_only=True, map_location="cpu")
        if not isinstance(given, torch.Tensor) or given.ndim != 2 or given.shape[1] != vae.latent_dim \
                or len(given) < n:
            raise GalgenInputError(f"--codes: {args.codes} must hold a ({n}+, {vae.latent_dim}) tensor of codes")
        sets.append(("reconstruction (MAP codes)", dict(model=vae, latents=(given[:n].float(), torch.zeros(n)))))
    sets += [(f"prior ({label})", dict(model=vae.with_prior(choice))) for choice, label in vae.prior_choices.items()]
    sets += [(f"gan {spec}", dict(model=resolve_model(spec, "cpu"))) for spec in args.gan]
    if args.only_by_type:
        sets = []

    def measure(**how):
        g = observe(**how)
        return morphology_statistics(g["observed"].astype(np.float64), scale, mask=mask,
                                     variance=g["variance"].astype(np.float64))

    t0 = time.perf_counter()
    stats = {"real": morphology_statistics(real, scale, mask=mask, variance=real_var)}
    print(f"real: {n} galaxies measured in {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"vae": args.vae, "data": str(args.data), "n": n, "seed": args.seed, "sets": {}}
    names, measured = None, {}
    for label, how in sets:
        t0 = time.perf_counter()
        st = measured[label] = measure(**how)
        cmp = compare_statistics(stats["real"], st, seed=args.seed)["statistics"]
        c2st = c2st_statistics(stats["real"], st, seed=args.seed)
        names = names or [k for k in cmp if isinstance(cmp[k], dict) and "w1_ratio" in cmp[k]]
        result["sets"][label] = {
            "c2st": c2st["accuracy"], "c2st_floor": c2st["floor"],
            "w1_ratio": {k: cmp[k]["w1_ratio"] for k in names},
            "median_real": {k: cmp[k]["median_real"] for k in names},
            "median": {k: cmp[k]["median_gen"] for k in names}, "seconds": time.perf_counter() - t0}
        worst = sorted(((cmp[k]["w1_ratio"], k) for k in names), reverse=True)[:4]
        print(f"{label}: C2ST {c2st['accuracy']:.3f} (floor {c2st['floor']:.3f}); W1/floor "
              + ", ".join(f"{k} {r:.2f}" for r, k in worst) + f"; {time.perf_counter() - t0:.0f} s", flush=True)
    if result["sets"]:
        print("medians (real / " + " / ".join(result["sets"]) + "):")
    for k in names or []:
        print(f"  {k}: {next(iter(result['sets'].values()))['median_real'][k]:.4g} / "
              + " / ".join(f"{s['median'][k]:.4g}" for s in result["sets"].values()))
    if args.by_type:
        t0 = time.perf_counter()
        # the sets above, where they were measured (the same galaxies and noise draws), are not measured again
        truth = measured.get("truth (the same galaxies)") or measure(images=own)
        recon = measured.get("reconstruction (MAP codes)") or measure(model=vae, latents=(given[:n].float(),
                                                                                          torch.zeros(n)))
        result["by_type"] = by_type(catalog, stats["real"], truth, recon)
        print(f"by type: {time.perf_counter() - t0:.0f} s; median reconstruction - truth of the same galaxy "
              f"(and real - truth):")
        for group, row in result["by_type"].items():
            print(f"  {group:28s} n={row['n']:5d} " + ", ".join(
                f"{k} {row[k]['reconstruction_minus_truth']:+.4f} ({row[k]['real_minus_truth']:+.4f})"
                for k in ("gini", "concentration", "asymmetry", "m20")))
    result["machine"] = machine_info()
    finish(result, args.json)


def by_type(catalog, real, truth, recon) -> dict:
    """Medians, over groups of galaxies, of their reconstructions' statistics minus their truth's.

    Parameters
    ----------
    catalog : astropy.table.Table
        The galaxies' simulation catalog (the rich-morphology columns).
    real, truth, recon : dict of numpy.ndarray
        :func:`galgen.evaluation.morphology_statistics` of the galaxies' observations, of
        their intrinsic images observed anew and of their reconstructions, in the same order.

    Returns
    -------
    dict
        Per group: ``n`` and, per statistic, the medians of ``real``, ``truth`` and
        ``reconstruction``, ``reconstruction_minus_truth`` and ``real_minus_truth``
        (medians of the galaxy-by-galaxy differences).
    """
    def col(name):
        return np.asarray(catalog[name], dtype=float)

    kinds = {"arms": col("arm_amp") > 0, "bar": col("bar_frac") > 0, "irregular": col("irregular") > 0,
             "companion": col("comp_flux_ratio") > 0, "lopsided": col("lop_a1") > 0, "dust lane": col("dust_tau") > 0}
    groups = dict(kinds, knots=col("n_knots") > 0)
    groups["none of the six"] = ~np.any(list(kinds.values()), axis=0)
    groups["all"] = np.ones(len(catalog), bool)
    bt, index = col("bt"), col("n_bulge")
    for lo, hi in ((0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1.01)):
        groups[f"B/T in [{lo}, {min(hi, 1)})"] = (bt >= lo) & (bt < hi)
    for lo, hi in ((0, 3), (3, 3.7), (3.7, 4.3), (4.3, 5), (5, 99)):
        groups[f"B/T > 0.5, n_bulge in [{lo}, {hi})"] = (bt > 0.5) & (index >= lo) & (index < hi)
    out = {}
    for group, m in groups.items():
        row = {"n": int(m.sum())}
        for k in ("gini", "concentration", "asymmetry", "m20", "r50"):
            r, t, g = real[k][m], truth[k][m], recon[k][m]
            row[k] = {"real": float(np.nanmedian(r)), "truth": float(np.nanmedian(t)),
                      "reconstruction": float(np.nanmedian(g)),
                      "reconstruction_minus_truth": float(np.nanmedian(g - t)),
                      "real_minus_truth": float(np.nanmedian(r - t))}
        out[group] = row
    return out


if __name__ == "__main__":
    main()
