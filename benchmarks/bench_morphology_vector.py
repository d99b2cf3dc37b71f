#!/usr/bin/env python
"""Benchmark: the differentiable morphology statistics a GAN critic sees, against the evaluation's.

    python benchmarks/bench_morphology_vector.py --data rich_5k.h5 [--n 512] [--threads 2] [--json out.json]

On the first N noisy stamps of a cutout file: the time of
:func:`galgen.models.networks.morphology_vector` per 64 stamps (forward, and forward +
backward, what a training step pays) beside
:func:`galgen.evaluation.morphology_statistics` (the statmorph-equivalent statistics the
evaluation's two-sample tests use: asymmetry centre, Petrosian apertures, 7 x 7
sub-pixels; with the file's variance maps) and the Spearman correlation of each of the
surrogate's columns with the evaluation's statistic; and the flood fill under the Gini
segmentation (:func:`galgen.models.networks.connected_region`, separable boolean dilations)
beside the same fill by 3 x 3 max-pooling, on the same regions (asserted equal).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import finish, machine_info

PAIRS = {"gini": "gini", "m20": "m20", "concentration": "concentration", "log_r50": "r50", "log_flux": "flux",
         "e1": "e1", "e2": "e2", "log_size": "sigma", "asymmetry": "asymmetry"}


def _maxpool_fill(seed: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The same 8-connected region, each step a 3 x 3 max-pool (the implementation replaced)."""
    region = seed & allowed
    for _ in range(seed.shape[-2] * seed.shape[-1]):
        grown = (torch.nn.functional.max_pool2d(region[:, None].float(), 3, 1, 1)[:, 0] > 0) & allowed
        if torch.equal(grown, region):
            break
        region = grown
    return region


def _best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="cutout file (observed, variance)")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import h5py
    from scipy.stats import spearmanr

    from galgen.evaluation import morphology_statistics
    from galgen.models.networks import MORPHOLOGY_VECTOR, connected_region, morphology_vector

    with h5py.File(args.data, "r") as f:
        observed = np.asarray(f["observed"][:args.n], dtype="f8")
        variance = np.asarray(f["variance"][:args.n], dtype="f8")
    x64 = torch.from_numpy(observed[:64]).float()

    def forward_backward():
        x = x64.clone().requires_grad_(True)
        morphology_vector(x).nan_to_num(0.0).sum().backward()

    t_fwd = _best_of(lambda: morphology_vector(x64), args.repeat)
    t_fb = _best_of(forward_backward, args.repeat)
    t_ref = _best_of(lambda: morphology_statistics(observed[:64], 0.396, variance=variance[:64]), args.repeat)
    ref = morphology_statistics(observed, 0.396, variance=variance)
    got = morphology_vector(torch.from_numpy(observed)).numpy()
    ok = np.asarray(ref["ok"], bool)
    rho = {}
    for j, col in enumerate(MORPHOLOGY_VECTOR):
        a, b = got[ok, j], np.asarray(ref[PAIRS[col]])[ok]
        m = np.isfinite(a) & np.isfinite(b)
        rho[col] = float(spearmanr(a[m], b[m])[0])
    # flood fill: a random threshold map of each stamp's light, grown from its brightest pixel
    img = x64
    allowed = img > img.flatten(1).median(1).values[:, None, None]
    seed = torch.zeros_like(allowed)
    seed.view(len(img), -1)[torch.arange(len(img)), img.flatten(1).argmax(1)] = True
    assert torch.equal(connected_region(seed, allowed), _maxpool_fill(seed, allowed))
    t_fill = _best_of(lambda: connected_region(seed, allowed), args.repeat)
    t_pool = _best_of(lambda: _maxpool_fill(seed, allowed), args.repeat)
    result = {"data": str(args.data), "n": args.n, "threads": args.threads, "ok": int(ok.sum()),
              "morphology_vector_s_per_64": t_fwd, "morphology_vector_fwd_bwd_s_per_64": t_fb,
              "evaluation_statistics_s_per_64": t_ref, "speedup_vs_evaluation": t_ref / t_fwd,
              "spearman": rho, "connected_region_s_per_64": t_fill, "maxpool_fill_s_per_64": t_pool,
              "fill_speedup": t_pool / t_fill, "machine": machine_info()}
    print(f"{args.n} stamps of {args.data} ({int(ok.sum())} measured by the evaluation), {args.threads} threads")
    print(f"morphology_vector: {t_fwd * 1e3:.0f} ms per 64 stamps ({t_fb * 1e3:.0f} ms with the backward pass); "
          f"the evaluation's statistics: {t_ref * 1e3:.0f} ms ({t_ref / t_fwd:.1f}x)")
    print("Spearman with the evaluation's: " + ", ".join(f"{k} {v:.3f}" for k, v in rho.items()))
    print(f"flood fill of 64 stamps: {t_fill * 1e3:.1f} ms (boolean shifts) vs {t_pool * 1e3:.1f} ms (max-pool), "
          f"{t_pool / t_fill:.1f}x")
    finish(result, args.json)
    return result


if __name__ == "__main__":
    main()
