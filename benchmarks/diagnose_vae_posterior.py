#!/usr/bin/env python
"""Where the posterior mass of the galaxies whose importance sampling fails lies.

    python benchmarks/diagnose_vae_posterior.py --data holdout_s5.h5 --n 64 --galaxies prior \
        --json diagnose_vae_posterior.json

The galaxies are those of ``bench_vae_posterior.py`` (the same ``--data``, ``--n``,
``--galaxies`` and ``--seed`` give the same galaxies and the same MAP fits). Their
posteriors are drawn as there (``sample_posterior``, the default proposal, no NUTS
fallback); for each galaxy that fails (Pareto k > 0.7 or ESS < ``--min-ess``) this reports

1. the modes that Levenberg-Marquardt finds from ``--starts`` starts (the best apart of
   ``--candidates`` draws of the amortised posterior, ``--refine`` steps each): their log
   posteriors, flux scales ``s`` and total fluxes, which tell separate modes from points
   along one ridge;
2. the heaviest of ``--probe`` draws of the amortised posterior and ``--probe`` draws of
   the Student-t about the polished MAP, weighted by the exact posterior over their
   equal mixture: their log posterior below the mode, ``s``, total flux, hlr, e1, e2,
   and their Mahalanobis distance from the mode under the Laplace covariance in three
   coordinate systems: ``(z, s)``, flux-normalised ``(z, s + log F(z))`` (``F`` the
   decoded image's flux) and the flow prior's base space ``(u, s)``, each the Laplace
   covariance carried over linearly at the mode. A draw many standard deviations out
   in all three is posterior mass that no t about the mode reaches.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_galaxies, finish, machine_info  # noqa: E402


def _mahalanobis(tril, dx):
    """``|L^-1 dx|`` for rows ``dx`` ``(n, k)`` under one Cholesky factor ``(k, k)``."""
    return torch.linalg.solve_triangular(tril, dx.T, upper=False).norm(dim=0)


def _log_flux(model, z):
    return model.decode(z.float()).float().sum((-2, -1)).log()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdss-vae")
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--galaxies", choices=("data", "prior"), default="prior")
    ap.add_argument("--min-ess", type=float, default=200.0)
    ap.add_argument("--max-draws", type=int, default=16384)
    ap.add_argument("--starts", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=1024)
    ap.add_argument("--refine", type=int, default=100)
    ap.add_argument("--probe", type=int, default=2048, help="draws of each of the two proposals [2048]")
    ap.add_argument("--top", type=int, default=8, help="heaviest draws reported per galaxy [8]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from galgen.inference import derived_quantities, fit_map, posterior_log_prob, sample_posterior
    from galgen.inference.amortized import amortized_proposal, attached_amortized_posterior, multimodal_laplace
    from galgen.inference.importance import _student_t, _student_t_log_prob, laplace_approximation
    from galgen.runtime import resolve_model

    model = resolve_model(args.model, "cpu").eval()
    q = attached_amortized_posterior(model)
    if q is None:
        raise SystemExit(f"--model {args.model}: has no amortised posterior to probe the posterior with")
    gen = torch.Generator().manual_seed(args.seed)  # the galaxies and fits of bench_vae_posterior.py
    obs, observed, _ = benchmark_galaxies(model, args.data, list(range(args.n)), args.galaxies, gen)
    res = fit_map(model, observed, obs, generator=gen)
    t0 = time.perf_counter()
    h = sample_posterior(model, observed, obs, res, samples=100, chains=2, generator=torch.Generator().manual_seed(
        args.seed + 1), method="is", draws=1024, fallback=None, min_ess=args.min_ess, max_draws=args.max_draws)
    fail = torch.nonzero(~((h.pareto_k <= 0.7) & (h.is_ess >= args.min_ess))).flatten()
    out = {"model": args.model, "data": str(args.data), "n": args.n, "galaxies": args.galaxies,
           "posterior_wall_s": time.perf_counter() - t0, "failing": fail.tolist(),
           "pareto_k": h.pareto_k[fail].tolist(), "is_ess": h.is_ess[fail].tolist(), "per_galaxy": []}
    print(f"{len(fail)} of {args.n} fail: k {np.round(h.pareto_k[fail].numpy(), 2).tolist()}, "
          f"ESS {np.round(h.is_ess[fail].numpy()).tolist()}", flush=True)
    if not len(fail):
        out["machine"] = machine_info()
        return finish(out, args.json)
    B, d = len(fail), res.z.shape[1]
    obs_f, x_f = obs.select(fail), observed[fail]
    mean, tril = laplace_approximation(model, x_f, obs_f, res.select(fail))
    mean, tril = mean.double(), tril.double()
    prop = amortized_proposal(q, model, x_f, obs_f)
    g = torch.Generator().manual_seed(args.seed + 2)
    every = torch.arange(B)
    # 1. modes from many starts
    means, _, _ = multimodal_laplace(model, x_f, obs_f, mean, tril, prop, starts=args.starts,
                                     candidates=args.candidates, refine=args.refine, generator=g)
    K = means.shape[1]
    with torch.no_grad():
        lp_modes = posterior_log_prob(model, obs_f, x_f, chains=K)(means.reshape(-1, d + 1).float()).double().view(B, K)
        logf_modes = _log_flux(model, means[..., :d].reshape(-1, d)).double().view(B, K)
    # 2. the heaviest draws of an equal mixture of the amortised posterior and the Laplace t
    n = args.probe
    xq, _ = prop.draw(every, n, g)
    xs = torch.cat([xq.double(), _student_t(mean, tril, n, 7, g)[0]], 1)
    log_mix = torch.logaddexp(prop.log_prob(every, xs), _student_t_log_prob(xs, mean, tril, 7)) - math.log(2.0)
    lp_of = posterior_log_prob(model, obs_f, x_f, chains=2 * n)
    flat = xs.reshape(-1, d + 1).float()
    with torch.no_grad():
        lp = torch.cat([lp_of(flat[a:a + 64], torch.arange(a, min(a + 64, len(flat))))
                        for a in range(0, len(flat), 64)]).double().view(B, 2 * n)
        lp_mode = posterior_log_prob(model, obs_f, x_f)(mean.float()).double()
    lw = lp - log_mix
    # the Laplace covariance carried to flux-normalised and flow-base coordinates at the mode
    prior = model.prior()
    zm = mean[:, :d].float().clone().requires_grad_(True)
    with torch.enable_grad():
        logf0 = _log_flux(model, zm)
        grad_f, = torch.autograd.grad(logf0.sum(), zm)
        u0 = prior.transform(zm)
        jac_u = torch.stack([torch.autograd.grad(u0[:, j].sum(), zm, retain_graph=j < d - 1)[0] for j in range(d)], 1)
    a_f = torch.eye(d + 1, dtype=torch.float64).repeat(B, 1, 1)
    a_f[:, d, :d] = grad_f.double()
    a_u = torch.eye(d + 1, dtype=torch.float64).repeat(B, 1, 1)
    a_u[:, :d, :d] = jac_u.double()
    cov = tril @ tril.transpose(1, 2)
    tril_f = torch.linalg.cholesky(a_f @ cov @ a_f.transpose(1, 2))
    tril_u = torch.linalg.cholesky(a_u @ cov @ a_u.transpose(1, 2))
    for b in range(B):
        w = torch.softmax(lw[b], 0)
        top = torch.argsort(-lw[b])[:args.top]
        xt = xs[b, top]
        with torch.no_grad():
            intr = model.decode(xt[:, :d].float())
            der = derived_quantities(intr, obs.intrinsic_scale).double()
            logf = intr.float().sum((-2, -1)).log().double()
            u = prior.transform(xt[:, :d].float()).double()
        dx_f = xt - mean[b]
        dx_f[:, d] += logf - logf0[b].detach().double()
        dx_u = torch.cat([u - u0[b].detach().double(), (xt[:, d] - mean[b, d])[:, None]], 1)
        g_out = {
            "galaxy": int(fail[b]),
            "modes_log_posterior_below_best": (lp_modes[b].max() - lp_modes[b]).tolist(),
            "modes_s": means[b, :, d].tolist(),
            "modes_log_total_flux": (means[b, :, d] + logf_modes[b]).tolist(),
            "probe_ess": float(1.0 / (w * w).sum()),
            "heavy_from_amortized": (top < n).tolist(),
            "heavy_weight": w[top].tolist(),
            "heavy_log_posterior_below_mode": (lp_mode[b] - lp[b, top]).tolist(),
            "heavy_s": xt[:, d].tolist(), "mode_s": float(mean[b, d]),
            "heavy_log_total_flux": (xt[:, d] + logf).tolist(),
            "mode_log_total_flux": float(mean[b, d] + logf0[b]),
            "heavy_hlr_e1_e2": der[:, 1:].tolist(),
            "mahalanobis_z_s": _mahalanobis(tril[b], xt - mean[b]).tolist(),
            "mahalanobis_flux_normalised": _mahalanobis(tril_f[b], dx_f).tolist(),
            "mahalanobis_flow_base": _mahalanobis(tril_u[b], dx_u).tolist(),
        }
        out["per_galaxy"].append(g_out)
        spread = lp_modes[b].max() - lp_modes[b]
        print(f"galaxy {g_out['galaxy']}: {K} modes within {float(spread.max()):.2f} nats, s "
              f"{float(means[b, :, d].min()):+.2f}..{float(means[b, :, d].max()):+.2f}, log total flux "
              f"{min(g_out['modes_log_total_flux']):.3f}..{max(g_out['modes_log_total_flux']):.3f}; heaviest draws "
              f"{np.round(g_out['heavy_log_posterior_below_mode'], 1).tolist()} nats below the mode, s "
              f"{np.round(g_out['heavy_s'], 2).tolist()} (mode {g_out['mode_s']:+.2f}), Mahalanobis (z, s) "
              f"{np.round(g_out['mahalanobis_z_s'], 0).tolist()}, flux-normalised "
              f"{np.round(g_out['mahalanobis_flux_normalised'], 0).tolist()}, flow base "
              f"{np.round(g_out['mahalanobis_flow_base'], 0).tolist()}", flush=True)
    out["machine"] = machine_info()
    finish(out, args.json)


if __name__ == "__main__":
    main()
