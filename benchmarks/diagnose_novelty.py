#!/usr/bin/env python
"""How new a VAE prior's galaxies are: their distance to the nearest training galaxy, beside a real new galaxy's.

    python benchmarks/diagnose_novelty.py --model pipelines/runs/sdss-vae-bd-gate-mix/model.pt \
        --data rich_5k.h5 --n 1000 --json novelty.json

A prior fitted to the training galaxies' codes can draw galaxies that are the training
galaxies again: the code mixture (:class:`galgen.models.CodeMixturePrior`) does so by
construction (each draw is a training galaxy's MAP code, perturbed within its posterior).
This script measures by how much, for each fitted prior of the model (``prior_choices``
but N(0, I)), against the same measure of held-out real galaxies:

1. in code space: each code's distance to the nearest of the mixture's centres (the
   training galaxies' MAP codes; ``--train-codes FILE`` for another set), every coordinate
   divided by the centres' standard deviation; for the priors' draws, and for the
   held-out galaxies' own MAP codes (:func:`galgen.inference.map_codes`, ``--map-steps``
   Adam steps under the model's flow prior): the distance of a new galaxy;
2. in image space: ``dchi2``, the squared difference of the noise-free observations of a
   code and of its nearest training code, summed over the stamp in units of the noise
   variance (both through held-out galaxy ``i``'s PSF, divided by its variance map): below
   about the number of pixels a galaxy cannot be told from the training galaxy at the
   survey's depth.

Figures: medians and quantiles per set, and the ratio of each prior's median distance to
the held-out galaxies'. ``--bandwidths b1 b2 ...`` measures the code mixture refitted at each
bandwidth too (centres and the encoder's widths kept), to find the one whose draws are as
new in the image as real galaxies are (``dchi2`` ratio 1), where its own ``"match"`` makes
them as new in code space.
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

QUANTILES = (10, 50, 90)


def nearest(codes: torch.Tensor, centres: torch.Tensor, scale: torch.Tensor, block: int = 1024):
    """Index of and standardised distance to each code's nearest centre.

    Parameters
    ----------
    codes, centres : torch.Tensor
        ``(n, D)`` and ``(N, D)``.
    scale : torch.Tensor
        ``(D,)``: every coordinate is divided by it.
    block : int, optional
        Codes compared at once.

    Returns
    -------
    index : torch.Tensor
        ``(n,)`` long.
    distance : torch.Tensor
        ``(n,)``.
    """
    idx, dist = [], []
    c = (centres / scale).double()
    for part in codes.split(block):
        d = torch.cdist((part / scale).double(), c)
        m = d.min(1)
        idx.append(m.indices)
        dist.append(m.values)
    return torch.cat(idx), torch.cat(dist)


def dchi2(model, loader, z: torch.Tensor, ref: torch.Tensor, batch_size: int = 250) -> np.ndarray:
    """Summed ``(m(z) - m(ref))^2 / var`` over each stamp, through the loader's galaxies' PSFs.

    Parameters
    ----------
    model : galgen.models.VAE
    loader : galgen.data.ObservationLoader
        ``len(z)`` galaxies: row ``i`` is observed like galaxy ``i``.
    z, ref : torch.Tensor
        ``(n, D)`` codes.
    batch_size : int, optional

    Returns
    -------
    numpy.ndarray
        ``(n,)``.
    """
    out = []
    with torch.no_grad():
        for batch in loader.iter_batches(batch_size):
            rows = batch.index
            a = batch.observation.noiseless(model.decoder(z[rows]).float())
            b = batch.observation.noiseless(model.decoder(ref[rows]).float())
            var = batch.observation.noise.variance(b)
            out.append((((a - b) ** 2) / var).sum((-1, -2)).double().cpu().numpy())
    return np.concatenate(out)


def _summary(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), **{f"q{q}": float(np.percentile(v, q)) for q in QUANTILES}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a VAE with a fitted code mixture (and flow)")
    ap.add_argument("--data", required=True, help="held-out cutout file")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--map-steps", type=int, default=300, help="Adam steps of each held-out MAP fit at most [300]")
    ap.add_argument("--train-codes", help="the training codes (tensor file; default: the mixture's centres)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidths", type=float, nargs="+", default=(),
                    help="also the code mixture refitted at each of these bandwidths (its centres and the "
                         "encoder's widths kept): which one makes draws as new as real galaxies in the image")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from galgen.data import ObservationLoader
    from galgen.errors import GalgenInputError
    from galgen.inference import map_codes
    from galgen.models import VAE
    from galgen.runtime import resolve_model

    model = resolve_model(args.model, "cpu").eval()
    if args.train_codes:
        centres = torch.load(args.train_codes, weights_only=True).float()
    elif isinstance(model, VAE) and bool(model.code_mixture.fitted):
        centres = model.code_mixture.centres.float()
    else:
        raise GalgenInputError(f"--model: {args.model} has no fitted code mixture; pass --train-codes")
    scale = centres.std(0)
    loader = ObservationLoader(args.data, np.arange(args.n), model.conditions, in_memory=True)
    t0 = time.perf_counter()
    held, _ = map_codes(model, loader.iter_batches(250), max_iter=args.map_steps)
    t_map = time.perf_counter() - t0
    sets = {"held-out MAP codes (new real galaxies)": held}
    for name, label in model.prior_choices.items():
        if name != "normal":
            sets[f"{label} draws"] = model.sample_latents(args.n, prior=name,
                                                          generator=torch.Generator().manual_seed(args.seed))
    if args.bandwidths:
        if not bool(model.code_mixture.fitted):
            raise GalgenInputError(f"--bandwidths: {args.model} has no fitted code mixture to refit")
        mix = model.code_mixture
        base = (mix.scales / mix.bandwidth).clone()  # the encoder's widths
        fitted_at = float(mix.bandwidth)
        for b in args.bandwidths:
            mix.fit(mix.centres.clone(), base, bandwidth=float(b))
            sets[f"code mixture draws, b = {b:g}"] = model.sample_latents(
                args.n, prior="mixture", generator=torch.Generator().manual_seed(args.seed))
        mix.fit(mix.centres.clone(), base, bandwidth=fitted_at)
    result = {"model": str(args.model), "data": str(args.data), "n": args.n, "centres": len(centres),
              "map_steps": args.map_steps, "map_s": t_map, "sets": {}}
    for label, z in sets.items():
        k, d = nearest(z.float(), centres, scale)
        chi = dchi2(model, loader, z.float(), centres[k])
        result["sets"][label] = {"distance": _summary(d.numpy()), "dchi2": _summary(chi)}
    ref = result["sets"]["held-out MAP codes (new real galaxies)"]
    result["pixels"] = int(model.config["stamp"]) ** 2
    print(f"{args.n} galaxies of {args.data}; {len(centres)} training codes; held-out MAP fits {t_map:.0f} s; "
          f"{result['pixels']} pixels a stamp")
    for label, r in result["sets"].items():
        d, c = r["distance"], r["dchi2"]
        r["distance_ratio"] = d["median"] / ref["distance"]["median"]
        r["dchi2_ratio"] = c["median"] / ref["dchi2"]["median"]
        print(f"{label:42s} distance to nearest training code q10/50/90 {d['q10']:.3f} {d['median']:.3f} "
              f"{d['q90']:.3f} (x{r['distance_ratio']:.2f});  dchi2 q10/50/90 {c['q10']:.0f} {c['median']:.0f} "
              f"{c['q90']:.0f} (x{r['dchi2_ratio']:.2f})")
    result["machine"] = machine_info()
    finish(result, args.json)
    return result


if __name__ == "__main__":
    main()
