"""Command-line interface: ``galgen <stage> [options]``.

The CLI is thin: each subcommand parses its arguments and calls the library
function that does the work (listed in each ``--help``). Errors caused by bad input
are printed as one line naming the file or argument, with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._version import __version__
from .errors import GalgenInputError, TrainingDiverged

__all__ = ["main", "build_parser"]


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_common(p, out_help):
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output made by another job")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: shown when stderr is a terminal)")


def _cmd_simulate(args):
    from .sharding import format_shard_path, parse_shard
    from .simulate import simulate

    shard = parse_shard(args.shard)
    out = format_shard_path(args.out, shard)
    path = simulate(out, survey=args.survey, n=args.n, stamp=args.stamp, seed=args.seed, shard=shard,
                    oversampling=args.oversampling, psf_size=args.psf_size, catalog=args.catalog,
                    workers=args.workers, progress=args.progress, overwrite=args.overwrite,
                    morphology=args.morphology)
    print(path)


def _cmd_merge(args):
    from .data import merge_shards

    print(merge_shards(args.inputs, args.out, overwrite=args.overwrite))


def _cmd_ingest(args):
    from .data.ingest import ingest_fits

    keys = tuple(k for k in (args.header_keys or "").split(",") if k)
    path = ingest_fits(args.inputs, args.out, pixel_scale=args.pixel_scale, survey=args.survey, psf=args.psf,
                       image_hdu=args.image_hdu, psf_hdu=args.psf_hdu, variance_hdu=args.variance_hdu,
                       weight_hdu=args.weight_hdu, mask_hdu=args.mask_hdu, stamp=args.stamp,
                       nonfinite=args.nonfinite, normalize_psf=args.normalize_psf, header_keys=keys,
                       overwrite=args.overwrite, progress=args.progress)
    print(path)


def _cmd_run(args):
    from .pipeline import format_run, run_pipeline

    sys.stdout.write(format_run(run_pipeline(args.config, args.out)))


def _cmd_summary(args):
    from .evaluation.report import format_summary, summarize_cutouts

    sys.stdout.write(format_summary(summarize_cutouts(args.path)))


def _cmd_preview(args):
    from .plotting import cutout_grid

    print(cutout_grid(args.path, args.out, n=args.n))


def _cmd_train(args):
    from .train import train

    overrides = {k: v for k, v in (("steps", args.steps), ("device", args.device), ("batch_size", args.batch_size),
                                   ("progress", args.progress), ("init", args.init)) if v is not None}
    summary = train(args.config, args.data, args.out, resume=args.resume, overrides=overrides)
    if summary.get("model") is not None:
        print(summary["model"])


def _cmd_sample(args):
    from .sample import sample_to_file

    print(sample_to_file(args.model, args.out, n=args.n, survey=args.survey, seed=args.seed, prior=args.prior,
                         cond=args.cond, device=args.device, batch_size=args.batch_size,
                         overwrite=args.overwrite))


def _cmd_anomaly(args):
    from .sample import anomaly_scores

    print(anomaly_scores(args.model, args.data, args.out, device=args.device, batch_size=args.batch_size,
                         overwrite=args.overwrite))


def _cmd_evaluate(args):
    from .evaluation.quality import evaluate_models

    baseline = None if args.baseline == "none" else args.baseline
    if not args.model and baseline is None:
        raise GalgenInputError("--model: give at least one model, or a --baseline")
    report = evaluate_models(args.model or [], args.data, args.out, n=args.n, seed=args.seed,
                             batch_size=args.batch_size, device=args.device, baseline=baseline,
                             image_c2st=not args.no_image_c2st, measure_on=args.measure_on)
    for label, t in report["targets"].items():
        summary = report["generation"][label]["summary"]
        w1, floor = (f"{v:.3f}" if v is not None else "-" for v in (summary["w1_mean"], summary["w1_floor_mean"]))
        print(f"{label}: mean W1 {w1} (floor {floor}), "
              f"C2ST {report['c2st'][label]['accuracy']:.3f}; W1 > 2x floor: {', '.join(t['missed']) or 'none'}")
    print(Path(args.out) / "report.html")


def _cmd_fit(args):
    from .inference.fit import RHAT_THRESHOLD, fit_file, fit_summary
    from .inference.importance import K_HAT_THRESHOLD
    from .sharding import format_shard_path, parse_shard

    shard = parse_shard(args.shard) if args.shard else None
    out = format_shard_path(args.out, shard) if shard else args.out
    path = fit_file(args.model, args.data, out, samples=args.samples, chains=args.chains, warmup=args.warmup,
                    n_leapfrog=args.n_leapfrog, metric=args.metric, sampler=args.sampler, max_depth=args.max_depth,
                    posterior=args.posterior, optimizer=args.optimizer, proposal=args.proposal,
                    min_ess=args.min_ess or None, max_draws=args.max_draws, fallback=args.fallback, scale=args.scale,
                    shard=shard,
                    device=args.device, batch_size=args.batch_size, restarts=args.restarts, max_iter=args.max_iter,
                    seed=args.seed, prior=args.prior, overwrite=args.overwrite, limit=args.limit,
                    progress=sys.stderr.isatty() if args.progress is None else args.progress)
    s = fit_summary(path)
    line = f"{path.name}: {s['galaxies']} galaxies, median chi2/dof {s['median_reduced_chi2']:.3f}"
    if "by_method" in s:
        line += ("; posteriors: " + ", ".join(f"{n} {m}" for m, n in s["by_method"].items())
                 + f"; {s['flagged']} flagged (is: k > {K_HAT_THRESHOLD}; nuts/hmc: R-hat >= {RHAT_THRESHOLD})")
    print(line, file=sys.stderr)
    print(path)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``galgen`` command.

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="galgen", description="galgen: generative models of galaxy morphology in a physical forward model.")
    parser.add_argument("--version", action="version", version=f"galgen {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="<stage>", required=True)

    p = sub.add_parser("simulate", help="simulate galaxy cutouts with GalSim",
                       description="Simulate a training set with GalSim (galgen.simulate.simulate). "
                                   "Deterministic: the same seed gives identical arrays; shards are disjoint "
                                   "and 'galgen merge' joins them into the unsharded file.")
    p.add_argument("--survey", default="sdss", help="preset (sdss, sdss-deep, lsst, hst) or survey YAML file [sdss]")
    p.add_argument("--n", type=_positive_int, default=1000, help="galaxies in the whole run [1000]")
    p.add_argument("--stamp", type=_positive_int, default=64, help="stamp size in detector pixels [64]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--shard", default=None,
                   help="k/N: write only part k (0-based) of N; 'slurm' reads SLURM_ARRAY_TASK_ID/COUNT")
    p.add_argument("--oversampling", type=_positive_int, default=1,
                   help="intrinsic pixels per detector pixel [1]")
    p.add_argument("--psf-size", type=_positive_int, default=None,
                   help="PSF grid size in intrinsic pixels [stamp]")
    p.add_argument("--catalog", default=None, help="population catalog (default: the survey's bundled one)")
    p.add_argument("--workers", type=_positive_int, default=1, help="rendering processes [1]")
    p.add_argument("--morphology", choices=["bulge-disk", "rich"], default="bulge-disk",
                   help="rich: spiral arms, bars, lopsided disks, dust lanes, clumpy irregulars and companions "
                        "from the catalog; bulge-disk: bulge + disk + knots only [bulge-disk]")
    _add_common(p, "output HDF5 file; {k} and {N} are replaced by the shard numbers")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("merge", help="join the shards of one run into one cutout or fit file",
                       description="Concatenate the shards of one 'galgen simulate --shard' or 'galgen fit --shard' "
                                   "job into the file the unsharded run writes (galgen.data.merge_shards; the kind "
                                   "of file is read from the inputs).")
    p.add_argument("inputs", nargs="+", help="shard files of one job, in any order")
    _add_common(p, "merged HDF5 file; for fit files the FITS catalog is written beside it with suffix .fits")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("ingest", help="convert FITS cutouts to a cutout file",
                       description="Convert FITS cutouts (image, PSF, variance or weight, mask HDUs) into the "
                                   "galgen HDF5 format (galgen.data.ingest.ingest_fits).")
    p.add_argument("inputs", nargs="+", help="FITS files, one galaxy each")
    p.add_argument("--pixel-scale", type=float, default=None, help="arcsec/pixel (default: from WCS or PIXSCALE)")
    p.add_argument("--survey", default="unknown", help="survey name stored in the file")
    p.add_argument("--psf", default=None, help="FITS file of a PSF shared by all galaxies")
    p.add_argument("--image-hdu", default=None, help="image HDU name or index (default: first 2-d image)")
    p.add_argument("--psf-hdu", default="PSF", help="PSF HDU name in each file [PSF]")
    p.add_argument("--variance-hdu", default="VARIANCE", help="variance HDU name [VARIANCE]")
    p.add_argument("--weight-hdu", default="IVAR", help="inverse-variance HDU name, if no variance [IVAR]")
    p.add_argument("--mask-hdu", default="MASK", help="mask HDU name (non-zero = bad) [MASK]")
    p.add_argument("--stamp", type=_positive_int, default=None, help="centre-crop to this size")
    p.add_argument("--nonfinite", choices=("mask", "raise"), default="mask",
                   help="NaN/inf pixels: mask them with a warning, or refuse the file [mask]")
    p.add_argument("--normalize-psf", action="store_true", help="normalise PSFs that do not sum to 1")
    p.add_argument("--header-keys", default="", help="comma-separated header keywords copied to the catalog")
    _add_common(p, "output HDF5 file")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("run", help="run a pipeline from a YAML config",
                       description="Run the stages of a pipeline configuration (galgen.pipeline.run_pipeline): "
                                   "simulate or ingest, train, sample, fit, evaluate, report. The whole file is "
                                   "checked before anything runs; stages whose configuration and inputs are "
                                   "unchanged are skipped (OUT/manifest.json), a killed run is completed by "
                                   "running it again. Prints where the outputs are.")
    p.add_argument("config", help="pipeline YAML, e.g. pipelines/sdss_demo.yaml")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", help="train an AE, VAE or WGAN-GP on a cutout file",
                       description="Train a generative model (galgen.train.train). The YAML has a 'model:' section "
                                   "(kind: ae, vae, gan or wgan-gp, and its options) and a 'train:' section (steps, "
                                   "batch_size, lr, device, precision, ...). Under torchrun, processes split each "
                                   "batch and average gradients (NCCL on GPUs, gloo on CPUs).")
    p.add_argument("--config", required=True, help="training YAML, e.g. pipelines/configs/vae_sdss.yaml")
    p.add_argument("--data", required=True, help="cutout file of training galaxies")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, model.pt)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/last.pt")
    p.add_argument("--steps", type=_positive_int, default=None, help="override train.steps")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="override train.batch_size")
    p.add_argument("--device", default=None, help="override train.device (auto, cuda, cuda:N, mps, cpu)")
    p.add_argument("--init", default=None, help="override train.init: start from the weights of this run directory "
                                                "or checkpoint (fine-tuning; same model config)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="draw new galaxies from a trained model and observe them",
                       description="Sample intrinsic galaxies from a model (run directory, checkpoint or "
                                   "pretrained name) and observe them with a survey preset's PSFs and noise; "
                                   "writes a cutout file (galgen.sample.sample_to_file).")
    p.add_argument("--model", required=True, help="run directory, .pt file or pretrained name (e.g. sdss-vae)")
    p.add_argument("--n", type=_positive_int, default=1000, help="galaxies [1000]")
    p.add_argument("--survey", default=None, help="preset or survey YAML (default: the training data's survey)")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--prior", choices=("flow", "mixture", "normal"), default=None,
                   help="VAE latent prior: the fitted flow (default when fitted), the code mixture (perturbed "
                        "training galaxies, where fitted) or N(0, I)")
    p.add_argument("--cond", default=None,
                   help="conditions, e.g. 'mag=17.5,hlr=1.2' (conditional models; default: each galaxy draws a "
                        "row of the training conditions the model stores)")
    p.add_argument("--device", default="auto", help="device [auto]")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="galaxies per batch [256]")
    _add_common(p, "output cutout file (HDF5)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("anomaly", help="score how badly a model explains each galaxy",
                       description="Anomaly score (reduced chi-square of each galaxy's reconstruction through "
                                   "the physics layer) of an AE or VAE, written as a catalog "
                                   "(galgen.sample.anomaly_scores).")
    p.add_argument("--model", required=True, help="run directory, .pt file or pretrained name")
    p.add_argument("--data", required=True, help="cutout file")
    p.add_argument("--device", default="auto", help="device [auto]")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="galaxies per batch [256]")
    _add_common(p, "output catalog (.fits or .ecsv)")
    p.set_defaults(func=_cmd_anomaly)

    p = sub.add_parser("evaluate", help="quality report of generative models on held-out cutouts",
                       description="Morphology statistics (flux, HSM size and ellipticity, r50, concentration, "
                                   "asymmetry, smoothness, Gini, M20, power spectra) of generated galaxies "
                                   "observed through the held-out galaxies' PSFs and noise, against the real "
                                   "ones: KS and normalised Wasserstein distances beside the real-vs-real "
                                   "floor, classifier two-sample tests, binned comparisons, reconstructions "
                                   "(AE, VAE), and a parametric baseline (galgen.evaluation.evaluate_models). "
                                   "Writes report.md, report.html, quality.json and the figures.")
    p.add_argument("--model", action="append",
                   help="run directory, .pt file or pretrained name (repeat for several models, one table)")
    p.add_argument("--baseline", choices=("sersic", "bulge-disk", "none"), default="sersic",
                   help="parametric baseline: fits of other held-out galaxies, redrawn [sersic]")
    p.add_argument("--no-image-c2st", action="store_true", help="skip the CNN classifier test on the stamps")
    p.add_argument("--measure-on", choices=("auto", "noiseless", "observed"), default="auto",
                   help="images the statistics are measured on: noise-free (simulated files), noisy with their "
                        "variance (what a survey shows), or noise-free where the file has them [auto]")
    p.add_argument("--data", required=True, help="held-out cutout file")
    p.add_argument("--n", type=_positive_int, default=5000, help="galaxies evaluated [5000]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--device", default="auto", help="device [auto]")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="galaxies per batch [256]")
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("fit", help="MAP fits and posterior samples of observed galaxies",
                       description="Fit each galaxy of a cutout file with a trained model "
                                   "(galgen.inference.fit.fit_file): batched MAP of the latent code and flux "
                                   "scale, residual maps, chi2/dof and flags; with --samples, batched HMC "
                                   "posterior samples with R-hat, ESS and posterior predictive mean/std "
                                   "images. Writes an HDF5 fit file and a FITS catalog beside it; a killed "
                                   "run restarted with the same arguments finishes only what is missing.")
    p.add_argument("--model", required=True,
                   help="run directory, .pt file, pretrained name, or 'sersic' / 'bulge-disk' for a "
                        "parametric baseline fit")
    p.add_argument("--data", required=True, help="cutout file of observations")
    p.add_argument("--samples", type=int, default=0, help="posterior draws per chain (0: MAP only) [0]")
    p.add_argument("--chains", type=_positive_int, default=4, help="HMC chains per galaxy [4]")
    p.add_argument("--warmup", type=int, default=None, help="HMC warm-up iterations [= --samples]")
    p.add_argument("--n-leapfrog", type=_positive_int, default=16, help="leapfrog steps per HMC trajectory [16]")
    p.add_argument("--metric", choices=("diag", "dense"), default="diag",
                   help="HMC mass matrix: per-chain diagonal, or dense per galaxy for correlated parameters [diag]")
    p.add_argument("--posterior", choices=("is", "laplace", "nuts", "hmc"), default="is",
                   help="posterior method with --samples: importance sampling from the Laplace approximation "
                        "with PSIS diagnostics and NUTS where they fail, the Laplace approximation itself, "
                        "NUTS, or HMC of --n-leapfrog steps [is]")
    p.add_argument("--proposal", choices=("auto", "laplace", "amortized"), default="auto",
                   help="--posterior is: propose from the Laplace approximation alone, or from a mixture with "
                        "the model's amortised posterior (auto: where the model ships one; laplace is faster but "
                        "misses modes of the shape, see docs/inference.md) [auto]")
    p.add_argument("--min-ess", type=float, default=200.0,
                   help="--posterior is: galaxies go on drawing, in rounds from proposals adapted to their draws, "
                        "until this effective sample size (0: the first round's proposals only) [200]")
    p.add_argument("--max-draws", type=_positive_int, default=None,
                   help="--posterior is with --min-ess: proposals per galaxy at most [16x the first round's]")
    p.add_argument("--fallback", choices=("nuts", "none"), default="nuts",
                   help="--posterior is: NUTS for the galaxies whose Pareto k stays above 0.7, or none (their "
                        "weighted draws are kept, flagged by pareto_k) [nuts]")
    p.add_argument("--scale", choices=("auto", "redraw", "integrated", "joint", "fixed"), default="auto",
                   help="the log flux scale: proposed with the latents and redrawn from its exact conditional, "
                        "integrated out, proposed only, or fixed: held at 0, the model's own brightness, in the "
                        "MAP too (no NUTS fallback; removes the ridge of sdss-vae posteriors along which its latent "
                        "brightness trades off against the scale); auto: fixed where the data are in the flux "
                        "units of the model's training set (same survey, band, zero point, pixel scale, ADU), "
                        "else redraw [auto]")
    p.add_argument("--sampler", choices=("hmc", "nuts"), default=None,
                   help="deprecated: --posterior hmc|nuts")
    p.add_argument("--optimizer", choices=("auto", "lm", "adam", "lbfgs"), default="auto",
                   help="MAP optimiser: the model's own (Levenberg-Marquardt for sersic/bulge-disk, Adam for "
                        "deep decoders), or one of them [auto]")
    p.add_argument("--max-depth", type=_positive_int, default=8,
                   help="NUTS: at most 2^depth - 1 leapfrog steps per draw [8]")
    p.add_argument("--restarts", type=int, default=0, help="random MAP restarts besides the encoder's [0]")
    p.add_argument("--max-iter", type=_positive_int, default=None,
                   help="MAP iterations at most [100 for lm, 500 for adam/lbfgs]")
    p.add_argument("--prior", choices=("flow", "normal"), default=None,
                   help="VAE latent prior [the model's map_prior: N(0, I) for flux-shape VAEs with seed latents, "
                        "else the flow if fitted]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--shard", default=None, help="k/N: fit only part k (0-based) of N; 'slurm' reads the array")
    p.add_argument("--limit", type=_positive_int, default=None, help="fit only the first LIMIT galaxies (of the shard)")
    p.add_argument("--device", default="auto", help="device [auto]")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="galaxies per batch [64 on a CPU, 512 on a GPU]")
    _add_common(p, "fit file (HDF5); the catalog is written with suffix .fits; {k}/{N} are shard numbers")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("summary", help="print a summary of a cutout file")
    p.add_argument("path", help="cutout file")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("preview", help="save a PNG grid of cutouts")
    p.add_argument("path", help="cutout file")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--n", type=_positive_int, default=8, help="galaxies shown [8]")
    p.set_defaults(func=_cmd_preview)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``galgen`` command.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 2 on bad input.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (GalgenInputError, TrainingDiverged) as exc:
        print(f"galgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
