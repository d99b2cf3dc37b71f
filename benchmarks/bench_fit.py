#!/usr/bin/env python
"""Benchmark: Sersic fits of many galaxies, galgen (batched, torch) vs AstroPhot and GalSim + scipy.

The same ``--n`` GalSim Sersic galaxies (n in [0.7, 4], hlr in [0.6", 2.5"], |g| < 0.4,
sub-pixel offsets), observed through per-galaxy Moffat PSFs at the SDSS pixel scale with
Gaussian noise (peak S/N ~ 30-100), are fitted by

* **galgen**: :class:`galgen.models.parametric.SersicModel` through the physics layer,
  all galaxies in one batch, MAP by :func:`galgen.inference.fit_map` (default: its
  Levenberg-Marquardt; ``--compare-adam`` also times Adam); then, with ``--posterior
  is,nuts,...``, :func:`galgen.inference.sample_posterior` from the MAP, reported as
  effective draws per second (importance sampling: the PSIS-smoothed weights' ESS; MCMC:
  the smallest bulk ESS over a galaxy's parameters);
* **AstroPhot** (``astrophot_peer.py``, where ``astrophot`` is installed): its
  Levenberg-Marquardt one galaxy after another, and its batched LM;
* **GalSim + scipy**: what a GalSim user writes: ``scipy.optimize.least_squares``
  (trust-region reflective, 2-point Jacobian) over flux, hlr, n, g1, g2, dx, dy, with the
  model drawn by ``galsim.Convolve(Sersic(...).shear(...).shift(...), Moffat).drawImage``
  at the detector scale, one galaxy after another, for up to ``--budget`` seconds.

Every rate (galaxies per second) is printed with its ratio to galgen's and its accuracy
(median |hlr/true - 1|, |n - true|, |g - true| and the median chi2/dof), so that speed is
not bought with wrong answers.

With ``--vae`` (64x64 stamps) the same galaxies are also MAP-fitted with the pretrained
``sdss-vae`` (a 16-d latent through the same physics layer) with the defaults of before
and after this release, and with Levenberg-Marquardt.

    python benchmarks/bench_fit.py [--n 256] [--stamp 48] [--threads 2] [--device cpu|cuda]
                                   [--compare-adam] [--posterior is,nuts] [--astrophot LM,BatchLM]
                                   [--vae] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import finish, machine_info

SCALE, BETA = 0.396, 3.5


def _draw(args):
    """Noise-free GalSim images of some galaxies (a worker's share of make_galaxies)."""
    import galsim

    t, rows, stamp = args
    out = np.empty((len(rows), stamp, stamp), np.float32)
    for j, i in enumerate(rows):
        gal = (galsim.Sersic(t["n"][i], half_light_radius=t["hlr"][i], flux=t["flux"][i])
               .shear(g1=t["g1"][i], g2=t["g2"][i]).shift(t["dx"][i] * SCALE, t["dy"][i] * SCALE))
        out[j] = galsim.Convolve(gal, galsim.Moffat(beta=BETA, fwhm=t["fwhm"][i])).drawImage(
            nx=stamp, ny=stamp, scale=SCALE, use_true_center=False).array
    return out


def make_galaxies(n, stamp, seed=0, workers=1):
    """Truth parameters, PSF FWHMs and noisy GalSim observations (the same for any ``workers``)."""
    rng = np.random.default_rng(seed)
    t = {"n": rng.uniform(0.7, 4.0, n), "hlr": rng.uniform(0.6, 2.5, n), "flux": 10 ** rng.uniform(4.0, 4.7, n),
         "dx": rng.uniform(-0.5, 0.5, n), "dy": rng.uniform(-0.5, 0.5, n), "fwhm": rng.uniform(1.0, 1.8, n)}
    g = rng.uniform(0, 0.4, n)
    phi = rng.uniform(0, np.pi, n)
    t["g1"], t["g2"] = g * np.cos(2 * phi), g * np.sin(2 * phi)
    sigma = 8.0
    noise = rng.normal(0, sigma, (n, stamp, stamp))  # galaxy after galaxy, as drawn one by one before
    chunks = [(t, rows, stamp) for rows in np.array_split(np.arange(n), max(1, min(int(workers), n)))]
    if len(chunks) == 1:
        images = [_draw(chunks[0])]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(chunks)) as pool:
            images = list(pool.map(_draw, chunks))
    data = (np.concatenate(images) + noise).astype(np.float32)
    return t, data, sigma


def accuracy(t, hlr, n, g1, g2, red_chi2):
    k = len(hlr)
    return {"hlr_rel_err_median": float(np.median(np.abs(hlr / t["hlr"][:k] - 1))),
            "n_abs_err_median": float(np.median(np.abs(n - t["n"][:k]))),
            "g_abs_err_median": float(np.median(np.hypot(g1 - t["g1"][:k], g2 - t["g2"][:k]))),
            "chi2_dof_median": float(np.median(red_chi2))}


def observation(fwhm, stamp, sigma, device):
    """Per-galaxy Moffat PSFs and uniform Gaussian noise, as a galgen Observation."""
    from galgen.physics import GaussianNoise, Observation, moffat_psf

    psf = moffat_psf(torch.tensor(fwhm), BETA, 33, SCALE).float()
    noise = GaussianNoise(torch.full((len(fwhm), stamp, stamp), sigma**2))
    return Observation(psf, pixel_scale=SCALE, stamp=stamp, noise=noise).to(device)


def bench_galgen(t, data, sigma, device, max_iter, posteriors, samples, chains, optimizer="auto", metric="diag"):
    from galgen.inference import fit_map, sample_posterior, summarize_chains
    from galgen.models.parametric import SersicModel

    n, stamp = data.shape[0], data.shape[1]
    obs = observation(t["fwhm"], stamp, sigma, device)
    x = torch.from_numpy(data).to(device)
    model = SersicModel("sersic", stamp=stamp, pixel_scale=SCALE).to(device)
    fit_map(model, x[:8], observation(t["fwhm"][:8], stamp, sigma, device), max_iter=5, optimizer=optimizer)
    _sync(device)
    t0 = time.perf_counter()
    kw = {"lr": 0.05, "tol": 1e-6, "patience": 20} if optimizer == "adam" else {}
    res = fit_map(model, x, obs, max_iter=max_iter, optimizer=optimizer, **kw)
    _sync(device)
    wall = time.perf_counter() - t0
    print(f"galgen MAP ({optimizer}): {n} galaxies in {wall:.2f} s ({n / wall:.1f} galaxies/s)", flush=True)
    p = {k: v.cpu().numpy() for k, v in model.physical(res.z).items()}
    out = {"optimizer": optimizer, "galaxies_per_s": n / wall, "wall_s": wall, "iterations_max": int(res.n_iter.max()),
           "iterations_median": float(res.n_iter.float().median()), "log_posterior": res.log_posterior.tolist(),
           **accuracy(t, p["hlr"], p["n"], p["g1"], p["g2"], res.reduced_chi2.cpu().numpy())}
    for method in posteriors:  # galgen fit's posterior step about the MAP
        gen = torch.Generator(device=device).manual_seed(0)
        t0 = time.perf_counter()
        h = sample_posterior(model, x, obs, res, samples=samples, chains=chains, warmup=samples, n_leapfrog=16,
                             generator=gen, method=method, metric=metric)
        _sync(device)
        hwall = time.perf_counter() - t0
        print(f"galgen posterior [{method}]: {hwall:.1f} s", flush=True)
        if method in ("is", "laplace"):
            ess = h.is_ess.numpy().astype(float)  # importance sampling: the weights' effective sample size
            ess[h.method.numpy() == 1] = np.nan  # redrawn by NUTS: counted below
            extra = {"pareto_k_median": float(np.nanmedian(h.pareto_k.numpy())),
                     "frac_pareto_k_ok": float(np.mean(h.pareto_k.numpy() <= 0.7)),
                     "frac_nuts_fallback": float(np.mean(h.method.numpy() == 1))}
            diag = summarize_chains(h.samples.cpu().numpy())
            ess = np.where(np.isnan(ess), diag["ess_bulk"].min(1), ess)
        else:
            diag = summarize_chains(h.samples.cpu().numpy())
            ess = diag["ess_bulk"].min(1)
            extra = {"rhat_max_median": float(np.median(diag["rhat"].max(1))),
                     "accept": float(np.nanmean(h.accept_rate.numpy()))}
        out[f"posterior_{method}"] = {"wall_s": hwall, "samples": samples, "chains": chains,
                                      "min_ess_median": float(np.median(ess)),
                                      "ess_per_s": float(ess.sum() / hwall),
                                      "ess_per_s_per_galaxy": float(np.median(ess) / hwall), **extra}
    return out


def bench_vae(data, sigma, t, device, name="sdss-vae"):
    """MAP fits of the same galaxies with a pretrained deep prior (64x64 stamps): the defaults of
    ``galgen fit`` before this release (Adam over the whole batch until its slowest galaxy
    stops, one random restart) against today's (Adam on the galaxies still moving, no restart,
    batches of 64 on a CPU) and Levenberg-Marquardt."""
    import galgen
    from galgen.inference import fit_map

    n, stamp = data.shape[0], data.shape[1]
    model = galgen.load_pretrained(name, device=device)
    x = torch.from_numpy(data).to(device)
    fit_map(model, x[:8], observation(t["fwhm"][:8], stamp, sigma, device), max_iter=5)  # warm-up
    out = {"model": name, "latent_dim": int(model.config["latent_dim"])}
    for label, kw, batch in (("default", {}, 64), ("lm", {"optimizer": "lm"}, 64),
                             ("adam_restart1_batch256", {"optimizer": "adam", "restarts": 1}, 256)):
        _sync(device)
        t0 = time.perf_counter()
        red, lp = [], []
        for a in range(0, n, batch):
            sl = slice(a, a + batch)
            res = fit_map(model, x[sl], observation(t["fwhm"][sl], stamp, sigma, device), **kw)
            red.append(res.reduced_chi2.cpu().numpy())
            lp.append(res.log_posterior.cpu().numpy())
        _sync(device)
        wall = time.perf_counter() - t0
        red = np.concatenate(red)
        out[label] = {"galaxies_per_s": n / wall, "wall_s": wall, "chi2_dof_median": float(np.median(red)),
                      "frac_chi2_dof_lt_1.1": float(np.mean(red < 1.1)), "log_posterior": np.concatenate(lp).tolist()}
    return out


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_galsim_scipy(t, data, sigma, budget):
    import galsim
    from scipy.optimize import least_squares

    stamp = data.shape[1]
    fits, t0 = [], time.perf_counter()
    for i in range(len(data)):
        psf = galsim.Moffat(beta=BETA, fwhm=t["fwhm"][i])
        y = data[i].astype(np.float64)

        def resid(p, psf=psf, y=y):
            flux, hlr, n, g1, g2, dx, dy = p
            gal = (galsim.Sersic(n, half_light_radius=hlr, flux=flux).shear(g1=g1, g2=g2)
                   .shift(dx * SCALE, dy * SCALE))
            m = galsim.Convolve(gal, psf).drawImage(nx=stamp, ny=stamp, scale=SCALE, use_true_center=False).array
            return ((y - m) / sigma).ravel()

        p0 = [max(y.sum(), 1.0), 1.2, 1.5, 0.0, 0.0, 0.0, 0.0]
        lo, hi = [1.0, 0.1, 0.5, -0.7, -0.7, -2, -2], [1e7, 10.0, 6.0, 0.7, 0.7, 2, 2]
        try:
            r = least_squares(resid, p0, bounds=(lo, hi), x_scale=[p0[0], 0.3, 0.5, 0.1, 0.1, 0.3, 0.3],
                              diff_step=1e-3)  # GalSim's FFT drawing is accurate to ~1e-3: default steps see noise
            fits.append((*r.x, 2 * r.cost / (y.size - 7)))
        except (galsim.GalSimError, RuntimeError, ValueError):
            fits.append((np.nan,) * 8)
        if time.perf_counter() - t0 > budget:
            break
    wall = time.perf_counter() - t0
    f = np.array(fits)
    return {"galaxies_per_s": len(f) / wall, "galaxies_timed": len(f), "wall_s": wall,
            **accuracy(t, f[:, 1], f[:, 2], f[:, 3], f[:, 4], f[:, 7])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="galaxies [256]")
    ap.add_argument("--stamp", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads [2]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-iter", type=int, default=None, help="galgen MAP iterations at most [the optimizer's]")
    ap.add_argument("--optimizer", choices=("auto", "lm", "adam", "lbfgs"), default="auto",
                    help="galgen MAP optimizer [auto: lm for Sersic]")
    ap.add_argument("--compare-adam", action="store_true", help="also time galgen's Adam on the same galaxies")
    ap.add_argument("--posterior", default="", help="comma-separated posterior methods to time: is,laplace,nuts,hmc")
    ap.add_argument("--samples", type=int, default=200, help="posterior draws (and MCMC warm-up) per chain [200]")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--astrophot", default="LM,BatchLM",
                    help="AstroPhot fitters to time where astrophot is installed ('' for none) [LM,BatchLM]")
    ap.add_argument("--metric", choices=("diag", "dense"), default="diag", help="HMC/NUTS mass matrix [diag]")
    ap.add_argument("--vae", action="store_true",
                    help="also time MAP fits with the pretrained sdss-vae (needs --stamp 64)")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for the GalSim + scipy loop [120]")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes drawing the GalSim galaxies (the same galaxies for any number) [1]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    t, data, sigma = make_galaxies(args.n, args.stamp, workers=args.workers)
    print(f"{args.n} GalSim galaxies drawn in {time.perf_counter() - t0:.1f} s ({args.workers} workers)", flush=True)
    posteriors = [m for m in args.posterior.split(",") if m]
    g = bench_galgen(t, data, sigma, args.device, args.max_iter, posteriors, args.samples, args.chains,
                     args.optimizer, args.metric)
    rows = [(f"galgen MAP ({g['optimizer']}, batched)", g)]
    result = {"machine": machine_info(), "device": args.device, "torch_threads": args.threads, "n": args.n,
              "stamp": args.stamp, "galgen": g}
    if args.compare_adam:
        result["galgen_adam"] = bench_galgen(t, data, sigma, args.device, None, [], 0, 0, "adam", args.metric)
        rows.append(("galgen MAP (adam, batched)", result["galgen_adam"]))
    for method in [m for m in args.astrophot.split(",") if m]:
        try:
            from astrophot_peer import bench_astrophot
        except ImportError as e:
            print(f"AstroPhot not available ({e}); pip install astrophot to compare")
            break
        r = bench_astrophot(t, data, sigma, SCALE, BETA, budget=args.budget, method=method)
        result[f"astrophot_{method}"] = r
        if "galaxies_per_s" in r:
            rows.append((f"AstroPhot {method}", r))
    s = bench_galsim_scipy(t, data, sigma, args.budget)
    result["galsim_scipy"] = s
    rows.append(("GalSim + scipy least_squares", s))
    v = bench_vae(data, sigma, t, args.device) if args.vae else None
    result["vae"] = v
    result["ratio"] = g["galaxies_per_s"] / s["galaxies_per_s"]
    keys = ("hlr_rel_err_median", "n_abs_err_median", "g_abs_err_median", "chi2_dof_median")
    for name, r in rows:
        print(f"{name:32s} {r['galaxies_per_s']:9.2f} galaxies/s  ({g['galaxies_per_s'] / r['galaxies_per_s']:6.1f}x "
              f"slower than galgen)  " + "  ".join(f"{k}={r[k]:.3g}" for k in keys))
    if v:
        for label in ("default", "lm", "adam_restart1_batch256"):
            r = v[label]
            print(f"galgen MAP with {v['model']} [{label}]: {r['galaxies_per_s']:.2f} galaxies/s, median chi2/dof "
                  f"{r['chi2_dof_median']:.3f}, fraction < 1.1: {r['frac_chi2_dof_lt_1.1']:.2f}")
    for method in posteriors:
        r = g[f"posterior_{method}"]
        print(f"galgen posterior [{method}]: {r['wall_s']:.1f} s, median min-ESS {r['min_ess_median']:.0f}, "
              f"{r['ess_per_s_per_galaxy']:.2f} effective draws/s per galaxy ({r['ess_per_s']:.1f}/s summed), "
              + ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k not in ("wall_s", "samples", "chains",
                                                                          "min_ess_median", "ess_per_s",
                                                                          "ess_per_s_per_galaxy")))
    return finish(result, args.json)


if __name__ == "__main__":
    main()
