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
from .derived import DERIVED_NAMES, QUANTILES, credible_intervals, derived_quantities
from .diagnostics import summarize_chains
from .hmc import hmc_sample
from ..runtime import generator, resolve_device, resolve_model
from .map import STATUS, _decode, fit_map, latent_log_prior

__all__ = ["FIT_SCHEMA", "FIT_DATASETS", "DERIVED_DRAWS", "FitWriter", "fit_file", "posterior_images",
           "posterior_log_prob"]

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
    "derived_map": ("float64", "", "derived", "flux [adu], hlr [arcsec], e1, e2 of the MAP intrinsic galaxy"),
    "derived_draws": ("float32", "", "derived", "flux, hlr, e1, e2 of thinned posterior draws (draws, 4)"),
    "derived_quantiles": ("float64", "", "derived", "quantiles 2.5, 16, 50, 84, 97.5% of flux, hlr, e1, e2 (4, 5)"),
}

#: Posterior draws per galaxy (thinned evenly over all chains) that are decoded for
#: derived quantities and for the posterior predictive mean and standard deviation.
DERIVED_DRAWS = 256


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
        ``log_prob(x, rows=None)``: ``(G * chains, d + 1) -> (G * chains,)``, or, with
        ``rows`` (indices into the ``G * chains`` rows), the log posterior of those rows
        only, ``x`` holding just them (how :func:`~galgen.inference.hmc_sample`'s NUTS
        evaluates only the chains that are still moving).
    """
    G = len(observed)
    every = torch.arange(G * chains, device=observed.device)
    full = observation.select(every // chains) if chains > 1 else observation

    def log_prob(x, rows=None):
        d = x.shape[1] - 1
        if rows is None:
            obs, gal = full, every // chains
        else:
            gal = torch.as_tensor(rows, device=observed.device) // chains
            obs = observation.select(gal)
        z, s = x[:, :d], x[:, d]
        c = None if cond is None else cond[gal]
        intr = _decode(model, z, c).float() * s.exp()[:, None, None]
        return obs.log_likelihood(intr, observed[gal]) + latent_log_prior(model, z, c, prior)

    return log_prob


def fit_file(model, data, out, *, samples: int = 0, chains: int = 4, warmup: int | None = None,
             n_leapfrog: int = 16, shard=None, device="auto", batch_size: int = 256, restarts: int = 1,
             max_iter: int = 500, seed: int = 0, prior: str | None = None, metric: str = "diag",
             sampler: str = "hmc", max_depth: int = 8, overwrite: bool = False) -> Path:
    """Fit every galaxy of a cutout file (``galgen fit``).

    Parameters
    ----------
    model : str, os.PathLike or GenerativeModel
        See :func:`galgen.sample.resolve_model`; or ``"sersic"`` / ``"bulge-disk"``
        (:data:`~galgen.models.parametric.PARAMETRIC_KINDS`): a parametric
        :class:`~galgen.models.parametric.SersicModel` built for the file's stamp,
        oversampling and pixel scale, the classical baseline.
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
        Leapfrog steps per HMC trajectory.
    metric : {"diag", "dense"}, optional
        HMC mass matrix adapted in warm-up (:func:`~galgen.inference.hmc_sample`); dense
        for strongly correlated parameters (Sersic flux, radius and index).
    sampler : {"hmc", "nuts"}, optional
        Fixed-length HMC trajectories of ``n_leapfrog`` steps, or the No-U-Turn sampler.
    max_depth : int, optional
        NUTS: at most ``2**max_depth - 1`` leapfrog steps per draw.
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
    from ..train.data import TrainingData

    dev = resolve_device(device)
    data = Path(data)
    with CutoutFile(data) as f:
        n_all = len(f)
        stamp, k = int(f.attrs["stamp_size"]), f.oversampling
        data_fp = str(f.attrs.get("fingerprint", ""))
        scale = float(f.attrs["pixel_scale"])
    model = _model_for_data(model, stamp, k, scale, dev)
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
                     "prior": prior, **({"metric": metric} if metric != "diag" else {}),
                     **({"sampler": sampler, "max_depth": max_depth} if sampler != "hmc" else {})}, sort_keys=True)
    out = Path(out)
    catalog_path = out.with_suffix(".fits")
    if output_is_current(out, fp, overwrite, schema=FIT_SCHEMA) and catalog_path.exists():
        return out
    d = int(cfg["latent_dim"])
    shapes = {"index": (), "z": (d,), "log_scale": (), "intrinsic": (stamp * k, stamp * k),
              "model": (stamp, stamp), "residual": (stamp, stamp), "normalized_residual": (stamp, stamp),
              "chi2": (), "dof": (), "status": (), "n_iter": (), "derived_map": (4,)}
    if samples:
        shapes.update(samples=(chains, samples, d + 1), rhat=(d + 1,), ess_bulk=(d + 1,), ess_tail=(d + 1,),
                      accept_rate=(chains,), divergences=(chains,), posterior_mean=(stamp, stamp),
                      posterior_std=(stamp, stamp), derived_draws=(min(DERIVED_DRAWS, chains * samples), 4),
                      derived_quantiles=(4, len(QUANTILES)))
    attrs = {"model": str(getattr(model, "checkpoint_path", cfg["kind"])), "data": str(data),
             "model_kind": cfg["kind"], "stamp_size": stamp, "oversampling": k, "survey": "", "seed": seed,
             "derived_names": json.dumps(DERIVED_NAMES), "derived_quantile_levels": json.dumps(QUANTILES)}
    if hasattr(model, "param_names"):
        attrs["param_names"] = json.dumps(list(model.param_names))
    td = TrainingData(data, rows, model.conditions, in_memory=False, device=dev)
    wall = []
    with FitWriter(out, n=n, shapes=shapes, attrs=attrs, fingerprint=fp) as w:
        for start in range(w.n_done, n, batch_size):
            b = td.batch(torch.arange(start, min(start + batch_size, n)))
            gen = generator(dev, seed, int(rows[start]))
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
                     "n_iter": res.n_iter.numpy(),
                     "derived_map": derived_quantities(res.intrinsic, b.observation.intrinsic_scale).numpy()}
            if samples:
                block.update(_posterior(model, b, res, samples, chains, warmup, prior, gen, n_leapfrog=n_leapfrog,
                                        metric=metric, sampler=sampler, max_depth=max_depth))
            w.write(block)
            wall.append(res.wall_time)
        from astropy.table import Table

        idx = w.read("index")
        z = w.read("z")
        chi2, dof, status = w.read("chi2"), w.read("dof"), w.read("status")
        cat = Table({"index": idx, "chi2": chi2, "dof": dof,
                     "chi2_dof": np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan),
                     "status": status, "status_name": [STATUS.get(int(s), "no-good-pixels") for s in status],
                     "log_scale": w.read("log_scale"),
                     "z_map": z})
        dmap = w.read("derived_map")
        for j, name in enumerate(DERIVED_NAMES):
            cat[f"{name}_map"] = dmap[:, j]
        if hasattr(model, "physical"):  # parametric models: their physical parameters at the MAP
            with torch.no_grad():
                for name, value in model.physical(torch.as_tensor(z, dtype=torch.float32)).items():
                    cat[f"param_{name}"] = value.cpu().numpy()
        if samples:
            dq = w.read("derived_quantiles")
            for j, name in enumerate(DERIVED_NAMES):
                for col, qi in (("lo95", 0), ("lo68", 1), ("median", 2), ("hi68", 3), ("hi95", 4)):
                    cat[f"{name}_{col}"] = dq[:, j, qi]
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


def _hmc_from_map(model, observation, observed, cond, res, *, samples, chains, warmup, prior, generator,
                  **sampler_kw):
    """HMC chains of (z, log_scale) started about a batch's MAP (the posterior step of ``galgen fit``).

    ``sampler_kw`` (``n_leapfrog``, ``metric``, ``sampler``, ``max_depth``) go to :func:`hmc_sample`.
    """
    dev = observation.psf.device
    x0 = torch.cat([res.z, res.log_scale[:, None]], 1).to(dev)
    init = x0[:, None, :] + 0.01 * torch.randn(len(observed), chains, x0.shape[1], generator=generator, device=dev)
    lp = posterior_log_prob(model, observation, observed, cond, prior, chains)
    return hmc_sample(lp, init, n_samples=samples, n_warmup=warmup, generator=generator, **sampler_kw)


def _model_for_data(model, stamp: int, oversampling: int, pixel_scale: float, device):
    """``resolve_model``, or a parametric model built for a file's stamp, oversampling and pixel scale."""
    return resolve_model(model, device, data=(stamp, oversampling, pixel_scale)).eval()


def _thin_draws(samples: torch.Tensor, n_draws: int) -> torch.Tensor:
    """``(G, C, N, k)`` chains -> ``(G, m, k)``: ``m = min(n_draws, C*N)`` draws evenly over all chains."""
    draws = samples.reshape(samples.shape[0], -1, samples.shape[-1])
    pick = torch.linspace(0, draws.shape[1] - 1, min(n_draws, draws.shape[1])).round().long()
    return draws[:, pick]


def _posterior(model, b, res, samples, chains, warmup, prior, gen, **sampler_kw):
    h = _hmc_from_map(model, b.observation, b.observed, b.cond, res, samples=samples, chains=chains, warmup=warmup,
                      prior=prior, generator=gen, **sampler_kw)
    diag = summarize_chains(h.samples.cpu().numpy())
    derived, mean, std = posterior_images(model, b.observation, h.samples, b.cond)
    return {"samples": h.samples.cpu().numpy(), "rhat": diag["rhat"], "ess_bulk": diag["ess_bulk"],
            "ess_tail": diag["ess_tail"], "accept_rate": h.accept_rate.cpu().numpy(),
            "divergences": h.divergences.cpu().numpy().astype(np.int32),
            "posterior_mean": mean.cpu().numpy(), "posterior_std": std.cpu().numpy(),
            "derived_draws": derived.numpy(), "derived_quantiles": credible_intervals(derived.numpy())}


def posterior_images(model, observation, samples: torch.Tensor, cond=None, *, n_draws: int = DERIVED_DRAWS,
                     chunk: int = 32):
    """Derived quantities and posterior predictive images from (thinned) posterior draws.

    Parameters
    ----------
    model : GenerativeModel or parametric model
    observation : galgen.physics.Observation
        Of the ``G`` galaxies.
    samples : torch.Tensor
        ``(G, C, N, d + 1)`` draws of (z, log_scale), as :func:`hmc_sample` returns.
    cond : torch.Tensor, optional
    n_draws : int, optional
        Draws per galaxy, thinned evenly over all chains.
    chunk : int, optional
        Draws decoded at once (bounds memory: ``chunk * G`` images).

    Returns
    -------
    derived : torch.Tensor
        ``(G, n_draws, 4)`` :data:`~galgen.inference.derived.DERIVED_NAMES` per draw.
    mean, std : torch.Tensor
        ``(G, S, S)`` posterior mean and standard deviation of the noise-free observation.
    """
    G = samples.shape[0]
    sub = _thin_draws(samples, n_draws).to(observation.psf.device)
    derived, s1, s2 = [], 0.0, 0.0
    with torch.no_grad():
        for a in range(0, sub.shape[1], chunk):
            part = sub[:, a:a + chunk]  # (G, m, d+1)
            m = part.shape[1]
            flat = part.transpose(0, 1).reshape(m * G, -1)
            c = None if cond is None else cond.repeat(m, 1)
            intr = _decode(model, flat[:, :-1], c).float() * flat[:, -1].exp()[:, None, None]
            derived.append(derived_quantities(intr, observation.intrinsic_scale).view(m, G, -1).transpose(0, 1).cpu())
            obs = observation.select(torch.arange(G).repeat(m)) if m > 1 else observation
            img = obs.noiseless(intr).double()
            img = img.view(m, G, *img.shape[1:])
            s1 = s1 + img.sum(0)
            s2 = s2 + (img * img).sum(0)
    n = sub.shape[1]
    mean = s1 / n
    std = ((s2 - n * mean * mean).clamp(min=0) / max(n - 1, 1)).sqrt()
    return torch.cat(derived, 1), mean.float(), std.float()
