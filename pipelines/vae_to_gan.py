"""Start a GAN from a trained VAE: its flow prior and decoder become the generator, the critic is new.

    python pipelines/vae_to_gan.py --vae pipelines/runs/sdss-vae-bd-comp-map/model.pt \\
        --config pipelines/configs/gan_sdss_rich_vae.yaml --out runs/gan-vae-init
    galgen train --config runs/gan-vae-init/config.yaml --data rich_train.h5 --out runs/gan-vae

The GAN (:meth:`galgen.models.GAN.from_vae`, ``head: vae``) draws ``z ~ N(0, I)``, maps it
through the VAE's flow prior to a code and decodes it: before training it draws exactly
the VAE's flow-prior galaxies. ``--config`` is a ``galgen train`` recipe whose ``model``
section gives the GAN's options (loss, critic, EMA, R1; ``kind`` must be ``gan``, and
``stamp``, ``latent_dim``, ``oversampling``, ``head`` and ``vae`` come from the VAE). The
script writes ``init.pt`` (the GAN, its critic initialised with ``--seed``) and
``config.yaml`` (the recipe with the GAN's full model configuration and ``train.init``
pointing at ``init.pt``) into ``--out``, both atomically, so that ``galgen train`` fine-tunes
the generator adversarially, with the critic looking through the physics layer, like any
other run (exact resume, validation KS, ``best.pt``).
"""

from __future__ import annotations

import argparse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", required=True, help="run directory, checkpoint or pretrained name of the VAE")
    ap.add_argument("--config", required=True, help="galgen train recipe (YAML) of the GAN")
    ap.add_argument("--out", required=True, help="directory to write init.pt and config.yaml into")
    ap.add_argument("--seed", type=int, default=0, help="seed of the critic's initial weights [0]")
    args = ap.parse_args(argv)
    from pathlib import Path

    import torch
    import yaml

    from galgen.checkpoints import save_checkpoint
    from galgen.errors import GalgenInputError
    from galgen.models import GAN, VAE
    from galgen.data import atomic_output
    from galgen.runtime import resolve_model

    vae = resolve_model(args.vae, "cpu")
    if not isinstance(vae, VAE):
        raise GalgenInputError(f"--vae: {args.vae} is not a VAE")
    try:
        recipe = yaml.safe_load(Path(args.config).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise GalgenInputError(f"--config: cannot read {args.config} ({exc})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("model"), dict):
        raise GalgenInputError(f"--config: {args.config} has no 'model' section")
    options = dict(recipe["model"])
    if options.pop("kind", "gan") != "gan":
        raise GalgenInputError(f"--config: {args.config}: model.kind must be 'gan'")
    if options.pop("head", "vae") != "vae":
        raise GalgenInputError(f"--config: {args.config}: model.head must be 'vae' (or left out)")
    torch.manual_seed(args.seed)
    gan = GAN.from_vae(vae, **options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = {"generator_from": str(getattr(vae, "checkpoint_path", args.vae)), "critic_seed": args.seed,
                  "vae_provenance": getattr(vae, "provenance", {})}
    save_checkpoint(out / "init.pt", model_state=gan.state_dict(), config=gan.config, provenance=provenance)
    train = {**(recipe.get("train") or {}), "init": str((out / "init.pt").resolve())}
    with atomic_output(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"model": gan.config, "train": train}, sort_keys=False))
    print(f"{out / 'init.pt'}: a GAN whose generator is {args.vae}'s flow prior and decoder; train it with\n"
          f"    galgen train --config {out / 'config.yaml'} --data <training file> --out <run directory>")


if __name__ == "__main__":
    main()
