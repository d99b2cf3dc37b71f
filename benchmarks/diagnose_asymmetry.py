#!/usr/bin/env python
"""Where a flux-shape VAE's asymmetry comes from, galaxy type by galaxy type.

    python benchmarks/diagnose_asymmetry.py --model sdss-vae-bd --data rich_1k.h5 --n 1000 \
        --json diagnose_asymmetry.json

The CAS asymmetry of ``galgen evaluate`` (noise-free observed images) separates every
model from the simulated galaxies. This script takes it apart for a VAE whose decoder is
a :class:`galgen.models.networks.FluxShapeGenerator` (``flux x softmax(body - seed)``):

1. the held-out galaxies themselves, with the default Fourier rotation and with
   statmorph's bilinear one, and shifted by a quarter pixel (what the rotation alone
   does to a galaxy that leaves the pixel grid);
2. their reconstructions (the encoder's mean, decoded), galaxy by galaxy and by
   morphology type (``galgen.simulate.morphology_label``): a bulge whose reconstruction
   is lopsided shows what the decoder adds;
3. galaxies drawn from the flow prior, decoded in full, with the body's logits switched
   off (the bulge + disk seed alone) and with the body's logits replaced by their mean
   over the draws (the part of the body that does not depend on the galaxy);
4. with a symmetry gate (``VAE(symmetry_gate="network"|"latent")``), the gate's median by
   type for the reconstructions (a latent gate's from ``VAE.gate_posterior``) and its
   quantiles over the flow prior's draws;

5. each held-out galaxy's code drawn from its own posterior (``VAE.aggregate_posterior``
   of the held-out galaxies, one draw each: what the flow prior is fitted to, on galaxies
   it never saw), decoded: what a perfect prior could do with this decoder, beside the
   flow prior's draws, with the C2ST of all eleven statistics of ``galgen evaluate``;
6. what the posterior codes would score if the galaxies of one type (irregulars, galaxies
   with companions, both) were drawn right: their statistics swapped for the real ones
   (the asymmetry alone, and all eleven), C2ST and asymmetry W1 / floor;
7. with ``--map-steps N``, the held-out galaxies' MAP codes
   (:func:`galgen.inference.map_codes`, at most N Adam steps from the encoder's guess under
   the flow prior, or ``--map-prior normal``: N(0, I)), decoded, with their C2ST and W1 /
   floor: the codes that explain each galaxy, beside the encoder's (a C2ST below 0.5 is
   the pairing: each draw is its real galaxy's twin, so the classifier's held-out half
   holds the twins of what it learned);
   and with ``--codes FILE ...``, codes drawn from the codes a flow was fitted to
   (``pipelines/refit_prior.py --save-codes``), decoded: what a flow that fitted them exactly
   would draw;

each observed without noise through the PSFs of the held-out galaxies (or, with
``--measure-on observed``, with the survey's noise and measured with its variance, as
``galgen evaluate --measure-on observed``), with the quantiles of A and the W1 distance to the real galaxies beside its real-vs-real floor
(as ``galgen evaluate``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish, machine_info  # noqa: E402

QUANTILES = (5, 16, 50, 84, 95)


def _observe(loader, images, batch_size=256, noise=None, generator=None):
    """Observations of intrinsic ``images`` (n, S, S) through the loader's PSFs: noise-free,
    or with ``noise`` (a noise model) drawn from ``generator``, then ``(images, variance)``."""
    out, var = [], []
    for batch in loader.iter_batches(batch_size):
        rows = batch.index.cpu().numpy()
        with torch.no_grad():
            clean = batch.observation.noiseless(images[rows])
            if noise is None:
                out.append(clean.double().cpu().numpy())
            else:
                out.append(noise.sample(clean, generator=generator).double().cpu().numpy())
                var.append(noise.variance(clean).double().cpu().numpy())
    return np.concatenate(out) if noise is None else (np.concatenate(out), np.concatenate(var))


def _decoded(decoder, z, body: str, mean_logits=None):
    """Intrinsic images of ``z``: ``body`` = "full", "off" (seed alone: zero body logits) or
    "mean" (the body's mean logits for every galaxy). The decoder's own forward pass, its
    body's logits swapped for the call."""
    swap = {"off": lambda zz: torch.zeros(len(zz), decoder.size, decoder.size),
            "mean": lambda zz: mean_logits.expand(len(zz), -1, -1)}.get(body)
    if swap is not None:
        decoder.shape.logits = swap  # an instance attribute shadows the method
    try:
        with torch.no_grad():
            return decoder(z).float()
    finally:
        if swap is not None:
            del decoder.shape.logits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdss-vae-bd")
    ap.add_argument("--data", required=True, help="held-out rich-morphology cutout file (with noiseless images)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure-on", choices=("noiseless", "observed"), default="noiseless",
                    help="statistics of the noise-free observed images, or of noisy ones (the file's noise "
                         "model, CCD) with their variance maps, as galgen evaluate --measure-on [noiseless]")
    ap.add_argument("--map-steps", type=int, default=0,
                    help="also the held-out galaxies' MAP codes (galgen.inference.map_codes: Adam, at most this "
                         "many steps from the encoder's guess, the flux in the code), decoded")
    ap.add_argument("--map-prior", choices=("flow", "normal"), default="flow",
                    help="the prior of those MAP fits: the model's flow [flow] or N(0, I)")
    ap.add_argument("--codes", nargs="+", default=(),
                    help="also n codes drawn without replacement from these files (pipelines/refit_prior.py "
                         "--save-codes: the codes its flow was fitted to), decoded: what a flow that fitted them "
                         "exactly would draw")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from galgen.data import CutoutFile, ObservationLoader
    from galgen.evaluation import survey_noise
    from galgen.evaluation.distances import c2st_statistics, compare_statistics
    from galgen.evaluation.statistics import STATISTICS, morphology_statistics
    from galgen.models.base import sample_latents
    from galgen.runtime import resolve_model
    from galgen.simulate import morphology_label

    t0 = time.perf_counter()
    model = resolve_model(args.model, "cpu").with_prior("flow")
    dec = model.decoder
    noisy = args.measure_on == "observed"
    with CutoutFile(args.data) as f:
        n = min(args.n, len(f))
        real = f.read("observed" if noisy else "noiseless", slice(0, n)).astype(np.float64)
        real_var = f.read("variance", slice(0, n)).astype(np.float64) if noisy else None
        observed = torch.as_tensor(f.read("observed", slice(0, n)))
        scale = f.pixel_scale
        cat = f.catalog[:n]
    loader = ObservationLoader(args.data, np.arange(n), (), in_memory=True)
    rows = [dict(zip(cat.colnames, cat[i])) for i in range(n)]
    label = np.array(["with companion" if float(r.get("comp_flux_ratio", 0.0)) > 0
                      else morphology_label(r).split(" + ")[0] for r in rows])

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        z_prior = sample_latents(model.prior(None), n, generator=gen)
        z_rec = model.encode(observed).mean
        if dec.symmetry_gate == "latent":  # reconstructions with each galaxy's best gate, as the ELBO draws them
            for batch in loader.iter_batches(256):
                rows = batch.index.cpu().numpy()
                z_rec[rows] = model.with_best_gate(z_rec[rows], batch)
        z_post = model.aggregate_posterior(loader.iter_batches(256), 1, generator=gen)[0]
        mean_logits = dec.shape.logits(z_prior).mean(0, keepdim=True)
        gate_rec, gate_prior = dec.asymmetry_gate(z_rec).numpy(), dec.asymmetry_gate(z_prior).numpy()
    code_sets = [("reconstruction", z_rec, "full"), ("reconstruction, seed alone", z_rec, "off"),
                 ("flow prior", z_prior, "full"), ("flow prior, seed alone", z_prior, "off"),
                 ("flow prior, mean body", z_prior, "mean"), ("held-out posterior codes", z_post, "full")]
    if args.map_steps:
        from galgen.inference import map_codes
        z_map = map_codes(model.with_prior(args.map_prior), loader.iter_batches(250), max_iter=args.map_steps)[0]
        code_sets.append(("held-out MAP codes", z_map, "full"))
    if args.codes:
        pool = torch.cat([torch.load(path, weights_only=True).float() for path in args.codes])
        if pool.ndim != 2 or pool.shape[1] != model.latent_dim or len(pool) < n:
            raise SystemExit(f"--codes: expected at least {n} codes of {model.latent_dim} coordinates, got "
                             f"{tuple(pool.shape)}")
        code_sets.append(("fitted codes, resampled", pool[torch.randperm(len(pool), generator=gen)[:n]], "full"))
    noise = survey_noise(args.data) if noisy else None
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    sets = {"real": (real, real_var)}
    if not noisy:  # the rotation's own asymmetry, on a galaxy that leaves the pixel grid
        shift = np.fft.fftfreq(real.shape[-1])
        phase = np.exp(-2j * np.pi * 0.25 * (shift[None, :] + shift[:, None]))
        sets["real shifted 0.25 pixel"] = (np.real(np.fft.ifft2(np.fft.fft2(real) * phase)), None)
    for name, z, body in code_sets:
        obs = _observe(loader, _decoded(dec, z, body, mean_logits), noise=noise, generator=noise_gen)
        sets[name] = obs if noisy else (obs, None)
    stats = {}
    for name, (images, var) in sets.items():
        stats[name] = morphology_statistics(images, scale, variance=var)
        if name.startswith("real") and not noisy:
            stats[name + " (bilinear)"] = morphology_statistics(images, scale, rotation="bilinear")
    result = {"model": args.model, "data": str(args.data), "n": n, "measured_on": args.measure_on,
              "machine": machine_info(), "sets": {}, "by_type": {}}
    for name, st in stats.items():
        entry = {f"asymmetry_q{q}": float(np.nanpercentile(st["asymmetry"], q)) for q in QUANTILES}
        entry["gini_median"] = float(np.nanmedian(st["gini"]))
        if name != "real":
            cmp = compare_statistics(stats["real"], st, names=["asymmetry", "gini"], seed=args.seed)["statistics"]
            for k in ("asymmetry", "gini"):
                entry[f"{k}_w1"], entry[f"{k}_w1_floor"] = cmp[k]["w1"], cmp[k]["w1_floor"]
        result["sets"][name] = entry
        print(f"{name:34s} A q5/16/50/84/95 " + " ".join(f"{entry[f'asymmetry_q{q}']:.4f}" for q in QUANTILES)
              + f"  Gini {entry['gini_median']:.4f}"
              + (f"  W1 A {entry['asymmetry_w1']:.3f} (floor {entry['asymmetry_w1_floor']:.3f})"
                 f" Gini {entry['gini_w1']:.3f} ({entry['gini_w1_floor']:.3f})" if name != "real" else ""))
    names = list(STATISTICS)
    for name in [k for k in ("flow prior", "held-out posterior codes", "held-out MAP codes",
                             "fitted codes, resampled") if k in stats]:
        c2st = c2st_statistics(stats["real"], stats[name], names=names, seed=args.seed)
        cmp = compare_statistics(stats["real"], stats[name], names=names, seed=args.seed)["statistics"]
        result["sets"][name]["c2st"] = c2st["accuracy"]
        result["sets"][name]["w1_ratio"] = {k: cmp[k]["w1_ratio"] for k in names}
        print(f"{name:34s} C2ST {c2st['accuracy']:.3f}  W1 / floor: "
              + " ".join(f"{k} {cmp[k]['w1_ratio']:.2f}" for k in names))
    post, result["swapped"] = stats["held-out posterior codes"], {}
    for types in (("with companion",), ("irregular",), ("with companion", "irregular")):
        sel = np.isin(label, types)
        for what in ("asymmetry", "all"):  # which statistics of these galaxies are the real ones
            swap = set(post) if what == "all" else {"asymmetry"}  # all: with the real ok / flag too
            swapped = {k: np.where(sel, stats["real"][k], v) if k in swap else v for k, v in post.items()}
            c2st = c2st_statistics(stats["real"], swapped, names=names, seed=args.seed)["accuracy"]
            ratio = compare_statistics(stats["real"], swapped, names=names, seed=args.seed)["statistics"]
            key = f"{' + '.join(types)}: {what}"
            result["swapped"][key] = {"c2st": c2st, "asymmetry_w1_ratio": ratio["asymmetry"]["w1_ratio"]}
            print(f"posterior codes, real {key:36s} C2ST {c2st:.3f}  asymmetry W1 / floor "
                  f"{ratio['asymmetry']['w1_ratio']:.2f}")
    if dec.symmetry_gate is not None:  # a symmetry gate (FluxShapeGenerator(symmetry_gate=...))
        result["gate_flow_prior"] = {f"q{q}": float(np.percentile(gate_prior, q)) for q in QUANTILES}
        result["gate_flow_prior"]["fraction_below_0.05"] = float(np.mean(gate_prior < 0.05))
        print("symmetry gate of the flow prior's draws q5/16/50/84/95 "
              + " ".join(f"{result['gate_flow_prior'][f'q{q}']:.3f}" for q in QUANTILES)
              + f"; below 0.05: {result['gate_flow_prior']['fraction_below_0.05']:.3f}")
    print(f"\n{'type':16s} {'n':>4s}  median A: real / reconstruction / its seed alone"
          + ("  | median gate of the reconstruction" if dec.symmetry_gate is not None else ""))
    for t in ("bulge", "disk", "spiral", "barred spiral", "barred disk", "irregular", "with companion"):
        sel = label == t
        if sel.any():
            med = {k: float(np.nanmedian(stats[k]["asymmetry"][sel]))
                   for k in ("real", "reconstruction", "reconstruction, seed alone")}
            result["by_type"][t] = {"n": int(sel.sum()), **med}
            gate = ""
            if dec.symmetry_gate is not None:
                result["by_type"][t]["gate"] = float(np.median(gate_rec[sel]))
                gate = f"  | {result['by_type'][t]['gate']:.3f}"
            print(f"{t:16s} {int(sel.sum()):4d}  {med['real']:.4f} / {med['reconstruction']:.4f} / "
                  f"{med['reconstruction, seed alone']:.4f}{gate}")
    result["wall_s"] = time.perf_counter() - t0
    finish(result, args.json)


if __name__ == "__main__":
    main()
