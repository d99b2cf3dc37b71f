#!/usr/bin/env python
"""How far has a GAN fine-tuned from a VAE moved its galaxies? chi^2 per galaxy against the VAE's, same z.

    python benchmarks/diagnose_gan_drift.py --vae sdss-vae-bd-comp --data rich_1k.h5 \
        runs/gan-vae/model.pt runs/gan-vae/ck_750.pt --json drift.json

A GAN started from a VAE (:meth:`galgen.models.GAN.from_vae`) draws the VAE's galaxies
until the game moves it. For ``--n`` latent vectors (seeded) the GAN's averaged generator
and the VAE's flow prior and decoder draw a galaxy each; both are observed noise-free like
the first ``--n`` galaxies of ``--data`` (their PSFs), and the chi^2 of the difference in
those galaxies' noise (their variance maps) is reported per checkpoint: mean, median and
90th percentile over galaxies. A chi^2 of about one is a change a single observation
cannot see; the ``anchor`` of :class:`galgen.models.GAN` bounds it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_info  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("checkpoints", nargs="+", help="GAN checkpoints (files, run directories or pretrained names)")
    ap.add_argument("--vae", required=True, help="the VAE the GANs started from")
    ap.add_argument("--data", required=True, help="cutout file whose PSFs and variance maps observe the galaxies")
    ap.add_argument("--n", type=int, default=512, help="galaxies [512]")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from galgen.data import ObservationLoader
    from galgen.errors import GalgenInputError
    from galgen.models import GAN, PriorDecoder
    from galgen.runtime import resolve_model

    torch.set_num_threads(args.threads)
    vae = resolve_model(args.vae, "cpu")
    loader = ObservationLoader(args.data, None, ())
    if args.n > len(loader):
        raise GalgenInputError(f"--n: {args.n} > the {len(loader)} galaxies of {args.data}")
    obs = loader.batch(torch.arange(args.n)).observation
    z = torch.randn(args.n, vae.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    with torch.no_grad():
        start = obs.noiseless(PriorDecoder(vae.latent_flow, vae.decoder)(z))
        for name in args.checkpoints:
            gan = resolve_model(name, "cpu")
            if not isinstance(gan, GAN) or gan.config.get("head") != "vae":
                raise GalgenInputError(f"{name}: not a GAN started from a VAE (head: vae)")
            chi2 = obs.noise.chi2(obs.noiseless(gan.sampling_generator(z)), start).numpy()
            q50, q90 = np.quantile(chi2, [0.5, 0.9])
            rows.append({"checkpoint": name, "mean": float(chi2.mean()), "median": float(q50), "p90": float(q90)})
            print(f"{name}: chi2 per galaxy against {args.vae}: mean {chi2.mean():.2f}, median {q50:.2f}, "
                  f"90th percentile {q90:.2f}", flush=True)
    finish({"vae": args.vae, "data": args.data, "n": args.n, "seed": args.seed, "rows": rows,
            "machine": machine_info()}, args.json)


if __name__ == "__main__":
    main()
