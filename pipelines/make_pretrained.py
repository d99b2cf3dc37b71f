#!/usr/bin/env python
"""Install a trained model as a galgen pretrained model, with its model card.

    python pipelines/make_pretrained.py --run runs/sdss-vae --name sdss-vae \
        --quality report/quality.json --simulate "galgen simulate --survey sdss --n 50000 ..."

Writes the run's final checkpoint (or ``--checkpoint best.pt``) as weights, config,
provenance and metrics, without optimiser state, to
``galgen/pretrained/<name>.pt`` after checking that it loads safely, and writes
``galgen/pretrained/<name>.json``: the training configuration, how to regenerate the
training data, the machine it was trained on, the training length, the quality
figures measured on held-out galaxies by ``galgen evaluate`` and, for GANs, the
population figures of ``benchmarks/bench_gan_recipes.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from galgen.checkpoints import save_checkpoint
from galgen.data.atomic import atomic_output
from galgen.pretrained import PRETRAINED_DIR
from galgen.train import load_checkpoint, load_model
from galgen.train.logs import TRAIN_LOG, read_log


def training_stages(path, ck, init_card=None) -> list:
    """The run of ``path`` and, for a fine-tuned run (``train.init``), the runs it started from.

    A run initialised from an installed pretrained model names that model's card
    (``init_card``, e.g. ``"sdss-vae-v1"``): its stages are taken from the card, since the
    file the run recorded may since have been replaced by the new model. A checkpoint made
    by a conversion (``reseeded_from``, :func:`galgen.models.reseed_bulge_disk`) leads to
    the checkpoint it was converted from; a stage whose directory kept no training log has
    no wall time.
    """
    from galgen.pretrained import model_card

    stages = []
    seen = set()
    while True:
        run = Path(path).parent
        log = [row for row in read_log(run / TRAIN_LOG) if int(row["step"]) <= int(ck["step"])
               ] if (run / TRAIN_LOG).exists() else []
        train = ck["config"]["train"]
        if int(ck["step"]) > 0:  # a converted checkpoint trained no steps of its own
            stages.insert(0, _stage(run, int(ck["step"]), train, log))
        init = ck["provenance"].get("reseeded_from") or ck["provenance"].get("init")
        if init and init_card:
            return [*model_card(init_card)["stages"], *stages]
        if not init or init in seen:
            return stages
        seen.add(init)
        path, ck = init, load_checkpoint(init)


def run_stage(run: Path) -> dict:
    """One training stage from a run directory's ``config.yaml`` and ``train_log.csv``."""
    import yaml

    from galgen.errors import GalgenInputError

    try:
        train = yaml.safe_load((run / "config.yaml").read_text())["train"]
        log = read_log(run / TRAIN_LOG)
    except (OSError, KeyError, TypeError, GalgenInputError) as exc:
        raise SystemExit(f"--stages: {run} is not a training run directory ({exc})") from None
    if not log:
        raise SystemExit(f"--stages: {run / TRAIN_LOG} is empty")
    return _stage(run, int(log[-1]["step"]), train, log)


def _stage(run: Path, steps: int, train: dict, log: list) -> dict:
    """A card's record of a stage: its steps, images, wall time (the log's last row) and rates."""
    return {"run": str(run), "steps": steps, "images_seen": steps * int(train["batch_size"]),
            "wall_s": float(log[-1]["wall_s"]) if log else None,
            "train": {k: train.get(k) for k in ("lr", "lr_schedule", "lr_warmup", "lr_min", "batch_size")
                      if train.get(k) is not None}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--run", required=True, help="training run directory (with model.pt)")
    ap.add_argument("--name", required=True, help="pretrained name, e.g. sdss-vae")
    ap.add_argument("--quality", default=None, help="quality.json written by galgen evaluate")
    ap.add_argument("--quality-key", default=None, help="name of this model inside quality.json")
    ap.add_argument("--simulate", required=True, help="the galgen simulate command that made the training data")
    ap.add_argument("--machine", default=None, help="where it was trained (default: this machine)")
    ap.add_argument("--diagnostics", default=None,
                    help="JSON of benchmarks/bench_gan_recipes.py: the GAN population figures (KS of flux, "
                         "size, |e| on held-out galaxies) and the cost per step, stored in the card")
    ap.add_argument("--init-card", default=None,
                    help="the pretrained model the run was fine-tuned from (train.init), e.g. sdss-vae-v1: "
                         "its training stages are taken from its card")
    ap.add_argument("--note", default=None, help="free text for the card (e.g. how the run may be continued)")
    ap.add_argument("--earlier", default=None,
                    help="a checkpoint of the run the recorded chain started from, where the chain does not lead "
                         "there (e.g. a run's init file later replaced): its stages are put first")
    ap.add_argument("--stages", nargs="+", default=None,
                    help="run directories (config.yaml, train_log.csv) of the training stages in order, after "
                         "--init-card's, for chains whose intermediate files (grown or converted checkpoints) "
                         "were not kept; replaces the chain the checkpoint records")
    ap.add_argument("--weights", default=None,
                    help="install this checkpoint instead of the run's: one made from the run's final model "
                         "without training (e.g. its prior refitted by pipelines/refit_prior.py)")
    ap.add_argument("--checkpoint", default="model.pt",
                    help="the run's checkpoint to install: model.pt (final), or e.g. best.pt, whose optimiser "
                         "state is dropped [model.pt]")
    args = ap.parse_args()
    run = Path(args.run)
    src = Path(args.weights) if args.weights else run / args.checkpoint
    load_model(src)  # refuses unsafe or inconsistent files
    ck = load_checkpoint(src)
    if ck["optimizer"] is not None and args.checkpoint == "model.pt":
        raise SystemExit(f"{src}: holds optimiser state; install a final model.pt")
    if args.stages:
        from galgen.pretrained import model_card

        stages = [*(model_card(args.init_card)["stages"] if args.init_card else []),
                  *(run_stage(Path(d)) for d in args.stages)]
    else:
        stages = training_stages(src, ck, args.init_card)
    if args.earlier:
        stages = [*training_stages(args.earlier, load_checkpoint(args.earlier)), *stages]
    card = {
        "name": args.name, "kind": ck["config"]["model"]["kind"], "galgen_version": ck["galgen_version"],
        "config": ck["config"], "provenance": ck["provenance"], "training_data_command": args.simulate,
        "steps": sum(st["steps"] for st in stages), "images_seen": sum(st["images_seen"] for st in stages),
        "training_wall_s": sum(st["wall_s"] or 0.0 for st in stages),
        "stages": stages,
        "machine": args.machine or f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "metrics": ck["metrics"],
    }
    if args.quality:
        q = json.loads(Path(args.quality).read_text())
        key = args.quality_key or args.name
        card["quality"] = {"data": q["data"], "n": q["n"],
                           "reconstruction": q["reconstruction"].get(key),
                           "generation": {k: v for k, v in q["generation"].items() if k.startswith(key)},
                           **{part: {k: v for k, v in q[part].items() if k.startswith(key)}
                              for part in ("c2st", "targets") if isinstance(q.get(part), dict)}}
    if args.diagnostics:
        card["diagnostics"] = json.loads(Path(args.diagnostics).read_text())
    if args.note:
        card["note"] = args.note
    PRETRAINED_DIR.mkdir(exist_ok=True)
    save_checkpoint(PRETRAINED_DIR / f"{args.name}.pt", model_state=ck["model"], config=ck["config"],
                    step=ck["step"], provenance=ck["provenance"], metrics=ck["metrics"])  # atomic
    with atomic_output(PRETRAINED_DIR / f"{args.name}.json") as tmp:
        tmp.write_text(json.dumps(card, indent=2, default=str))
    print(PRETRAINED_DIR / f"{args.name}.pt")


if __name__ == "__main__":
    main()
