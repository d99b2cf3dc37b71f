#!/usr/bin/env python
"""Benchmark: Sersic fits of many galaxies, galgen (batched, torch) vs GalSim + scipy (one by one).

The same ``--n`` GalSim Sersic galaxies (n in [0.7, 4], hlr in [0.6", 2.5"], |g| < 0.4,
sub-pixel offsets), observed through per-galaxy Moffat PSFs at the SDSS pixel scale with
Gaussian noise (peak S/N ~ 30-100), are fitted by

* **galgen**: :class:`galgen.models.parametric.SersicModel` through the physics layer,
  all galaxies in one batch, MAP by :func:`galgen.inference.fit_map` (Adam); then, with
  ``--hmc``, batched HMC or NUTS (``--sampler``, :func:`galgen.inference.hmc_sample`)
  from the MAP, reported as
  effective samples per second (the smallest bulk ESS over a galaxy's parameters, summed
  over galaxies, over the sampler's wall time);
* **GalSim + scipy**: what a GalSim user writes: ``scipy.optimize.least_squares``
  (trust-region reflective, 2-point Jacobian) over flux, hlr, n, g1, g2, dx, dy, with the
  model drawn by ``galsim.Convolve(Sersic(...).shear(...).shift(...), Moffat).drawImage``
  at the detector scale, one galaxy after another, for up to ``--budget`` seconds.

Both rates (galaxies per second) and their ratio are printed with the accuracy of each
(median |hlr/true - 1|, |n - true|, |g - true| and the median chi2/dof), so that speed is
not bought with wrong answers.

With ``--vae`` (64x64 stamps) the same galaxies are also MAP-fitted with the pretrained
``sdss-vae`` (a 16-d latent through the same physics layer), timed and scored by chi2/dof.

    python benchmarks/bench_fit.py [--n 256] [--stamp 48] [--threads 2] [--device cpu|cuda] [--hmc]
                                   [--sampler hmc|nuts] [--metric diag|dense] [--vae] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import finish, machine_info

SCALE, BETA = 0.396, 3.5


def make_galaxies(n, stamp, seed=0):
    """Truth parameters, PSF FWHMs and noisy GalSim observations."""
    import galsim

    rng = np.random.default_rng(seed)
    t = {"n": rng.uniform(0.7, 4.0, n), "hlr": rng.uniform(0.6, 2.5, n), "flux": 10 ** rng.uniform(4.0, 4.7, n),
         "dx": rng.uniform(-0.5, 0.5, n), "dy": rng.uniform(-0.5, 0.5, n), "fwhm": rng.uniform(1.0, 1.8, n)}
    g = rng.uniform(0, 0.4, n)
    phi = rng.uniform(0, np.pi, n)
    t["g1"], t["g2"] = g * np.cos(2 * phi), g * np.sin(2 * phi)
    sigma = 8.0
    data = np.empty((n, stamp, stamp), np.float32)
    for i in range(n):
        gal = (galsim.Sersic(t["n"][i], half_light_radius=t["hlr"][i], flux=t["flux"][i])
               .shear(g1=t["g1"][i], g2=t["g2"][i]).shift(t["dx"][i] * SCALE, t["dy"][i] * SCALE))
        img = galsim.Convolve(gal, galsim.Moffat(beta=BETA, fwhm=t["fwhm"][i])).drawImage(
            nx=stamp, ny=stamp, scale=SCALE, use_true_center=False).array
        data[i] = img + rng.normal(0, sigma, img.shape)
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


def bench_galgen(t, data, sigma, device, max_iter, hmc, samples, chains, optimizer="adam", sampler="hmc",
                 metric="diag"):
    from galgen.inference import fit_map, sample_posterior, summarize_chains
    from galgen.models.parametric import SersicModel

    n, stamp = data.shape[0], data.shape[1]
    obs = observation(t["fwhm"], stamp, sigma, device)
    x = torch.from_numpy(data).to(device)
    model = SersicModel("sersic", stamp=stamp, pixel_scale=SCALE)
    fit_map(model, x[:8], observation(t["fwhm"][:8], stamp, sigma, device), max_iter=5)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    res = fit_map(model, x, obs, max_iter=max_iter, optimizer=optimizer, **({"lr": 0.05, "tol": 1e-6, "patience": 20}
                                                                           if optimizer == "adam" else {}))
    _sync(device)
    wall = time.perf_counter() - t0
    p = {k: v.cpu().numpy() for k, v in model.physical(res.z).items()}
    out = {"optimizer": optimizer, "galaxies_per_s": n / wall, "wall_s": wall, "iterations_max": int(res.n_iter.max()),
           **accuracy(t, p["hlr"], p["n"], p["g1"], p["g2"], res.reduced_chi2.cpu().numpy())}
    if hmc:
        gen = torch.Generator(device=device).manual_seed(0)
        t0 = time.perf_counter()  # galgen fit's posterior step: HMC about the MAP
        h = sample_posterior(model, x, obs, res, samples=samples, chains=chains, warmup=samples, n_leapfrog=16,
                             generator=gen, sampler=sampler, metric=metric)
        _sync(device)
        hwall = time.perf_counter() - t0
        diag = summarize_chains(h.samples.cpu().numpy())
        ess = diag["ess_bulk"].min(1)
        out.update({"hmc_wall_s": hwall, "hmc_samples": samples, "hmc_chains": chains,
                    "hmc_min_ess_median": float(np.median(ess)),
                    "hmc_rhat_max_median": float(np.median(diag["rhat"].max(1))),
                    "hmc_ess_per_s": float(ess.sum() / hwall),
                    "hmc_ess_per_s_per_galaxy": float(np.median(ess) / hwall),
                    "hmc_accept": float(h.accept_rate.mean()), "hmc_sampler": sampler, "hmc_metric": metric,
                    "hmc_steps_per_draw_mean": float(h.n_steps.mean())})
    return out


def bench_vae(data, sigma, t, device, max_iter, name="sdss-vae"):
    """MAP fits of the same galaxies with a pretrained deep prior (64x64 stamps)."""
    import galgen
    from galgen.inference import fit_map

    n, stamp = data.shape[0], data.shape[1]
    model = galgen.load_pretrained(name, device=device)
    obs = observation(t["fwhm"], stamp, sigma, device)
    x = torch.from_numpy(data).to(device)
    fit_map(model, x[:8], observation(t["fwhm"][:8], stamp, sigma, device), max_iter=5)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    res = fit_map(model, x, obs, max_iter=max_iter)
    _sync(device)
    wall = time.perf_counter() - t0
    red = res.reduced_chi2.cpu().numpy()
    return {"model": name, "latent_dim": int(model.config["latent_dim"]), "galaxies_per_s": n / wall,
            "wall_s": wall, "chi2_dof_median": float(np.median(red)), "frac_chi2_dof_lt_1.1": float(np.mean(red < 1.1))}


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
    ap.add_argument("--max-iter", type=int, default=400, help="galgen MAP iterations at most [400]")
    ap.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam", help="galgen MAP optimizer [adam]")
    ap.add_argument("--hmc", action="store_true", help="also time batched HMC from the MAP")
    ap.add_argument("--samples", type=int, default=200, help="HMC draws (and warm-up) per chain [200]")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--sampler", choices=("hmc", "nuts"), default="hmc", help="posterior sampler [hmc: 16 steps]")
    ap.add_argument("--metric", choices=("diag", "dense"), default="diag", help="HMC/NUTS mass matrix [diag]")
    ap.add_argument("--vae", action="store_true",
                    help="also time MAP fits with the pretrained sdss-vae (needs --stamp 64)")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for the GalSim + scipy loop [120]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t, data, sigma = make_galaxies(args.n, args.stamp)
    g = bench_galgen(t, data, sigma, args.device, args.max_iter, args.hmc, args.samples, args.chains,
                     args.optimizer, args.sampler, args.metric)
    v = bench_vae(data, sigma, t, args.device, args.max_iter) if args.vae else None
    s = bench_galsim_scipy(t, data, sigma, args.budget)
    result = {"machine": machine_info(), "device": args.device, "torch_threads": args.threads, "n": args.n,
              "stamp": args.stamp, "galgen": g, "galsim_scipy": s, "vae": v,
              "ratio": g["galaxies_per_s"] / s["galaxies_per_s"]}
    keys = ("hlr_rel_err_median", "n_abs_err_median", "g_abs_err_median", "chi2_dof_median")
    for name, r in ((f"galgen MAP ({args.optimizer}, batched)", g), ("GalSim + scipy least_squares", s)):
        print(f"{name:30s} {r['galaxies_per_s']:9.2f} galaxies/s  " + "  ".join(f"{k}={r[k]:.3g}" for k in keys))
    print(f"ratio galgen / GalSim+scipy: {result['ratio']:.1f}x")
    if v:
        print(f"galgen MAP with {v['model']} ({v['latent_dim']}-d latent): {v['galaxies_per_s']:.2f} galaxies/s, "
              f"median chi2/dof {v['chi2_dof_median']:.3f}, fraction < 1.1: {v['frac_chi2_dof_lt_1.1']:.2f}")
    if args.hmc:
        print(f"galgen {args.sampler.upper()} ({args.metric}, {g['hmc_steps_per_draw_mean']:.1f} leapfrog steps per "
              f"draw): {g['hmc_ess_per_s']:.1f} effective samples/s (min over parameters, summed over "
              f"galaxies; {g['hmc_ess_per_s_per_galaxy']:.3f} per galaxy), "
              f"median min-ESS {g['hmc_min_ess_median']:.0f}, "
              f"median max R-hat {g['hmc_rhat_max_median']:.3f}")
    return finish(result, args.json)


if __name__ == "__main__":
    main()
