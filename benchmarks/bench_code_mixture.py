#!/usr/bin/env python
"""The code-mixture prior's log density and its gradient: galgen's blocked matrix products against torch's own.

    python benchmarks/bench_code_mixture.py --codes pipelines/runs/sdss-vae-bd-gate-map/codes.pt --json bench.json

:class:`galgen.models.CodeMixture` evaluates ``log p(z)`` of a mixture of ``N`` diagonal
Gaussians as squared distances by matrix products in float64, over blocks of components.
The peer is what a user would write with torch alone,
:meth:`torch.distributions.MixtureSameFamily.log_prob` of the same mixture (it holds all
``B x N x D`` differences), run in float32 (the default) and in float64 (the reference for
the accuracy). Both are timed with the gradient with respect to ``z`` (what a MAP fit or
HMC under the prior needs), best of ``--repeat`` runs, on ``--batch`` codes drawn near the
components (each a component's centre plus its width times normal noise). Without
``--codes`` the components are ``--n`` random codes of ``--dim`` dimensions with widths
of 0.02-0.1 (those of the encoders of galgen's VAEs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_info  # noqa: E402


def _timed(fn, z, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        x = z.clone().requires_grad_(True)
        t0 = time.perf_counter()
        lp = fn(x)
        (grad,) = torch.autograd.grad(lp.sum(), x)
        best = min(best, time.perf_counter() - t0)
        out = (lp.detach(), grad)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", help="tensor file of (N, D) codes (e.g. a run's codes.pt)")
    ap.add_argument("--n", type=int, default=16000, help="components without --codes [16000]")
    ap.add_argument("--dim", type=int, default=17, help="dimensions without --codes [17]")
    ap.add_argument("--batch", type=int, default=1000, help="codes evaluated at once [1000]")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch.distributions import MixtureSameFamily

    from galgen.models import CodeMixturePrior

    g = torch.Generator().manual_seed(0)
    if args.codes:
        codes = torch.load(args.codes, weights_only=True).float()
    else:
        codes = torch.randn(args.n, args.dim, generator=g)
    widths = 0.02 + 0.08 * torch.rand(codes.shape, generator=g)
    prior = CodeMixturePrior(codes.shape[1])
    prior.fit(codes, widths, bandwidth=1.0)
    pick = torch.randint(len(codes), (args.batch,), generator=g)
    z = codes[pick] + widths[pick] * torch.randn(args.batch, codes.shape[1], generator=g)

    dist = prior.distribution()
    t_galgen, (lp_g, grad_g) = _timed(dist.log_prob, z, args.repeat)
    t_torch, (lp_t, grad_t) = _timed(lambda x: MixtureSameFamily.log_prob(dist, x), z, args.repeat)
    prior64 = CodeMixturePrior(codes.shape[1]).double()
    prior64.fit(codes.double(), widths.double(), bandwidth=1.0)
    dist64 = prior64.distribution()
    _, (lp_ref, grad_ref) = _timed(lambda x: MixtureSameFamily.log_prob(dist64, x), z.double(), 1)

    def err(lp, grad):
        return {"log_prob_max_abs_nats": float((lp.double() - lp_ref).abs().max()),
                "grad_max_rel": float(((grad.double() - grad_ref).norm(dim=1) / grad_ref.norm(dim=1).clamp_min(1e-12))
                                      .max())}

    result = {"components": len(codes), "dim": codes.shape[1], "batch": args.batch, "threads": args.threads,
              "codes": args.codes,
              "galgen_s": t_galgen, "torch_float32_s": t_torch, "speedup": t_torch / t_galgen,
              "galgen_error": err(lp_g, grad_g), "torch_float32_error": err(lp_t, grad_t),
              "machine": machine_info()}
    print(f"{args.batch} codes x {len(codes)} components x {codes.shape[1]} dims, log p and its gradient, "
          f"{args.threads} threads:")
    e = result["galgen_error"]
    print(f"  galgen CodeMixture.log_prob   {t_galgen:7.3f} s   max |error| {e['log_prob_max_abs_nats']:.2e} "
          f"nats, gradient {e['grad_max_rel']:.1e} (relative)")
    print(f"  torch MixtureSameFamily (f32) {t_torch:7.3f} s   max |error| "
          f"{result['torch_float32_error']['log_prob_max_abs_nats']:.2e} nats, gradient "
          f"{result['torch_float32_error']['grad_max_rel']:.1e}")
    print(f"  speed-up x{result['speedup']:.1f} (reference: torch's log_prob in float64)")
    finish(result, args.json)
    return result


if __name__ == "__main__":
    main()
