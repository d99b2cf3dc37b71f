"""Grow a trained VAE: a symmetry gate, more latent dimensions and/or a companion, to fine-tune from.

    python pipelines/grow_vae.py --from galgen/pretrained/sdss-vae-bd.pt --symmetry-gate network --out gated.pt
    galgen train --config pipelines/configs/vae_sdss_bd_gate.yaml --data sdss_rich_train_20k.h5 \\
        --out pipelines/runs/sdss-vae-bd-gate --init gated.pt

Every weight of the source is kept (:func:`galgen.models.add_symmetry_gate`,
:func:`galgen.models.add_latents`, :func:`galgen.models.add_companion`,
:func:`galgen.models.add_bulge_index`, applied in this order);
``--scale`` sets the decoder's columns for new latents as a factor of PyTorch's default
initialisation (0.1: the grown model draws nearly its source's galaxies, but in
``sdss-vae-bd-comp`` the new coordinates then stayed at their prior in fine-tuning; 1 wakes
them, docs/models.md); the written checkpoint is a model file at step 0 whose provenance
names the source, which ``galgen train --init`` fine-tunes (with a config whose ``model`` section matches the grown
model). With ``--companion --warm-start DATA`` the encoder is first taught where each
training galaxy's companion is (:func:`galgen.models.warm_start_companion`; the companion
fades in ELBO training without it):

    python pipelines/grow_vae.py --from pipelines/runs/sdss-vae-bd-gate/model.pt --companion \
        --warm-start sdss_rich_train_20k.h5 --epochs 8 --lr 3e-3 --out companion.pt
"""

from __future__ import annotations

import argparse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", required=True, help="run directory or checkpoint of the VAE")
    ap.add_argument("--out", required=True, help="checkpoint file to write")
    ap.add_argument("--symmetry-gate", choices=["network", "latent"],
                    help="add a symmetry gate (flux-shape decoder; 'latent' adds its latent coordinate)")
    ap.add_argument("--latents", type=int, default=0, help="latent dimensions to add")
    ap.add_argument("--scale", type=float, default=0.1,
                    help="factor on the default initialisation of the decoder's columns for the new latents [0.1]")
    ap.add_argument("--bulge-index", action="store_true",
                    help="make the bulge's Sersic index a latent coordinate (bulge + disk seed-latent VAEs; "
                         "galgen.models.add_bulge_index)")
    ap.add_argument("--companion", action="store_true",
                    help="add a companion galaxy to the decoder and its latent coordinates (seed-latent VAEs)")
    ap.add_argument("--warm-start", metavar="DATA",
                    help="with --companion: teach the encoder the companions of these training galaxies "
                         "(galgen.models.warm_start_companion), so that ELBO training starts with them")
    ap.add_argument("--threshold", type=float, default=20.0,
                    help="least signal-to-noise ratio of a residual source given a companion (--warm-start)")
    ap.add_argument("--epochs", type=int, default=3, help="warm-start passes over DATA")
    ap.add_argument("--lr", type=float, default=1e-3, help="warm-start learning rate (Adam)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the new weights (the gate's, the new columns)")
    args = ap.parse_args(argv)
    if not args.symmetry_gate and args.latents == 0 and not args.companion and not args.bulge_index:
        ap.error("nothing to grow: give --symmetry-gate, --latents N, --companion and/or --bulge-index")
    import torch

    from galgen.checkpoints import load_model, save_checkpoint
    from galgen.models import add_bulge_index, add_companion, add_latents, add_symmetry_gate

    source = load_model(args.source)
    torch.manual_seed(args.seed)  # the network gate's hidden layer takes PyTorch's default initialisation
    gen = torch.Generator().manual_seed(args.seed)
    model = add_symmetry_gate(source, args.symmetry_gate, generator=gen) if args.symmetry_gate else source
    if args.latents:
        model = add_latents(model, args.latents, scale=args.scale, generator=gen)
    if args.companion:
        model = add_companion(model, generator=gen)
    if args.bulge_index:
        model = add_bulge_index(model, generator=gen)
    if args.warm_start:
        if not args.companion:
            ap.error("--warm-start: needs --companion")
        import numpy as np

        from galgen.data import CutoutFile, ObservationLoader
        from galgen.models import warm_start_companion

        with CutoutFile(args.warm_start) as f:
            n = len(f)
        loader = ObservationLoader(args.warm_start, np.arange(n), list(model.conditions), in_memory=True)
        done = warm_start_companion(model, loader, epochs=args.epochs, lr=args.lr, threshold=args.threshold,
                                    generator=gen, log=print)
        print(f"warm start on {n} galaxies of {args.warm_start}: {done}")
    cfg = dict(source.run_config)
    cfg = {**cfg, "model": model.config} if "model" in cfg else model.config
    save_checkpoint(args.out, model_state=model.state_dict(), config=cfg,
                    provenance={**source.provenance, "grown_from": source.checkpoint_path})
    print(f"{args.out}: {source.checkpoint_path} grown (symmetry gate: {args.symmetry_gate}, "
          f"latents +{args.latents}, companion: {args.companion}, bulge index: {args.bulge_index})")


if __name__ == "__main__":
    main()
