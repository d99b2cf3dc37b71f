#!/usr/bin/env python
"""Train the amortised posterior proposal of a model (galgen.inference.amortized).

    python pipelines/train_amortized.py --model sdss-vae --pool sdss_pool_10k.h5 \
        --steps 3000 --out galgen/pretrained/sdss-vae.posterior.pt

``--pool`` is a cutout file whose PSFs and noise the training simulations borrow (not
the file to be fitted or calibrated on): e.g. ``galgen simulate --survey sdss --n 10000
--stamp 64 --seed 6262 --psf-size 33 --out sdss_pool_10k.h5``. Rerunning the command
with the same settings resumes from ``--out``. ``--init`` goes on training a trained flow
(e.g. the installed ``galgen/pretrained/sdss-vae.posterior.pt``) on a new cosine schedule
of ``--steps``, keeping its architecture and standardisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import torch

from galgen.data.loading import observation_from_cutouts
from galgen.inference.amortized import train_amortized_posterior
from galgen.runtime import resolve_device, resolve_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--model", default="sdss-vae")
    ap.add_argument("--pool", required=True, help="cutout file lending PSFs and noise to the simulations")
    ap.add_argument("--pool-size", type=int, default=None, help="first N galaxies of --pool (default all)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--bank", type=int, default=50_000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transforms", type=int, default=4)
    ap.add_argument("--log-scale-sd", type=float, default=1.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--init", default=None,
                    help="a trained flow (posterior checkpoint) to go on training; --transforms and "
                         "--log-scale-sd then come from it")
    ap.add_argument("--out", required=True, help="training checkpoint (resumed if it exists)")
    ap.add_argument("--install", action="store_true",
                    help="a pretrained --model: write the trained flow beside it (<name>.posterior.pt, weights "
                         "only) and record it in its card")
    ap.add_argument("--pool-command", default=None, help="the command that made --pool, for the card")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dev = resolve_device(args.device)
    model = resolve_model(args.model, dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    index = slice(None) if args.pool_size is None else slice(0, args.pool_size)
    obs = observation_from_cutouts(args.pool, index, device=dev)
    t0 = time.perf_counter()
    if args.init is not None:
        from galgen.inference.amortized import load_amortized_posterior

        options = {"posterior": load_amortized_posterior(args.init, device=dev)}
    else:
        options = {"transforms": args.transforms, "log_scale_sd": args.log_scale_sd}
    q = train_amortized_posterior(model, obs, steps=args.steps, batch_size=args.batch_size, bank=args.bank,
                                  lr=args.lr, seed=args.seed, out=args.out, **options)
    wall = time.perf_counter() - t0
    record = {"steps": int(q.trained_steps), "wall_s_this_call": round(wall, 1),
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if args.install:
        from galgen.checkpoints import amortized_posterior_path, load_checkpoint
        from galgen.pretrained import PRETRAINED_DIR, available_pretrained

        if args.model not in available_pretrained():
            raise SystemExit(f"--install: {args.model!r} is not a pretrained model")
        ck = load_checkpoint(args.out)
        card_path = PRETRAINED_DIR / f"{args.model}.json"
        card = json.loads(card_path.read_text())
        card["amortized_posterior"] = {
            "file": f"{args.model}.posterior.pt", "config": q.config, "steps": int(q.trained_steps),
            "settings": ck["provenance"].get("settings"), "final_loss": ck["metrics"].get("loss"),
            "pool": str(args.pool), "pool_command": args.pool_command,
            "command": "python pipelines/train_amortized.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in (("model", args.model), ("pool", args.pool),
                                                           ("steps", args.steps), ("bank", args.bank),
                                                           ("batch_size", args.batch_size), ("lr", args.lr),
                                                           ("seed", args.seed), ("init", args.init))
                if v is not None),
            "trained": time.strftime("%Y-%m-%d"), **{k: v for k, v in record.items() if k != "steps"}}
        q.save(amortized_posterior_path(PRETRAINED_DIR / f"{args.model}.pt"),
               provenance={"pool": str(args.pool), "settings": ck["provenance"].get("settings")},
               metrics={"loss": ck["metrics"].get("loss")})
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        record["installed"] = str(amortized_posterior_path(PRETRAINED_DIR / f"{args.model}.pt"))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
