#!/usr/bin/env python
"""Profile: where a MAP iteration and a posterior draw spend their time.

For a batch of ``--n`` galaxies (the Sersic galaxies of ``bench_fit.py`` at 48x48, or
``--vae``: the pretrained ``sdss-vae`` on 64x64 stamps), times the pieces of

* an **Adam iteration**: decode, observe (PSF FFT convolution, pixels, crop), likelihood
  and prior, backward;
* a **Levenberg-Marquardt iteration**: the Jacobian (forward mode, one jvp per latent
  dimension; and central differences, two decodes per dimension, what deep decoders
  use: ``LatentModel.jacobian``), the Gauss-Newton products, the trial evaluation;
* a **posterior draw**: one HMC leapfrog step (a gradient of the log posterior) against
  one importance-sampling proposal (a forward evaluation), per galaxy;

and prints the top operators of :mod:`torch.profiler` for each, so that overhead
(Python loops, small operations, repeated transforms) shows up beside the arithmetic.

    python benchmarks/profile_fit.py [--n 64] [--vae] [--threads 2] [--top 12]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_fit import SCALE, make_galaxies, observation
from common import finish, machine_info


def _timed(fn, repeat=5):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--vae", action="store_true", help="profile the pretrained sdss-vae (64x64) instead of Sersic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="operators listed per profile [12]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import galgen
    from galgen.inference import posterior_log_prob
    from galgen.inference.lm import _central_jacobian, _jacobian, _log_posterior, gauss_newton
    from galgen.models.parametric import SersicModel

    stamp = 64 if args.vae else 48
    t, data, sigma = make_galaxies(args.n, stamp)
    obs = observation(t["fwhm"], stamp, sigma, "cpu")
    x = torch.from_numpy(data)
    model = galgen.load_pretrained("sdss-vae").eval() if args.vae else SersicModel("sersic", stamp=stamp,
                                                                                   pixel_scale=SCALE)
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.latent_dim
    gen = torch.Generator().manual_seed(0)
    z = 0.3 * torch.randn(args.n, d, generator=gen)
    if not args.vae:
        z = model.encode(x) + 0.1 * torch.randn(args.n, d, generator=gen)
    s = torch.full((args.n,), 9.0 if not args.vae else 0.0)
    prior = model.prior(None)
    lp = posterior_log_prob(model, obs, x)
    theta = torch.cat([z, s[:, None]], 1)

    def decode():
        with torch.no_grad():
            return model.decode(z).float()

    intr = decode()
    parts = {
        "decode": _timed(decode),
        "observe (PSF, pixels, crop)": _timed(lambda: obs.noiseless(intr)),
        "likelihood + prior": _timed(lambda: obs.noise.log_prob(x, obs.noiseless(intr)) + prior.log_prob(z)),
    }

    def adam_step():
        th = theta.clone().requires_grad_(True)
        (-lp(th).sum()).backward()

    parts["Adam iteration (value + gradient)"] = _timed(adam_step)
    parts["LM: Jacobian (forward mode, d passes)"] = _timed(lambda: _jacobian(model, obs, z, None), 2)
    with torch.no_grad():
        parts["LM: Jacobian (central differences, 2d decodes)"] = _timed(
            lambda: _central_jacobian(model, obs, z, None), 2)
    parts[f"LM: derivatives (Jacobian ({model.jacobian}) + gradient + Gauss-Newton + prior Hessian)"] = _timed(
        lambda: gauss_newton(model, obs, x, z, s, None, prior, True), 2)
    parts["LM: trial evaluation"] = _timed(lambda: _log_posterior(model, obs, x, z, s, None, prior))
    parts["posterior draw, HMC (one leapfrog = one gradient)"] = parts["Adam iteration (value + gradient)"]
    with torch.no_grad():
        parts["posterior draw, importance sampling (one proposal = one evaluation)"] = _timed(lambda: lp(theta))
    print(f"{'per batch of ' + str(args.n):66s} {'ms':>9s} {'ms/galaxy':>10s}")
    for k, v in parts.items():
        print(f"{k:66s} {1e3 * v:9.2f} {1e3 * v / args.n:10.3f}")
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, fn in (("adam_iteration", adam_step),
                     ("lm_derivatives", lambda: gauss_newton(model, obs, x, z, s, None, prior, True))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        print(f"\n--- {name}: top operators by self CPU time ---\n{tables[name]}")
    return finish({"machine": machine_info(), "n": args.n, "model": "sdss-vae" if args.vae else "sersic",
                   "seconds_per_batch": parts}, args.json)


if __name__ == "__main__":
    main()
