"""Fit a trained VAE's latent flow prior again, on a cutout file, without training it.

    python pipelines/grow_vae.py --from galgen/pretrained/sdss-vae-bd.pt --symmetry-gate latent --out gated.pt
    python pipelines/refit_prior.py --model gated.pt --data sdss_rich_train_20k.h5 --out gated_prior.pt

The flow is fitted as ``galgen train`` fits it after training (the same
:meth:`~galgen.models.VAE.aggregate_posterior` codes, ``prior_samples`` draws per galaxy
and ``prior_epochs``; ``--transforms`` and ``--hidden`` fit a flow of another size); with a
latent symmetry gate, the gate's coordinate of each code
comes from :meth:`~galgen.models.VAE.gate_posterior`. With ``--codes map`` the flow is
fitted instead to each galaxy's MAP code (:func:`galgen.inference.map_codes`: a fit of the
code to the galaxy's data from the encoder's guess, ``--map-steps`` Adam steps at most):
where the encoder has not learned a kind of galaxy the fit still gives it its code.
``--save-codes`` writes the codes (a tensor file) and ``--load-codes`` reads them back
(several files: their codes together), so that flows of other sizes can be fitted to the
same codes, or codes of several runs to one flow. ``--mixture`` also fits the code-mixture
prior (:meth:`~galgen.models.VAE.fit_code_mixture`): a Gaussian at each galaxy's MAP code with
its encoder's widths times ``--bandwidth`` (by default the factor at which its draws are as
far from the codes as held-out codes are; the codes must be those of the first ``--n``
galaxies of ``--data``, in order: ``--codes map`` or their ``--load-codes``), and
``--keep-flow`` leaves the model's flow as it is. The written model keeps the source's
configuration and provenance, with the refit recorded in it.
"""

from __future__ import annotations

import argparse


def _bandwidth(value: str):
    """``--bandwidth``: "match" or a positive number."""
    if value == "match":
        return value
    try:
        factor = float(value)
    except ValueError:
        factor = float("nan")
    if not factor > 0 or factor == float("inf"):
        raise argparse.ArgumentTypeError(f"'match' or a positive number, got {value!r}")
    return factor


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="run directory, checkpoint or pretrained name of the VAE")
    ap.add_argument("--data", required=True, help="cutout file whose galaxies' codes the flow is fitted to")
    ap.add_argument("--out", required=True, help="checkpoint file to write")
    ap.add_argument("--n", type=int, default=None, help="first N galaxies of the file (default all)")
    ap.add_argument("--samples", type=int, default=4, help="draws from each galaxy's posterior [4]")
    ap.add_argument("--codes", choices=("posterior", "map"), default="posterior",
                    help="fit the flow to the encoder's posterior draws [posterior] or to MAP codes")
    ap.add_argument("--map-steps", type=int, default=300, help="Adam steps of each MAP fit at most [300]")
    ap.add_argument("--save-codes", help="write the codes the flow is fitted to (torch tensor file)")
    ap.add_argument("--load-codes", nargs="+", help="fit the flow to these codes instead (--save-codes files, "
                                                    "concatenated)")
    ap.add_argument("--mixture", action="store_true",
                    help="also fit the code-mixture prior: a Gaussian at each MAP code with the encoder's widths")
    ap.add_argument("--bandwidth", default="match", type=_bandwidth,
                    help="factor on the mixture's widths, or 'match': draws as far from the codes as held-out "
                         "codes are [match]")
    ap.add_argument("--keep-flow", action="store_true", help="leave the model's flow prior as it is")
    ap.add_argument("--epochs", type=int, default=60, help="epochs of the flow's fit [60]")
    ap.add_argument("--patience", type=int, default=10, help="epochs without validation gain before stopping [10]")
    ap.add_argument("--transforms", type=int, default=None, help="a new flow with this many transforms "
                                                                  "(default: the model's)")
    ap.add_argument("--hidden", type=int, nargs="+", default=None, help="a new flow with these hidden layer "
                                                                        "sizes (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import logging

    import numpy as np
    import torch

    from galgen.checkpoints import save_checkpoint
    from galgen.data import ObservationLoader
    from galgen.errors import GalgenInputError
    from galgen.models import VAE, LatentFlowPrior
    from galgen.runtime import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = resolve_model(args.model, "cpu")
    if not isinstance(model, VAE):
        raise GalgenInputError(f"--model: {args.model} is not a VAE (no latent flow prior to fit)")
    size = {k: v for k, v in (("transforms", args.transforms), ("hidden", args.hidden)) if v is not None}
    if size:  # another flow: the config follows
        model.config["prior"] = {**model.config.get("prior", {}), **size}
        model.latent_flow = LatentFlowPrior(model.latent_dim, model.cond_dim, **model.config["prior"])
    loader = ObservationLoader(args.data, None, model.conditions)
    n = len(loader) if args.n is None else min(args.n, len(loader))
    if n < len(loader):
        loader = ObservationLoader(args.data, np.arange(n), model.conditions)
    torch.manual_seed(args.seed)
    if args.load_codes:
        parts = [torch.load(path, weights_only=True) for path in args.load_codes]
        for path, part in zip(args.load_codes, parts):
            if not isinstance(part, torch.Tensor) or part.ndim != 2 or part.shape[1] != model.latent_dim:
                raise GalgenInputError(f"--load-codes: {path} holds no (N, {model.latent_dim}) tensor")
        codes, cond, n = torch.cat(parts), None, sum(len(part) for part in parts)
        if model.cond_dim:
            raise GalgenInputError("--load-codes: a conditional model's codes need their conditions; refit it "
                                   "from --data")
    elif args.codes == "map":
        from galgen.inference import map_codes
        codes, cond = map_codes(model.eval(), loader.iter_batches(250), max_iter=args.map_steps,
                                log=logging.getLogger("refit_prior").info)
    else:
        codes, cond = model.aggregate_posterior(loader.iter_batches(args.batch_size),
                                                samples_per_galaxy=args.samples)
    if args.save_codes:
        torch.save(codes, args.save_codes)
    if args.mixture:
        if not (args.load_codes or args.codes == "map"):
            raise GalgenInputError("--mixture: its centres are MAP codes (--codes map, or --load-codes of them)")
        if len(codes) != len(loader):
            raise GalgenInputError(f"--mixture: {len(codes)} codes for the {len(loader)} galaxies of --data "
                                   f"{args.data} (--n {args.n}): the codes must be those galaxies', in order")
        model.eval()
        with torch.no_grad():
            widths = torch.cat([(0.5 * model.encoder_moments(b.observed, b.cond)[1].float()).exp()
                                for b in loader.iter_batches(args.batch_size)])
        mix = model.fit_code_mixture(codes, widths, bandwidth=args.bandwidth,
                                     generator=torch.Generator().manual_seed(args.seed))
    hist = {} if args.keep_flow else model.fit_prior(codes, cond, epochs=args.epochs, patience=args.patience,
                                                     generator=torch.Generator().manual_seed(args.seed))
    metrics = {**getattr(model, "metrics", {}),
               **({} if args.keep_flow else {"prior_val_nll": hist.get("best_val_loss")})}
    provenance = {**getattr(model, "provenance", {}),
                  "prior_refit": {"data": str(args.data), "n": n, "samples": args.samples, "epochs": args.epochs,
                                  "flow": "kept" if args.keep_flow else "refitted",
                                  **({"mixture": {"components": len(codes), "widths": "encoder", **mix}}
                                     if args.mixture else {}),
                                  "codes": (f"loaded from {', '.join(args.load_codes)}" if args.load_codes
                                            else args.codes),
                                  **({"map_steps": args.map_steps} if args.codes == "map" and not args.load_codes
                                     else {}),
                                  "patience": args.patience, "prior": model.config.get("prior"),
                                  "seed": args.seed, "from": str(getattr(model, "checkpoint_path", args.model))}}
    cfg = dict(getattr(model, "run_config", {}) or {})
    cfg = {**cfg, "model": model.config} if "model" in cfg else model.config
    save_checkpoint(args.out, model_state=model.state_dict(), config=cfg, provenance=provenance, metrics=metrics)
    source = f"{len(args.load_codes)} file(s)" if args.load_codes else f"{n} galaxies"
    if not args.keep_flow:
        print(f"{args.out}: flow prior fitted to {len(codes)} codes of {source} (validation nll "
              f"{hist.get('best_val_loss')})")
    if args.mixture:
        print(f"{args.out}: code mixture of {len(codes)} components, bandwidth {mix['bandwidth']:.3g} x the "
              f"encoder's widths (median {float(widths.median()):.3g})")


if __name__ == "__main__":
    main()
