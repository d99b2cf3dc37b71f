"""How far is a deep model's posterior from its Laplace approximation? (SBC galaxies)

    python pipelines/vae_posterior_geometry.py --model sdss-vae-v1 --data sdss_holdout_10k.h5 --n 16

Draws ``--n`` latent codes from the model's prior, observes them through the PSFs and
noise of the first ``--n`` galaxies of ``--data``, fits the MAP and the Laplace
approximation of :func:`galgen.inference.sample_posterior` (polished by Levenberg-
Marquardt), and prints per galaxy: the log posterior of the mode minus the truth's
(about d/2 on average for a unimodal, near-Gaussian posterior), the truth's squared
Mahalanobis distance under the Laplace covariance (about d + 1), and the log posterior
and log prior along the straight line from the mode to the truth (11 points): a valley
in between means a second mode.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdss-vae-v1")
    ap.add_argument("--prior", choices=["flow", "normal"], default=None)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from galgen.data.loading import observation_from_cutouts
    from galgen.inference.fit import posterior_log_prob
    from galgen.inference.importance import laplace_approximation
    from galgen.inference.map import fit_map
    from galgen.models.base import sample_latents
    from galgen.runtime import resolve_model

    model = resolve_model(args.model, torch.device("cpu"), prior=args.prior).eval()
    n = args.n
    obs = observation_from_cutouts(args.data, list(range(n)))
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        z_true = sample_latents(model.prior(), n, generator=gen).float()
        _, observed = obs.observe(model.decode(z_true), generator=gen)
    res = fit_map(model, observed, obs, generator=gen)
    mean, tril = laplace_approximation(model, observed, obs, res)
    x_true = torch.cat([z_true, torch.zeros(n, 1)], 1).double()
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    lp = posterior_log_prob(model, obs, observed, chains=11)
    with torch.no_grad():
        xs = mean[:, None, :] + ts[None, :, None] * (x_true - mean)[:, None, :]
        post = lp(xs.reshape(-1, xs.shape[-1]).float()).view(n, 11).double()
        prior = model.prior().log_prob(xs[..., :-1].reshape(-1, xs.shape[-1] - 1).float()).view(n, 11).double()
        w = torch.linalg.solve_triangular(tril, (x_true - mean)[..., None], upper=False)[..., 0]
    maha = (w * w).sum(1)
    print(f"d + 1 = {x_true.shape[1]}; per galaxy: lp(mode) - lp(truth), truth Mahalanobis^2, "
          "then lp and log prior along the line mode -> truth (relative to the mode)")
    for i in range(n):
        print(f"{i:3d} {float(post[i, 0] - post[i, -1]):7.1f} {float(maha[i]):10.0f}  "
              f"post {np.round((post[i] - post[i, 0]).numpy()).astype(int)}  "
              f"prior {np.round((prior[i] - prior[i, 0]).numpy()).astype(int)}")


if __name__ == "__main__":
    main()
