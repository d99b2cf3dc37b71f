#!/usr/bin/env python
"""Can a GAN critic tell a generator's observed galaxies from real ones? The critic alone, the generator frozen.

    python benchmarks/diagnose_critic.py --model pipelines/runs/sdss-vae-bd-comp-map/model.pt \
        --data rich_train_20k.h5 --steps 300 --width 8 --lr 1e-4 --r1-gamma 1 --json critic.json

Before a GAN fine-tunes a good generator (:meth:`galgen.models.GAN.from_vae`), it is worth
knowing whether its critic can see what is wrong with it at all: in the game the generator
moves with the critic, so the critic's training loss stays near ``2 ln 2`` whether it sees
nothing or the generator keeps up. Here the generator (a VAE's flow prior and decoder, or
a GAN's averaged generator) is frozen, a fresh :class:`galgen.models.SNCritic` of the
recipe's options is trained with the non-saturating loss and lazy R1 on the first
``--n-train`` galaxies of ``--data`` against fakes observed like them (the batch's PSFs and
noise), and every ``--every`` steps its loss and accuracy (real scored > 0, fake < 0) on
``--n-held`` other galaxies of the file and the fakes of the GAN's validation (the same
every time) are reported: accuracy 0.5 means
the critic sees no difference (yet).

``--fakes noiseless`` or ``--fakes intrinsic`` replaces the generator by the truth: each
real galaxy's own noise-free stamp (the file's ``noiseless``, GalSim's rendering), or its
intrinsic image observed through galgen's physics layer, with the fakes' noise
(``--fake-noise``, :meth:`galgen.models.AdversarialModel.fake_observation`). The fakes
are then the real galaxies themselves: a critic that tells them apart sees the noise
model or the physics layer, which no generator can fix, and which a game would make it
chase with the galaxies' morphology.

``--explain`` asks what the trained critic's score follows: on the held-out galaxies, its
mean by simulated feature (spiral arms, bar, clumps, companion, dust lane, lopsidedness, or
none) and its rank correlation with each morphology statistic, among the real and among the
fake galaxies.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_info  # noqa: E402


def truth_fakes(gan, batch, truth, through_physics, generator=None):
    """The real galaxies of ``batch`` as fakes: ``truth`` their noise-free stamps, or their intrinsic
    images then observed through the physics layer, with the fakes' noise."""
    obs = gan.fake_observation(batch)
    clean = obs.noiseless(truth) if through_physics else truth
    return obs.noise.sample(clean, generator=generator)


@torch.no_grad()
def held_out(gan, batches, fakes=None):
    """Critic scores of held-out galaxies and of their fixed fakes (:meth:`GAN.validation_step`, or
    ``fakes(batch, generator)`` with a generator seeded per batch), and the fakes."""
    dr, df, images = [], [], []
    for i, b in enumerate(batches):
        if fakes is None:
            st = gan.validation_step(b)
            dr.append(st["critic_real"])
            df.append(st["critic_fake"])
            images.append(st["observed_fakes"])
            continue
        mask = getattr(b.observation.noise, "mask", None)
        images.append(fakes(b, torch.Generator().manual_seed(1000 + i)))
        dr.append(gan.critic_score(b.observed, mask=mask))
        df.append(gan.critic_score(images[-1], mask=mask))
    return torch.cat(dr), torch.cat(df), torch.cat(images)


def held_out_scores(gan, batches, fakes=None):
    """Critic loss and accuracy on held-out galaxies and their fixed fakes (:func:`held_out`)."""
    dr, df, _ = held_out(gan, batches, fakes)
    accuracy = 0.5 * (float((dr > 0).float().mean()) + float((df < 0).float().mean()))
    return float(gan.critic_loss(dr, df)), accuracy


#: Catalog flags of the simulated rich morphology (galgen.simulate) that :func:`explain` groups by.
FEATURES = {"spiral arms": ("arm_m", 0), "bar": ("bar_frac", 0), "clumpy irregular": ("irregular", 0),
            "companion": ("comp_flux_ratio", 0), "dust lane": ("dust_tau", 0), "lopsided": ("lop_a1", 0)}


def explain(gan, batches, fakes, data, rows, pixel_scale):
    """What the trained critic's score follows on held-out galaxies.

    The mean score and the fraction called real of the real galaxies by simulated feature
    (a galaxy with none of them is "plain"), and the Spearman correlation of the score with
    each morphology statistic (:func:`galgen.evaluation.statistics.morphology_statistics`,
    measured on the noisy stamps with their variance) among the real, among the fake and
    among all galaxies.
    """
    from scipy.stats import spearmanr

    from galgen.evaluation.statistics import morphology_statistics

    dr, df, fake = held_out(gan, batches, fakes)
    dr, df = dr.numpy(), df.numpy()
    real = torch.cat([b.observed for b in batches]).numpy()
    var = torch.cat([b.observation.noise.variance_map for b in batches]).numpy()
    out = {"by_feature": {}, "spearman": {}}
    with h5py.File(data, "r") as f:
        cat = f["catalog"][rows]
    flags = {k: np.asarray(cat[col]) > lim for k, (col, lim) in FEATURES.items() if col in cat.dtype.names}
    if flags:
        flags["plain"] = ~np.any(np.stack(list(flags.values())), axis=0)
    for k, m in flags.items():
        out["by_feature"][k] = {"n": int(m.sum()), "mean_score": float(dr[m].mean()) if m.any() else None,
                                "called_real": float((dr[m] > 0).mean()) if m.any() else None}
    out["fakes"] = {"n": len(df), "mean_score": float(df.mean()), "called_real": float((df > 0).mean())}
    sr = morphology_statistics(real, pixel_scale, variance=var)
    sf = morphology_statistics(fake.numpy(), pixel_scale, variance=var)
    for k in sr:
        a, b = np.asarray(sr[k], float), np.asarray(sf[k], float)
        if a.shape != dr.shape or k in ("ok", "flag"):
            continue
        ka, kb = np.isfinite(a), np.isfinite(b)
        out["spearman"][k] = {"real": float(spearmanr(a[ka], dr[ka])[0]), "fake": float(spearmanr(b[kb], df[kb])[0]),
                              "all": float(spearmanr(np.r_[a[ka], b[kb]], np.r_[dr[ka], df[kb]])[0]),
                              "median_real": float(np.nanmedian(a)), "median_fake": float(np.nanmedian(b))}
    for k, v in out["by_feature"].items():
        print(f"real, {k}: n {v['n']}, mean score {v['mean_score']:+.3f}, called real {v['called_real']:.2f}")
    print(f"fakes: n {out['fakes']['n']}, mean score {out['fakes']['mean_score']:+.3f}, "
          f"called real {out['fakes']['called_real']:.2f}")
    for k, v in out["spearman"].items():
        print(f"{k}: Spearman(score, statistic) real {v['real']:+.3f}, fake {v['fake']:+.3f}, all {v['all']:+.3f} "
              f"(median real {v['median_real']:.4g}, fake {v['median_fake']:.4g})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a VAE with a fitted flow prior, or a GAN (file, run "
                                                   "directory or pretrained name)")
    ap.add_argument("--data", required=True, help="cutout file of real galaxies (training set)")
    ap.add_argument("--n-train", type=int, default=6400, help="first N galaxies train the critic [6400]")
    ap.add_argument("--n-held", type=int, default=512, help="the file's last N galaxies score it [512]")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--r1-gamma", type=float, default=1.0)
    ap.add_argument("--r1-every", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fakes", choices=("model", "noiseless", "intrinsic"), default="model",
                    help="the model's galaxies, or the real galaxies' own noise-free stamps or intrinsic images "
                         "through the physics layer [model]")
    ap.add_argument("--fake-noise", choices=("variance-map", "own"), default="variance-map",
                    help="noise of the fakes (GAN fake_noise) [variance-map]")
    ap.add_argument("--explain", action="store_true",
                    help="after training: the critic's held-out scores by simulated feature and their rank "
                         "correlation with each morphology statistic")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from galgen.data import ObservationLoader
    from galgen.errors import GalgenInputError
    from galgen.models import GAN, VAE
    from galgen.runtime import resolve_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    source = resolve_model(args.model, "cpu")
    options = dict(width=args.width, critic_symmetry=True, r1_gamma=args.r1_gamma, r1_every=args.r1_every, ema=0.0,
                   fake_noise=args.fake_noise)
    if isinstance(source, VAE):
        gan = GAN.from_vae(source, **options)
    elif isinstance(source, GAN) and not source.cond_dim:
        gan = GAN.from_config({**source.config, **options})
        gan.generator.load_state_dict(source.sampling_generator.state_dict())
    else:
        raise GalgenInputError(f"--model: {args.model} is neither a VAE nor an unconditional GAN")
    for p in gan.generator.parameters():
        p.requires_grad_(False)
    n = len(ObservationLoader(args.data, None, ()))
    if args.n_train + args.n_held > n:
        raise GalgenInputError(f"--n-train + --n-held: {args.n_train + args.n_held} > the {n} galaxies of {args.data}")
    train = ObservationLoader(args.data, np.arange(args.n_train), ())
    held = list(ObservationLoader(args.data, np.arange(n - args.n_held, n), ()).iter_batches(256))
    fakes = None
    if args.fakes != "model":
        key = "noiseless" if args.fakes == "noiseless" else "intrinsic"
        with h5py.File(args.data, "r") as f:
            if key not in f:
                raise GalgenInputError(f"--fakes {args.fakes}: {args.data} has no '{key}' images")
            rows = np.r_[np.arange(args.n_train), np.arange(n - args.n_held, n)]
            images = torch.from_numpy(np.concatenate([f[key][: args.n_train], f[key][n - args.n_held:]]))
        where = np.full(n, -1)
        where[rows] = np.arange(len(rows))

        def fakes(batch, generator=None):
            return truth_fakes(gan, batch, images[where[batch.index.numpy()]], key == "intrinsic", generator)

    opt = torch.optim.Adam(gan.critic.parameters(), lr=args.lr, betas=(0.5, 0.999))
    rows, step, t0 = [], 0, time.perf_counter()
    loss0, acc0 = held_out_scores(gan, held, fakes)
    rows.append({"step": 0, "held_out_loss": loss0, "held_out_accuracy": acc0, "wall_s": 0.0})
    while step < args.steps:
        for b in train.iter_batches(args.batch_size):
            mask = getattr(b.observation.noise, "mask", None)
            with torch.no_grad():
                fake = gan.observe_fakes(gan.fake_observation(b))[1] if fakes is None else fakes(b)
            u_real = gan.critic_input(b.observed, mask)
            scores = gan.critic(torch.cat([u_real, gan.critic_input(fake, mask)])).float()
            loss = gan.critic_loss(scores[:len(b)], scores[len(b):])
            if args.r1_gamma > 0 and step % args.r1_every == 0:
                loss = loss + 0.5 * args.r1_gamma * args.r1_every * gan.r1_penalty(u_real)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                loss_h, acc_h = held_out_scores(gan, held, fakes)
                rows.append({"step": step, "held_out_loss": loss_h, "held_out_accuracy": acc_h,
                             "wall_s": time.perf_counter() - t0})
                print(f"step {step}: held-out critic loss {loss_h:.4f} (2 ln 2 = 1.3863), accuracy {acc_h:.3f} "
                      f"({rows[-1]['wall_s']:.0f} s)", flush=True)
            if step >= args.steps:
                break
    result = {"model": args.model, "data": args.data, "n_train": args.n_train, "n_held": args.n_held,
              "width": args.width, "lr": args.lr, "r1_gamma": args.r1_gamma, "r1_every": args.r1_every,
              "batch_size": args.batch_size, "fakes": args.fakes, "fake_noise": args.fake_noise, "seed": args.seed,
              "threads": args.threads, "rows": rows,
              "machine": machine_info()}
    if args.explain:
        held_rows = np.arange(n - args.n_held, n)
        result["explain"] = explain(gan, held, fakes, args.data, held_rows, float(train.pixel_scale))
    finish(result, args.json)


if __name__ == "__main__":
    main()
