#!/usr/bin/env python
"""MAP fits of galaxies deeper than a model's training set: the encoder's guess as it is, or noise-matched.

    python benchmarks/bench_deep_guess.py --model sdss-vae-bd --n 48 --json bench_deep_guess.json

An encoder trained on single SDSS exposures does not extrapolate to deeper images of the
same galaxies (its flux guesses are 15-36 times too high 2 mag deeper).
:func:`galgen.models.amortised_guess`, given the galaxies' observation, adds Gaussian noise
to images whose empty-sky variance is below 0.8 of the encoder's training noise
(:attr:`galgen.models.LatentModel.encoder_noise_rms`) before they are encoded. This script
fits the same galaxies (``--data``, or ``--n`` rich galaxies simulated with the ``sdss-deep``
survey preset, the mean of 40 SDSS exposures) with :func:`galgen.inference.fit_map` and the
model's own optimiser and fit prior, once from the unmatched guess (the behaviour before
noise matching: ``encoder_noise_rms = None``) and once from the matched one, and reports for
each: the encoder guess's flux ratio and chi2/pixel, the fits' wall time, how many stop at
the iteration limit, their chi2/dof, and how many galaxies each start fits better (log
posterior higher by more than 0.5 nats).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_info  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default="sdss-vae-bd", help="pretrained name, run directory or .pt")
    ap.add_argument("--data", help="cutout file (default: simulate --n rich galaxies with survey sdss-deep)")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=5151, help="simulation seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from galgen.data import ObservationLoader
    from galgen.inference import fit_map
    from galgen.models import amortised_guess
    from galgen.runtime import resolve_model
    from galgen.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or simulate(Path(tmp) / "deep.h5", survey="sdss-deep", n=args.n, stamp=64, seed=args.seed,
                                     psf_size=33, morphology="rich", progress=False)
        batch = next(iter(ObservationLoader(data, np.arange(args.n)).iter_batches(args.n)))
    model = resolve_model(args.model, "cpu").eval()
    model = model.with_prior(model.map_prior) if model.map_prior else model
    rms = model.encoder_noise_rms
    sky = batch.observation.noise.sky_variance(batch.observed)
    result = {"model": args.model, "data": str(args.data or f"sdss-deep, rich, seed {args.seed}"), "n": args.n,
              "encoder_noise_rms": rms, "data_noise_rms_median": float(sky.sqrt().median()),
              "machine": machine_info(), "starts": {}}
    print(f"{args.model}: encoder trained at noise rms {rms:.3f} ADU; these data {result['data_noise_rms_median']:.3f}")
    print(f"{'start':16s} {'guess flux ratio':>16s} {'guess chi2/pix':>14s} {'fit s':>7s} {'at limit':>8s} "
          f"{'chi2/dof med':>12s} {'p90':>7s}")
    lp = {}
    for label, value in (("unmatched", None), ("noise-matched", rms)):
        model.encoder_noise_rms = value
        with torch.no_grad():
            z = amortised_guess(model, batch.observed, batch.cond, batch.observation)
            img = batch.observation.noiseless(model.decode(z, batch.cond).float())
        ratio = float((img.sum((1, 2)) / batch.observed.sum((1, 2))).median())
        guess_chi2 = float((batch.observation.noise.chi2(batch.observed, img) / img[0].numel()).median())
        t0 = time.perf_counter()
        r = fit_map(model, batch.observed, batch.observation, cond=batch.cond)
        wall = time.perf_counter() - t0
        chi = (r.chi2 / r.dof).cpu().numpy()
        lp[label] = r.log_posterior.cpu().numpy()
        entry = {"guess_flux_ratio_median": ratio, "guess_chi2_pixel_median": guess_chi2, "fit_wall_s": wall,
                 "at_iteration_limit": int((r.status == 1).sum()), "chi2_dof_median": float(np.median(chi)),
                 "chi2_dof_p90": float(np.quantile(chi, 0.9)), "iterations_median": float(r.n_iter.float().median())}
        result["starts"][label] = entry
        print(f"{label:16s} {ratio:16.2f} {guess_chi2:14.4g} {wall:7.1f} {entry['at_iteration_limit']:8d} "
              f"{entry['chi2_dof_median']:12.3f} {entry['chi2_dof_p90']:7.3f}")
    model.encoder_noise_rms = rms
    d = lp["noise-matched"] - lp["unmatched"]
    result["noise_matched_better"] = int((d > 0.5).sum())
    result["unmatched_better"] = int((d < -0.5).sum())
    result["log_posterior_gain_median"] = float(np.median(d))
    print(f"noise-matched start fits better on {result['noise_matched_better']}, worse on "
          f"{result['unmatched_better']} of {args.n} (median log posterior gain {np.median(d):.1f} nats)")
    finish(result, args.json)


if __name__ == "__main__":
    main()
