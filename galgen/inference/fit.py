"""The ``galgen fit`` stage: MAP fits and posterior samples of every galaxy of a cutout file.

Galaxies are fitted in batches (one batched decoder and physics-layer pass per
iteration for the whole batch). Results stream into ``<out>.partial`` batch by batch;
a killed run restarted with the same arguments continues after the last finished batch
and, since every batch has its own seeds, ends with the very file an uninterrupted run
writes. The HDF5 fit file holds MAP latents, model images, residual maps, chi-square,
flags and (with ``samples > 0``) posterior samples, R-hat/ESS and posterior predictive
mean and standard deviation images; a FITS catalog of summary columns is written beside
it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.cutouts import CutoutFile, CutoutWriter, output_is_current
from ..errors import GalgenInputError
from .diagnostics import summarize_chains
from .hmc import hmc_sample
from .map import STATUS, _decode, _repeat_observation, fit_map, latent_log_prior

__all__ = ["FIT_SCHEMA", "FIT_DATASETS", "FitWriter", "fit_file", "posterior_log_prob"]

FIT_SCHEMA = "galgen-fits"

#: Datasets of a fit file: dtype, unit, grid, meaning (shapes per galaxy are set by the run).
FIT_DATASETS = {
    "index": ("int64", "", "scalar", "row of the galaxy in the data file"),
    "z": ("float32", "", "latent", "MAP latent code"),
    "log_scale": ("float32", "", "scalar", "MAP log flux scale multiplying the decoded galaxy"),
    "intrinsic": ("float32", "adu", "intrinsic", "MAP intrinsic (PSF-free) galaxy"),
    "model": ("float32", "adu", "detector", "MAP model of the observation (noise-free)"),
    "residual": ("float32", "adu", "detector", "data - model"),
    "normalized_residual": ("float32", "", "detector", "(data - model) / sigma; 0 on masked pixels"),
    "chi2": ("float64", "", "scalar", "chi-square of the MAP model over good pixels"),
    "dof": ("int32", "", "scalar", "good pixels minus fitted parameters"),
    "status": ("int8", "", "scalar", "0 converged, 1 max-iterations, 2 diverged, 3 no good pixels"),
    "n_iter": ("int32", "", "scalar", "optimiser iterations"),
    "samples": ("float32", "", "latent", "posterior samples (chains, draws, parameters): z, then log_scale"),
    "rhat": ("float32", "", "latent", "rank-normalised split R-hat per parameter"),
    "ess_bulk": ("float32", "", "latent", "bulk effective sample size per parameter"),
    "ess_tail": ("float32", "", "latent", "tail effective sample size per parameter"),
    "accept_rate": ("float32", "", "chains", "mean acceptance probability per chain"),
    "divergences": ("int32", "", "chains", "divergent transitions per chain"),
    "posterior_mean": ("float32", "adu", "detector", "posterior mean of the model observation"),
    "posterior_std": ("float32", "adu", "detector", "posterior standard deviation of the model observation"),
}


class FitWriter(CutoutWriter):
    """Atomic, resumable writer of fit files (the mechanics of :class:`galgen.data.CutoutWriter`).

    Parameters
    ----------
    path : str or os.PathLike
    n : int
    shapes : dict
        Per-galaxy shapes of the :data:`FIT_DATASETS` to create.
    attrs : dict
    fingerprint : str, optional
    """

    schema_name = FIT_SCHEMA
    datasets = FIT_DATASETS
    required = ("index", "z", "chi2", "status")


def posterior_log_prob(model, observation, observed, cond=None, prior=None, chains: int = 1):
    """The log posterior of (z, log_scale) rows, galaxy-major with ``chains`` rows per galaxy.

    Parameters
    ----------
    model : GenerativeModel
    observation : galgen.physics.Observation
        Of the ``G`` galaxies.
    observed : torch.Tensor
        ``(G, S, S)``.
    cond : torch.Tensor, optional
    prior : str, optional
    chains : int, optional

    Returns
    -------
    callable
        ``(G * chains, d + 1) -> (G * chains,)``.
    """
    G = len(observed)
    obs = _repeat_observation(observation, chains) if chains > 1 else observation
    data = observed.repeat(chains, 1, 1)
    c = None if cond is None else cond.repeat(chains, 1)

    def log_prob(x):
        d = x.shape[1] - 1
        xc = x.view(G, chains, d + 1).transpose(0, 1).reshape(chains * G, d + 1)  # chain-major
        z, s = xc[:, :d], xc[:, d]
        intr = _decode(model, z, c).float() * s.exp()[:, None, None]
        lp = obs.log_likelihood(intr, data) + latent_log_prior(model, z, c, prior)
        return lp.view(chains, G).transpose(0, 1).reshape(-1)

    return log_prob


def fit_file(model, data, out, *, samples: int = 0, chains: int = 4, warmup: int | None = None,
             n_leapfrog: int = 16, shard=None, device="auto", batch_size: int = 256, restarts: int = 1,
             max_iter: int = 500, seed: int = 0, prior: str | None = None, overwrite: bool = False) -> Path:
    """Fit every galaxy of a cutout file (``galgen fit``).

    Parameters
    ----------
    model : str, os.PathLike or GenerativeModel
        See :func:`galgen.sample.resolve_model`.
    data : str or os.PathLike
        Cutout file of observations.
    out : str or os.PathLike
        Fit file (HDF5); the catalog goes to ``out`` with suffix ``.fits``.
    samples : int, optional
        Posterior draws per chain (0: MAP only).
    chains : int, optional
    warmup : int, optional
        HMC warm-up iterations (default ``samples``).
    n_leapfrog : int, optional
    shard : galgen.sharding.Shard, optional
        Fit only this part of the file.
    device : str, optional
    batch_size : int, optional
    restarts : int, optional
        Random MAP restarts besides the encoder's guess.
    max_iter : int, optional
    seed : int, optional
    prior : {"flow", "normal"}, optional
        VAE latent prior.
    overwrite : bool, optional

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from ..sample import _device, resolve_model
    from ..train.data import TrainingData

    dev = _device(device)
    model = resolve_model(model, dev).eval()
    data = Path(data)
    with CutoutFile(data) as f:
        n_all = len(f)
        stamp, k = int(f.attrs["stamp_size"]), f.oversampling
        data_fp = str(f.attrs.get("fingerprint", ""))
    cfg = model.config
    if stamp != cfg["stamp"] or k != cfg["oversampling"]:
        raise GalgenInputError(f"{data}: stamp {stamp} / oversampling {k} differ from the model's "
                               f"{cfg['stamp']} / {cfg['oversampling']}")
    rows = np.arange(n_all) if shard is None else np.arange(*shard.bounds(n_all))
    n = len(rows)
    warmup = samples if warmup is None else warmup
    fp = json.dumps({"model": getattr(model, "checkpoint_path", repr(cfg)), "data": str(data.resolve()),
                     "data_fingerprint": data_fp, "rows": [int(rows[0]), int(rows[-1]) + 1] if n else [0, 0],
                     "samples": samples, "chains": chains, "warmup": warmup, "n_leapfrog": n_leapfrog,
                     "batch_size": batch_size, "restarts": restarts, "max_iter": max_iter, "seed": seed,
                     "prior": prior}, sort_keys=True)
    out = Path(out)
    catalog_path = out.with_suffix(".fits")
    if output_is_current(out, fp, overwrite) and catalog_path.exists():
        return out
    d = int(cfg["latent_dim"])
    shapes = {"index": (), "z": (d,), "log_scale": (), "intrinsic": (stamp * k, stamp * k),
              "model": (stamp, stamp), "residual": (stamp, stamp), "normalized_residual": (stamp, stamp),
              "chi2": (), "dof": (), "status": (), "n_iter": ()}
    if samples:
        shapes.update(samples=(chains, samples, d + 1), rhat=(d + 1,), ess_bulk=(d + 1,), ess_tail=(d + 1,),
                      accept_rate=(chains,), divergences=(chains,), posterior_mean=(stamp, stamp),
                      posterior_std=(stamp, stamp))
    attrs = {"model": str(getattr(model, "checkpoint_path", cfg["kind"])), "data": str(data),
             "model_kind": cfg["kind"], "stamp_size": stamp, "oversampling": k, "survey": "", "seed": seed}
    td = TrainingData(data, rows, model.conditions, in_memory=False, device=dev)
    wall = []
    with FitWriter(out, n=n, shapes=shapes, attrs=attrs, fingerprint=fp) as w:
        for start in range(w.n_done, n, batch_size):
            b = td.batch(torch.arange(start, min(start + batch_size, n)))
            gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + int(rows[start]))
            res = fit_map(model, b.observed, b.observation, cond=b.cond, restarts=restarts, max_iter=max_iter,
                          prior=prior, generator=gen)
            good = (~b.observation.noise.mask).sum((1, 2)).cpu() if b.observation.noise.mask is not None else None
            status = res.status.clone()
            if good is not None:
                status[good == 0] = 3
            block = {"index": rows[start:start + len(b)], "z": res.z.numpy(), "log_scale": res.log_scale.numpy(),
                     "intrinsic": res.intrinsic.numpy(), "model": res.model.numpy(),
                     "residual": res.residual.numpy(), "normalized_residual": res.normalized_residual.numpy(),
                     "chi2": res.chi2.numpy(), "dof": res.dof.numpy(), "status": status.numpy(),
                     "n_iter": res.n_iter.numpy()}
            if samples:
                block.update(_posterior(model, b, res, samples, chains, warmup, n_leapfrog, prior, gen, dev))
            w.write(block)
            wall.append(res.wall_time)
        from astropy.table import Table

        idx = w.read("index")
        z = w.read("z")
        chi2, dof, status = w.read("chi2"), w.read("dof"), w.read("status")
        cat = Table({"index": idx, "chi2": chi2, "dof": dof,
                     "chi2_dof": np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan),
                     "status": status, "status_name": [STATUS.get(int(s), "no-good-pixels") for s in status],
                     "log_scale": w.read("log_scale"), "flux_map": w.read("intrinsic").sum((1, 2)),
                     "z_map": z})
        if samples:
            cat["rhat_max"] = w.read("rhat").max(1)
            cat["ess_bulk_min"] = w.read("ess_bulk").min(1)
            cat["ess_tail_min"] = w.read("ess_tail").min(1)
            cat["accept_rate"] = w.read("accept_rate").mean(1)
            cat["divergences"] = w.read("divergences").sum(1)
        from ..data.atomic import atomic_output

        with atomic_output(catalog_path) as tmp:
            cat.write(tmp, format="fits", overwrite=True)
        w.finish(cat)
    return out


def _posterior(model, b, res, samples, chains, warmup, n_leapfrog, prior, gen, dev):
    G = len(b)
    x0 = torch.cat([res.z, res.log_scale[:, None]], 1).to(dev)
    init = x0[:, None, :] + 0.01 * torch.randn(G, chains, x0.shape[1], generator=gen, device=dev)
    lp = posterior_log_prob(model, b.observation, b.observed, b.cond, prior, chains)
    h = hmc_sample(lp, init, n_samples=samples, n_warmup=warmup, n_leapfrog=n_leapfrog, generator=gen)
    diag = summarize_chains(h.samples.cpu().numpy())
    # posterior predictive: the model observation for up to 64 draws per galaxy
    draws = h.samples.reshape(G, -1, x0.shape[1])
    pick = torch.linspace(0, draws.shape[1] - 1, min(64, draws.shape[1])).long()
    sub = draws[:, pick]  # (G, m, d+1)
    m = sub.shape[1]
    with torch.no_grad():
        obs = _repeat_observation(b.observation, m)
        flat = sub.transpose(0, 1).reshape(m * G, -1)
        c = None if b.cond is None else b.cond.repeat(m, 1)
        imgs = obs.noiseless(_decode(model, flat[:, :-1], c).float() * flat[:, -1].exp()[:, None, None])
        imgs = imgs.view(m, G, *imgs.shape[1:])
    return {"samples": h.samples.cpu().numpy(), "rhat": diag["rhat"], "ess_bulk": diag["ess_bulk"],
            "ess_tail": diag["ess_tail"], "accept_rate": h.accept_rate.cpu().numpy(),
            "divergences": h.divergences.cpu().numpy().astype(np.int32),
            "posterior_mean": imgs.mean(0).cpu().numpy(), "posterior_std": imgs.std(0).cpu().numpy()}
