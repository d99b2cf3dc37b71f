"""Start a bulge + disk-seeded flux-shape VAE from a trained Sersic-seeded one.

    python pipelines/reseed_bulge_disk.py --from pipelines/runs/sdss-vae-fs --out reseeded.pt
    galgen train --config pipelines/configs/vae_sdss_bulgedisk.yaml --data sdss_rich_train_50k.h5 \\
        --out pipelines/runs/sdss-vae-bd --init reseeded.pt

Every weight of the source is kept (:func:`galgen.models.reseed_bulge_disk`); the written
checkpoint is a model file at step 0 whose provenance names the source, which
``galgen train --init`` fine-tunes.
"""

from __future__ import annotations

import argparse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", required=True, help="run directory or checkpoint of the Sersic-seeded VAE")
    ap.add_argument("--out", required=True, help="checkpoint file to write")
    ap.add_argument("--seed-latents", action="store_true",
                    help="make the seed parameters the first latent coordinates (the source may be bulge + disk-seeded)")
    args = ap.parse_args(argv)
    from galgen.checkpoints import load_model, save_checkpoint
    from galgen.models import reseed_bulge_disk

    source = load_model(args.source)
    model = reseed_bulge_disk(source, seed_latents=args.seed_latents)
    cfg = dict(source.run_config)
    cfg = {**cfg, "model": model.config} if "model" in cfg else model.config
    save_checkpoint(args.out, model_state=model.state_dict(), config=cfg,
                    provenance={**source.provenance, "reseeded_from": source.checkpoint_path})
    print(f"{args.out}: bulge + disk-seeded copy of {source.checkpoint_path}")


if __name__ == "__main__":
    main()
