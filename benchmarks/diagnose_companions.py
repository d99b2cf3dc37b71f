#!/usr/bin/env python
"""Can a VAE with a companion draw the held-out galaxies' companions? Encoder codes against MAP fits.

    python benchmarks/diagnose_companions.py --model pipelines/runs/sdss-vae-bd-comp/model.pt \\
        --data rich_1k.h5 --n 1000 --json diagnose_companions.json

For the held-out galaxies whose catalog has a companion (``comp_flux_ratio > 0``), the
encoder's mean code (a latent gate at its likelihood-optimal weight) against a MAP fit of
every latent coordinate from it (flat prior, Adam, ``--steps`` steps of ``--lr``): the
companion's median flux fraction (catalog: ``r / (1 + r)``), its distance from the
catalog's position, the likelihood gained, and the median CAS asymmetry of the galaxies'
stamps (noisy, measured with the variance maps, as ``galgen evaluate --measure-on
observed``) against the real stamps'. A fit that gives the companion its light where the
encoder does not puts the gap in the amortisation, not in the decoder.
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a VAE with a companion (VAE(companion=True))")
    ap.add_argument("--data", required=True, help="held-out rich-morphology cutout file with its catalog")
    ap.add_argument("--n", type=int, default=1000, help="galaxies of the file to search for companions")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from galgen.data import CutoutFile, ObservationLoader
    from galgen.evaluation.statistics import morphology_statistics
    from galgen.runtime import resolve_model

    t0 = time.perf_counter()
    model = resolve_model(args.model, "cpu").eval()
    if not model.config.get("companion"):
        raise SystemExit(f"--model: {args.model} has no companion (VAE(companion=True))")
    for p in model.parameters():
        p.requires_grad_(False)
    with CutoutFile(args.data) as f:
        n = min(args.n, len(f))
        cat, scale = f.catalog[:n], f.pixel_scale
    ratio = np.asarray(cat["comp_flux_ratio"], dtype=float)
    rows = np.flatnonzero(ratio > 0)
    batch = ObservationLoader(args.data, np.arange(n), (), in_memory=True).batch(torch.as_tensor(rows))
    obs, dec = batch.observation, model.decoder
    with torch.no_grad():
        z0 = model.with_best_gate(model.encoder_moments(batch.observed)[0], batch)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=args.lr)
    for _ in range(args.steps):
        opt.zero_grad()
        (-obs.log_likelihood(model.decode(z), batch.observed)).sum().backward()
        opt.step()
    beta = np.radians(np.asarray(cat["beta"], dtype=float)[rows] + np.asarray(cat["comp_angle"], dtype=float)[rows])
    sep = np.asarray(cat["comp_sep"], dtype=float)[rows] / scale
    truth = np.c_[sep * np.cos(beta), sep * np.sin(beta)] * (dec.size // batch.observed.shape[-1])
    gen = torch.Generator().manual_seed(args.seed)
    real = morphology_statistics(batch.observed.double().numpy(), scale,
                                 variance=obs.noise.variance(batch.observed.clamp(min=0)).double().numpy())
    result = {"model": args.model, "data": str(args.data), "n_searched": n, "n_companions": len(rows),
              "steps": args.steps, "lr": args.lr, "machine": machine_info(),
              "catalog_fraction_median": float(np.median(ratio[rows] / (1 + ratio[rows]))),
              "real_asymmetry_median": float(np.nanmedian(real["asymmetry"])), "codes": {}}
    print(f"{len(rows)} galaxies with companions in {n}; catalog flux fraction median "
          f"{result['catalog_fraction_median']:.3f}; real median A {result['real_asymmetry_median']:.3f}")
    with torch.no_grad():
        for name, code in (("encoder", z0), ("MAP fit", z.detach())):
            p = dec.companion_parameters(code)
            dist = np.hypot(p["dx"].numpy() - truth[:, 0], p["dy"].numpy() - truth[:, 1])
            clean = obs.noiseless(model.decode(code))
            var = obs.noise.variance(clean)
            noisy = obs.noise.sample(clean, generator=gen)
            st = morphology_statistics(noisy.double().numpy(), scale, variance=var.double().numpy())
            nll = -obs.log_likelihood(model.decode(code), batch.observed)
            entry = {"fraction_median": float(p["fraction"].median()), "distance_median_px": float(np.median(dist)),
                     "within_3px": float(np.mean(dist < 3)), "nll_median": float(nll.median()),
                     "asymmetry_median": float(np.nanmedian(st["asymmetry"]))}
            result["codes"][name] = entry
            print(f"{name:8s} flux fraction median {entry['fraction_median']:.3f}, distance from the catalog's "
                  f"position median {entry['distance_median_px']:.2f} px ({entry['within_3px']:.0%} within 3), "
                  f"nll median {entry['nll_median']:.1f}, median A {entry['asymmetry_median']:.3f}")
    result["wall_s"] = time.perf_counter() - t0
    finish(result, args.json)


if __name__ == "__main__":
    main()
