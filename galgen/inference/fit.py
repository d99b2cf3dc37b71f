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
import math
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import h5py
import numpy as np
import torch

from ..data.cutouts import output_is_current
from ..data.fitfile import FIT_DATASETS, FIT_SCHEMA, FitWriter
from ..data.loading import ObservationLoader
from ..errors import GalgenInputError
from ..runtime import generator, resolve_device, resolve_model
from .derived import DERIVED_NAMES, QUANTILES, credible_intervals, derived_quantities
from .diagnostics import summarize_chains
from .hmc import hmc_sample
from .amortized import AmortizedPosterior, amortized_proposal, attached_amortized_posterior, multimodal_laplace
from .importance import K_HAT_THRESHOLD, importance_sample, laplace_approximation
from .map import STATUS, fit_map

__all__ = ["FIT_SCHEMA", "FIT_DATASETS", "DERIVED_DRAWS", "FitWriter", "fit_file", "posterior_images",
           "posterior_log_prob", "marginal_log_prob", "draw_log_scale", "SCALE_NODES",
           "sample_posterior", "thin_draws", "PosteriorResult", "POSTERIOR_METHODS", "fit_summary",
           "RHAT_THRESHOLD", "FALLBACK_MAX_DEPTH", "SEARCH_STARTS", "SEARCH_CANDIDATES", "SEARCH_REFINE",
           "GIVE_UP_ROUNDS", "SCALE_TREATMENTS", "same_flux_units"]

#: Posterior draws per galaxy (thinned evenly over all chains) that are decoded for
#: derived quantities and for the posterior predictive mean and standard deviation.
DERIVED_DRAWS = 256


def _row_view(model, observation, observed, cond, chains):
    """``view(rows) -> (observation, galaxy index, conditions, prior)`` of galaxy-major rows."""
    G = len(observed)
    every = torch.arange(G * chains, device=observed.device)
    shared = model.prior(None) if cond is None else None  # without conditions one prior serves every call
    full = observation.select(every // chains) if chains > 1 else observation

    def view(rows=None):
        if rows is None:
            obs, gal = full, every // chains
        else:
            gal = torch.as_tensor(rows, device=observed.device) // chains
            obs = observation.select(gal)
        c = None if cond is None else cond[gal]
        return obs, gal, c, shared if c is None else model.prior(c)

    return view


def posterior_log_prob(model, observation, observed, cond=None, prior=None, chains: int = 1):
    """The log posterior of (z, log_scale) rows, galaxy-major with ``chains`` rows per galaxy.

    ``log p(x | decode(z) * exp(s)) + log prior(z)``, the log flux scale ``s`` with a flat prior.

    Parameters
    ----------
    model : galgen.models.LatentModel
    observation : galgen.physics.Observation
        Of the ``G`` galaxies.
    observed : torch.Tensor
        ``(G, S, S)``.
    cond : torch.Tensor, optional
        ``(G, C)`` raw conditions.
    prior : str, optional
        Deprecated: pass ``model.with_prior(name)``.
    chains : int, optional

    Returns
    -------
    callable
        ``log_prob(x, rows=None)``: ``(G * chains, d + 1) -> (G * chains,)``, or, with
        ``rows`` (indices into the ``G * chains`` rows), the log posterior of those rows
        only, ``x`` holding just them (how :func:`~galgen.inference.hmc_sample`'s NUTS
        evaluates only the chains that are still moving).
    """
    if prior is not None:
        warnings.warn("the prior= argument is deprecated: pass model.with_prior(name)", DeprecationWarning,
                      stacklevel=2)
        model = model.with_prior(prior)
    view = _row_view(model, observation, observed, cond, chains)

    def log_prob(x, rows=None):
        d = x.shape[1] - 1
        obs, gal, c, prior_ = view(rows)
        z, s = x[:, :d], x[:, d]
        intr = model.decode(z, c).float() * s.exp()[:, None, None]
        return obs.log_likelihood(intr, observed[gal]) + prior_.log_prob(z)

    return log_prob


#: Gauss-Hermite nodes of :func:`marginal_log_prob`'s integral over the log flux scale.
SCALE_NODES = 16


class _ScaleProfile:
    """The likelihood of latent rows as a function of their log flux scale ``s``.

    The log likelihood of ``a * m`` (``m`` the unit-scale detector model) is
    ``l_max - A (a - a_max)^2 / 2`` in the amplitude ``a = exp(s)`` for Gaussian noise,
    read exactly off three amplitudes and checked at a fourth; with the flat prior on
    ``s`` the conditional of ``s`` peaks at ``a_max`` with ``sd(s) = 1 / (a_max sqrt(A))``.
    For noise whose variance follows the signal (the check fails) the parabola is
    refitted ``rounds`` times about its last mode, one standard deviation either side,
    and :meth:`log_likelihood` evaluates the noise model itself. Rows whose model does
    not correlate positively with the data have no finite mode (``ok`` False).
    """

    def __init__(self, model, obs, data, z, c, rounds: int = 2):
        self.noise, self.data = obs.noise, data
        self.m = m = obs.noiseless(model.decode(z, c).float()).double()
        ref = (data.sum((-2, -1)) / m.sum((-2, -1))).abs()
        a = torch.where(torch.isfinite(ref) & (ref > 0), ref, torch.ones_like(ref))
        step = a  # the first parabola through a = 0, a, 2a
        ok = torch.ones_like(a, dtype=torch.bool)
        offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=m.dtype, device=m.device)[:, None]
        for r in range(1 + int(rounds)):
            l0, l1, l2 = self._exact(a + step * offsets)
            A = (2 * l1 - l0 - l2) / step ** 2
            slope = (l2 - l0) / (2 * step)  # B - A a
            good = (A > 0) & torch.isfinite(A) & torch.isfinite(slope) & ((a + slope / A.clamp(min=1e-300)) > 0)
            ok = ok & good
            A = A.clamp(min=1e-300)
            l_max, a = l1 + 0.5 * slope ** 2 / A, torch.where(good, a + slope / A, a)
            if r == 0:  # Gaussian in the amplitude: the parabola is exact (checked at its vertex)
                close = (self._exact(a[None])[0] - l_max).abs() <= 1e-6 + 1e-9 * l_max.abs()
                self.quadratic = bool((close | ~good).all())
                if self.quadratic:
                    break
            step = torch.where(good, 1.0 / A.sqrt(), step).clamp(max=0.5 * a)
        self.ok, self.A, self.a_max, self.l_max = ok, A, a, l_max
        self.mode = a.log()
        self.sd = torch.where(ok, 1.0 / (a * A.sqrt()), torch.ones_like(a))

    def _exact(self, a):
        """The noise model's log likelihood at amplitudes ``a`` ``(n, N) -> (n, N)``."""
        return self.noise.log_prob(self.data, a[..., None, None] * self.m)

    def log_likelihood(self, s):
        """``(n, N)`` log flux scales -> ``(n, N)`` log likelihoods."""
        if self.quadratic:
            return self.l_max - 0.5 * self.A * (s.exp() - self.a_max) ** 2
        return self._exact(s.exp())


def marginal_log_prob(model, observation, observed, cond=None, chains: int = 1, nodes: int = SCALE_NODES):
    """The log posterior of latent rows ``z``, the log flux scale integrated out.

    ``log integral p(x | decode(z) * exp(s)) prior(z) ds`` (``s`` has a flat prior), by
    Gauss-Hermite quadrature about the mode of ``s`` given ``z``, which the likelihood
    gives in closed form: it is Gaussian in the amplitude ``exp(s)``. Importance
    sampling over ``z`` alone, with ``s`` then drawn from its exact conditional
    (:func:`draw_log_scale`), is Rao-Blackwellised: one dimension fewer to propose, and
    the one the data constrain most tightly.

    Parameters
    ----------
    model : galgen.models.LatentModel
    observation : galgen.physics.Observation
        Of the ``G`` galaxies.
    observed : torch.Tensor
        ``(G, S, S)``.
    cond : torch.Tensor, optional
        ``(G, C)`` raw conditions.
    chains : int, optional
        Rows per galaxy.
    nodes : int, optional
        Quadrature nodes (16 integrate the conditional to 3e-4 nats at S/N 5, 1e-7 at
        S/N 10, where the S/N is that of the amplitude, ``a_max sqrt(A)``).

    Returns
    -------
    callable
        ``log_prob(z, rows=None)``: ``(G * chains, d) -> (G * chains,)`` as
        :func:`posterior_log_prob` takes rows; ``-inf`` where the model does not
        correlate positively with the data.
    """
    view = _row_view(model, observation, observed, cond, chains)
    t, w = np.polynomial.hermite.hermgauss(int(nodes))

    def log_prob(z, rows=None):
        obs, gal, c, prior_ = view(rows)
        data = observed[gal].double()
        p = _ScaleProfile(model, obs, data, z, c)
        tt = torch.as_tensor(t, dtype=data.dtype, device=data.device)[:, None]
        ll = p.log_likelihood(p.mode + math.sqrt(2.0) * p.sd * tt)  # (nodes, N)
        lw = torch.as_tensor(np.log(w) + t ** 2, dtype=data.dtype, device=data.device)[:, None]
        out = torch.logsumexp(ll + lw, 0) + torch.log(math.sqrt(2.0) * p.sd)
        out = torch.where(p.ok, out, torch.full_like(out, -math.inf))
        return out.to(z.dtype) + prior_.log_prob(z)

    return log_prob


@torch.no_grad()
def draw_log_scale(model, observation, observed, z, cond=None, generator: torch.Generator | None = None,
                   cells: int = 96, width: float = 8.0, max_batch: int = 32) -> torch.Tensor:
    """Draws of the log flux scale ``s`` from its conditional posterior given each latent draw.

    The conditional density (the likelihood of ``exp(s) * decode(z)``, ``s`` with a
    flat prior) is evaluated on ``cells`` cells spanning ``+- width`` conditional
    standard deviations about its mode; a cell is drawn by its mass and ``s`` uniformly
    within it (the discretisation adds a variance of ``(2 width / cells)^2 / 12``
    conditional variances, 0.23% at the defaults).

    Parameters
    ----------
    model : galgen.models.LatentModel
    observation : galgen.physics.Observation
        Of the ``G`` galaxies.
    observed : torch.Tensor
        ``(G, S, S)``.
    z : torch.Tensor
        ``(G, n, d)`` latent draws per galaxy.
    cond : torch.Tensor, optional
        ``(G, C)`` raw conditions.
    generator : torch.Generator, optional
    cells : int, optional
    width : float, optional
    max_batch : int, optional
        Distinct draws decoded at once.

    Returns
    -------
    torch.Tensor
        ``(G, n)`` log flux scales.
    """
    G, n, d = z.shape
    dev = observed.device
    zz = z.to(dev).reshape(G * n, d)
    gal_all = torch.arange(G, device=dev).repeat_interleave(n)
    key = torch.cat([gal_all[:, None].to(zz.dtype), zz], 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)  # resampled draws repeat: decode each once
    U = len(uniq)
    cdf = torch.empty(U, int(cells), dtype=torch.float64, device=dev)
    s0, sd = torch.empty(U, dtype=torch.float64, device=dev), torch.empty(U, dtype=torch.float64, device=dev)
    ok = torch.empty(U, dtype=torch.bool, device=dev)
    edge = torch.linspace(-width, width, int(cells) + 1, dtype=torch.float64, device=dev)
    h = float(edge[1] - edge[0])
    centre = (edge[:-1] + 0.5 * h)[:, None]
    for a in range(0, U, max_batch):
        gal = uniq[a:a + max_batch, 0].long()
        obs = observation.select(gal)
        data = observed[gal].double()
        p = _ScaleProfile(model, obs, data, uniq[a:a + max_batch, 1:].to(z.dtype), None if cond is None else cond[gal])
        s0[a:a + max_batch], sd[a:a + max_batch], ok[a:a + max_batch] = p.mode, p.sd, p.ok
        ll = p.log_likelihood(p.mode + p.sd * centre)
        ll = torch.where(torch.isfinite(ll), ll, torch.full_like(ll, -math.inf))
        cdf[a:a + max_batch] = torch.softmax(ll, 0).cumsum(0).T
    u = torch.rand(2, G * n, generator=generator, device=dev, dtype=torch.float64)  # every copy its own draw
    c = cdf[inverse]
    j = torch.searchsorted(c, (u[0] * c[:, -1])[:, None]).squeeze(1).clamp(max=int(cells) - 1)
    s = s0[inverse] + sd[inverse] * (centre[j, 0] + h * (u[1] - 0.5))
    return torch.where(ok[inverse], s, s0[inverse]).view(G, n)


def fit_file(model, data, out, *, samples: int = 0, chains: int = 4, warmup: int | None = None,
             n_leapfrog: int = 16, shard=None, device="auto", batch_size: int | None = None, restarts: int = 0,
             max_iter: int | None = None, seed: int = 0, prior: str | None = None, metric: str = "diag",
             sampler: str | None = None, max_depth: int = 8, overwrite: bool = False, optimizer: str = "auto",
             posterior: str = "is", limit: int | None = None, progress: bool = False, proposal: str = "auto",
             min_ess: float | None = 200.0, max_draws: int | None = None, fallback: str | None = "nuts",
             scale: str = "auto") -> Path:
    """Fit every galaxy of a cutout file (``galgen fit``).

    Parameters
    ----------
    model : str, os.PathLike or galgen.models.LatentModel
        See :func:`galgen.runtime.resolve_model`: a pretrained name, run directory or
        checkpoint, ``"sersic"`` / ``"bulge-disk"`` (a parametric
        :class:`~galgen.models.parametric.SersicModel` built for the file's stamp,
        oversampling and pixel scale, the classical baseline), or a model.
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
    shard : galgen.sharding.Shard, optional
        Fit only this part of the file.
    device : str, optional
    batch_size : int, optional
        Galaxies per batch; default 64 on a CPU (a deep decoder is 2.5x faster per image
        at batches of 32-128 than at 256 there: docs/benchmarks.md), 512 on a GPU.
    restarts : int, optional
        Random MAP restarts besides the encoder's guess.
    max_iter : int, optional
        MAP iterations at most (default: the optimiser's, see :func:`~galgen.inference.fit_map`).
    seed : int, optional
    prior : str, optional
        One of the model's ``prior_choices`` (a VAE's ``"flow"``, ``"mixture"`` or ``"normal"``);
        default the model's ``map_prior``, else its own.
    metric : {"diag", "dense"}, optional
        HMC mass matrix adapted in warm-up (:func:`~galgen.inference.hmc_sample`); dense
        for strongly correlated parameters (Sersic flux, radius and index).
    sampler : {"hmc", "nuts"}, optional
        Deprecated spelling of ``posterior`` (overrides it where given).
    max_depth : int, optional
        NUTS: at most ``2**max_depth - 1`` leapfrog steps per draw.
    overwrite : bool, optional
    optimizer : {"auto", "lm", "adam", "lbfgs"}, optional
        MAP optimiser (:func:`~galgen.inference.fit_map`; ``auto``: the model's own).
    posterior : {"is", "laplace", "nuts", "hmc"}, optional
        Posterior method of :func:`sample_posterior` (used with ``samples > 0``):
        importance sampling with PSIS and NUTS fallback (default), the Laplace
        approximation, NUTS, or fixed-length HMC.
    limit : int, optional
        Fit only the first ``limit`` galaxies (of the shard, if any): a quick look, or
        posteriors for a few galaxies beside the MAP fit of all.
    progress : bool, optional
        Show a progress bar (galaxies fitted).
    proposal : {"auto", "laplace", "amortized"}, optional
        Importance sampling's proposal (see :func:`sample_posterior`).
    min_ess : float or None, optional
        Importance sampling: galaxies go on drawing, from proposals adapted to their
        draws, until this effective sample size (see :func:`sample_posterior`); None:
        the first round's proposals only.
    max_draws : int, optional
        Importance sampling with ``min_ess``: proposals per galaxy at most (default 16x
        the first round's).
    fallback : {"nuts", "none"}, optional
        Importance sampling: what redraws the galaxies whose Pareto k stays above 0.7
        (``fallback`` of :func:`sample_posterior`; ``"none"`` or None keeps their
        weighted draws, flagged by ``pareto_k``).
    scale : {"auto", "redraw", "integrated", "joint", "fixed"}, optional
        Importance sampling's treatment of the log flux scale (``scale`` of
        :func:`sample_posterior`); ``fixed`` also fits the MAP with the flux scale held
        at 0 (the model's own brightness; ``fit_map(fit_flux=False)``) and has no NUTS
        fallback (``fallback`` is then ignored: failing galaxies keep their weighted
        draws, flagged by ``pareto_k``). ``auto`` (the default): ``fixed`` where the
        data are in the flux units of the model's training set
        (:func:`same_flux_units`), else ``redraw``.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    dev = resolve_device(device)
    data = Path(data)
    probe = ObservationLoader(data, [])
    model = resolve_model(model, dev, data=(probe.stamp_size, probe.oversampling, probe.pixel_scale),
                          prior=prior).eval()
    if prior is None and model.map_prior is not None:
        prior = model.map_prior
        model = model.with_prior(prior)
    cfg = model.config
    stamp, k = probe.stamp_size, probe.oversampling
    probe.check_grid(cfg.get("stamp", stamp), cfg.get("oversampling", k))
    n_all = probe.n_file
    rows = np.arange(n_all) if shard is None else np.arange(*shard.bounds(n_all))
    if limit is not None:
        if int(limit) < 1:
            raise GalgenInputError(f"limit: must be >= 1, got {limit!r}")
        rows = rows[:int(limit)]
    n = len(rows)
    warmup = samples if warmup is None else warmup
    batch_size = (64 if dev.type == "cpu" else 512) if batch_size is None else int(batch_size)
    if sampler is not None:
        warnings.warn("sampler= is deprecated: pass posterior=", DeprecationWarning, stacklevel=2)
        posterior = sampler
    if posterior not in POSTERIOR_METHODS:
        raise GalgenInputError(f"posterior: one of {POSTERIOR_METHODS}, got {posterior!r}")
    fallback = None if fallback in (None, "none") else fallback
    if fallback not in ("nuts", None):
        raise GalgenInputError(f"fallback: 'nuts' or 'none', got {fallback!r}")
    if scale not in ("auto",) + SCALE_TREATMENTS:
        raise GalgenInputError(f"scale: 'auto' or one of {SCALE_TREATMENTS}, got {scale!r}")
    if scale == "auto":  # the flux scale held where the data share the training set's units (and IS allows it)
        scale = "fixed" if same_flux_units(model, data) and posterior in ("is", "laplace") else "redraw"
    if scale == "fixed" and samples and posterior not in ("is", "laplace"):
        raise GalgenInputError(f"scale: 'fixed' goes with posterior 'is' or 'laplace', got {posterior!r}")
    fallback = None if scale == "fixed" else fallback
    fp = json.dumps({"model": model.checkpoint_path or repr(cfg), "data": str(data.resolve()),
                     "data_fingerprint": probe.fingerprint, "rows": [int(rows[0]), int(rows[-1]) + 1] if n else [0, 0],
                     "samples": samples, "chains": chains, "warmup": warmup, "n_leapfrog": n_leapfrog,
                     "batch_size": batch_size, "restarts": restarts, "max_iter": max_iter, "seed": seed,
                     "prior": prior, **({"metric": metric} if metric != "diag" else {}),
                     "posterior": posterior, "optimizer": optimizer,
                     **({"max_depth": max_depth} if posterior in ("nuts", "is") else {}),
                     **({"proposal": proposal} if proposal != "auto" else {}),
                     **({"min_ess": min_ess} if min_ess is not None else {}),
                     **({"max_draws": max_draws} if max_draws is not None else {}),
                     **({"fallback": "none"} if fallback is None and posterior == "is" else {}),
                     **({"scale": scale} if posterior == "is" or scale != "redraw" else {})}, sort_keys=True)
    out = Path(out)
    catalog_path = out.with_suffix(".fits")
    if output_is_current(out, fp, overwrite, schema=FIT_SCHEMA) and catalog_path.exists():
        return out
    d = int(model.latent_dim)
    shapes = {"index": (), "z": (d,), "log_scale": (), "intrinsic": (stamp * k, stamp * k),
              "model": (stamp, stamp), "residual": (stamp, stamp), "normalized_residual": (stamp, stamp),
              "chi2": (), "dof": (), "status": (), "n_iter": (), "derived_map": (4,)}
    if samples:
        shapes.update(samples=(chains, samples, d + 1), rhat=(d + 1,), ess_bulk=(d + 1,), ess_tail=(d + 1,),
                      accept_rate=(chains,), divergences=(chains,), posterior_mean=(stamp, stamp),
                      posterior_std=(stamp, stamp), derived_draws=(min(DERIVED_DRAWS, chains * samples), 4),
                      derived_quantiles=(4, len(QUANTILES)), posterior_method=(), pareto_k=(), is_ess=())
    kind = cfg.get("kind", type(model).__name__)
    attrs = {"model": str(model.checkpoint_path or kind), "data": str(data),
             "model_kind": kind, "stamp_size": stamp, "oversampling": k, "survey": "", "seed": seed,
             "derived_names": json.dumps(DERIVED_NAMES), "derived_quantile_levels": json.dumps(QUANTILES),
             "param_names": json.dumps(list(model.latent_names))}
    loader = ObservationLoader(data, rows, model.conditions, device=dev)
    from tqdm.auto import tqdm

    with FitWriter(out, n=n, shapes=shapes, attrs=attrs, fingerprint=fp) as w, \
            tqdm(total=n, initial=w.n_done, disable=not progress, unit="gal", desc=f"fit {out.name}") as bar:
        for b in loader.iter_batches(batch_size, start=w.n_done):
            gen = generator(dev, seed, int(b.index[0]))
            res = fit_map(model, b.observed, b.observation, cond=b.cond, restarts=restarts, max_iter=max_iter,
                          optimizer=optimizer, generator=gen, fit_flux=scale != "fixed")
            block = {"index": b.index.numpy(), "z": res.z.numpy(), "log_scale": res.log_scale.numpy(),
                     "intrinsic": res.intrinsic.numpy(), "model": res.model.numpy(),
                     "residual": res.residual.numpy(), "normalized_residual": res.normalized_residual.numpy(),
                     "chi2": res.chi2.numpy(), "dof": res.dof.numpy(), "status": res.status.numpy(),
                     "n_iter": res.n_iter.numpy(),
                     "derived_map": derived_quantities(res.intrinsic, b.observation.intrinsic_scale).numpy()}
            if samples:
                block.update(_posterior(model, b, res, samples, chains, warmup, gen, method=posterior,
                                        n_leapfrog=n_leapfrog, metric=metric, max_depth=max_depth,
                                        proposal=proposal, min_ess=min_ess, max_draws=max_draws,
                                        fallback=fallback, scale=scale))
            w.write(block)
            bar.update(len(b.index))
        w.finish(_catalog(w, model, catalog_path, samples))
    return out


def same_flux_units(model, data) -> bool:
    """Whether a cutout file is in the flux units of the data a model was trained on.

    True where the model's :attr:`~galgen.models.LatentModel.provenance` names the
    simulated survey it was trained on and the file records the same survey, band, zero
    point and pixel scale, in ADU: then the model's own brightness (flux scale 0) means
    the same flux in both, and ``galgen fit`` holds the flux scale there
    (``scale="fixed"``). Ingested files of another instrument, and models without a
    provenance (parametric models, models built in code), give False.

    Parameters
    ----------
    model : galgen.models.LatentModel
    data : str or os.PathLike
        Cutout file.

    Returns
    -------
    bool
    """
    try:
        survey = json.loads(model.provenance.get("data_fingerprint") or "{}").get("survey")
    except (TypeError, ValueError):
        return False
    if not isinstance(survey, dict):
        return False
    with h5py.File(data, "r") as f:
        attrs = dict(f.attrs)
    try:
        return (str(attrs.get("survey")) == str(survey.get("name"))
                and str(attrs.get("band")) == str(survey.get("band")) and str(attrs.get("flux_unit")) == "adu"
                and abs(float(attrs["zero_point"]) - float(survey["zero_point"])) < 1e-6
                and abs(float(attrs["pixel_scale"]) - float(survey["pixel_scale"])) < 1e-9)
    except (KeyError, TypeError, ValueError):
        return False


#: The largest split R-hat (over a galaxy's parameters) at which :func:`fit_summary` counts
#: an MCMC posterior as converged (Vehtari et al. 2021 recommend 1.01 for final results;
#: 1.05 is the looser screen used in this package's calibration reports).
RHAT_THRESHOLD = 1.05


def fit_summary(path) -> dict:
    """Counts of a fit file's galaxies by posterior method, and of those whose diagnostics fail.

    An importance-sampled galaxy passes where its Pareto k is at most
    :data:`~galgen.inference.importance.K_HAT_THRESHOLD`; an MCMC one where the largest
    split R-hat of its parameters is below :data:`RHAT_THRESHOLD`; Laplace draws have no
    such check and are counted apart.

    Parameters
    ----------
    path : str or os.PathLike
        A fit file of :func:`fit_file`.

    Returns
    -------
    dict
        ``galaxies``, ``median_reduced_chi2``, and with posteriors ``by_method`` (method
        name -> galaxies), ``is_ess_median`` (over the importance-sampled galaxies),
        ``flagged`` (galaxies whose diagnostics fail) and ``flagged_index`` (their
        ``index`` values).

    Examples
    --------
    >>> fit_summary("fit.h5")  # doctest: +SKIP
    {'galaxies': 64, 'median_reduced_chi2': 1.03, 'by_method': {'nuts': 5, 'is': 59}, ...}
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise GalgenInputError(f"{path}: no such fit file")
    with h5py.File(path, "r") as f:
        if "chi2" not in f or "dof" not in f:
            raise GalgenInputError(f"{path}: not a galgen fit file (no chi2/dof datasets)")
        chi2, dof, index = f["chi2"][:], f["dof"][:], f["index"][:]
        out = {"galaxies": int(len(chi2)),
               "median_reduced_chi2": float(np.median(chi2 / np.maximum(dof, 1))) if len(chi2) else math.nan}
        if "posterior_method" not in f:
            return out
        method, k, rhat, ess = (f["posterior_method"][:], f["pareto_k"][:], f["rhat"][:], f["is_ess"][:])
    name = np.asarray(POSTERIOR_METHODS)[method.astype(int)]
    is_ = name == "is"
    mcmc = (name == "nuts") | (name == "hmc")
    bad = (is_ & ~(k <= K_HAT_THRESHOLD)) | (mcmc & ~(rhat.max(1) < RHAT_THRESHOLD))
    out.update(by_method={m: int((name == m).sum()) for m in POSTERIOR_METHODS if (name == m).any()},
               is_ess_median=float(np.median(ess[is_])) if is_.any() else math.nan,
               flagged=int(bad.sum()), flagged_index=index[bad].tolist())
    return out


def _catalog(w, model, catalog_path, samples):
    """The FITS summary catalog of a finished fit file, written atomically; returned for the fit file too."""
    from astropy.table import Table

    from ..data.atomic import atomic_output

    z = w.read("z")
    chi2, dof, status = w.read("chi2"), w.read("dof"), w.read("status")
    cat = Table({"index": w.read("index"), "chi2": chi2, "dof": dof,
                 "chi2_dof": np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan),
                 "status": status.astype(np.int16), "status_name": [STATUS[int(s)] for s in status],
                 "log_scale": w.read("log_scale"), "z_map": z})
    dmap = w.read("derived_map")
    for j, name in enumerate(DERIVED_NAMES):
        cat[f"{name}_map"] = dmap[:, j]
    with torch.no_grad():  # named physical parameters at the MAP (a parametric model's radius, index, ...)
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
        cat["posterior_method"] = [POSTERIOR_METHODS[int(m)] for m in w.read("posterior_method")]
        cat["pareto_k"] = w.read("pareto_k")
        cat["is_ess"] = w.read("is_ess")
    with atomic_output(catalog_path) as tmp:
        cat.write(tmp, format="fits", overwrite=True)
    return cat


#: Posterior methods of :func:`sample_posterior` and ``galgen fit --posterior``, by their
#: code in fit files (``posterior_method``).
POSTERIOR_METHODS = ("hmc", "nuts", "is", "laplace")

#: Treatments of the log flux scale ``s`` by :func:`sample_posterior` (``scale=``).
SCALE_TREATMENTS = ("redraw", "integrated", "joint", "fixed")


def _held_scale(log_prob, s, chains):
    """``log_prob`` of ``(z, s)`` rows as a function of ``z`` alone, ``s`` ``(G,)`` held per galaxy."""

    def log_prob_z(z, rows=None):
        idx = torch.arange(len(z), device=z.device) if rows is None else torch.as_tensor(rows, device=z.device)
        return log_prob(torch.cat([z, s.to(z)[idx // chains, None]], 1), rows)

    return log_prob_z


#: Tree depth at most of the NUTS fallback of :func:`sample_posterior` (63 leapfrog steps per
#: draw): on the galaxies whose importance weights fail, NUTS trajectories of ``sdss-vae``
#: reach this depth even with a Laplace metric, and deeper trees cost ~4x per depth step for
#: little more mixing.
FALLBACK_MAX_DEPTH = 6


@dataclass
class PosteriorResult:
    """Posterior draws of a batch of galaxies from :func:`sample_posterior`, whatever the method.

    Parameters
    ----------
    samples : torch.Tensor
        ``(B, chains, n, d + 1)`` draws of ``(z, log_scale)``.
    method : torch.Tensor
        ``(B,)`` index into :data:`POSTERIOR_METHODS` of the method that drew each
        galaxy's samples (``is`` galaxies whose diagnostics failed are redrawn by NUTS).
    accept_rate, divergences : torch.Tensor
        ``(B, chains)`` of the MCMC galaxies (NaN and 0 for importance-sampled ones).
    pareto_k, is_ess : torch.Tensor
        ``(B,)`` PSIS tail shape and effective sample size of the importance weights
        (NaN where no importance sampling ran).
    """

    samples: torch.Tensor
    method: torch.Tensor
    accept_rate: torch.Tensor
    divergences: torch.Tensor
    pareto_k: torch.Tensor
    is_ess: torch.Tensor


def sample_posterior(model, observed: torch.Tensor, observation, map_result, *, cond=None, samples: int = 200,
                     chains: int = 4, warmup: int | None = None, generator: torch.Generator | None = None,
                     method: str | None = None, draws: int | None = None, fallback: str | None = "nuts",
                     proposal="auto", min_ess: float | None = None, max_draws: int | None = None,
                     scale: str = "redraw", **sampler_options):
    """Posterior samples of (z, log flux scale) of a batch of galaxies, about their MAP.

    Parameters
    ----------
    model : galgen.models.LatentModel
        Any model of the latent-model contract, in eval mode.
    observed : torch.Tensor
        ``(B, S, S)``.
    observation : galgen.physics.Observation
        Of the ``B`` galaxies.
    map_result : MAPResult
        Of :func:`~galgen.inference.fit_map` on the same galaxies: MCMC chains start at
        the MAP plus N(0, 0.01^2) jitter; importance sampling centres its proposal there.
    cond : torch.Tensor, optional
        ``(B, C)`` raw conditions.
    samples : int, optional
        Draws per chain (after warm-up).
    chains : int, optional
    warmup : int, optional
        MCMC warm-up iterations (step size and metric adaptation); default ``samples``.
    generator : torch.Generator, optional
    method : {"is", "laplace", "nuts", "hmc"}, optional
        ``is`` (the default): importance sampling from a Student-t about the Laplace
        approximation with PSIS (:func:`~galgen.inference.importance.importance_sample`);
        galaxies whose Pareto k exceeds
        :data:`~galgen.inference.importance.K_HAT_THRESHOLD` (or, with ``min_ess``,
        that fall short of it) have their posterior searched again for modes
        (:data:`SEARCH_STARTS` starts from the amortised posterior's draws and their own
        resampled draws, each polished by up to :data:`SEARCH_REFINE`
        Levenberg-Marquardt steps) and are importance-sampled once more from the
        mixture of those modes, the better run kept; those whose k still exceeds it are
        redrawn by ``fallback``;
        ``laplace``: draws of the Laplace approximation itself (no weights; the k
        diagnostic still computed); ``nuts`` / ``hmc``: batched MCMC
        (:func:`~galgen.inference.hmc_sample`). Default: ``sampler_options["sampler"]``
        where given (the older spelling), else ``is``.
    draws : int, optional
        Proposals per galaxy of ``is`` / ``laplace`` (default ``max(1024, 4 * chains *
        samples)``).
    fallback : {"nuts", None}, optional
        What redraws an ``is`` galaxy whose Pareto k stays above the threshold: NUTS,
        or nothing (its weighted draws are kept, flagged by ``pareto_k``; for
        calibration studies that measure the importance sampler itself). The NUTS
        fallback starts at the refined mode with a fixed dense metric, the Laplace
        covariance with the prior's ``upper`` curvature
        (:func:`~galgen.inference.lm.prior_curvature`), adapts its step size only, and
        grows trees to :data:`FALLBACK_MAX_DEPTH` at most (or ``max_depth`` if smaller).
    proposal : {"auto", "laplace", "amortized"} or AmortizedPosterior, optional
        What ``is`` proposes from: ``laplace``, the Student-t about the Laplace
        approximation alone; ``amortized``, a mixture of t's about the posterior modes
        found from the model's amortised posterior's draws
        (:func:`~galgen.inference.amortized.multimodal_laplace`; the amortised
        posterior is kept with the model by
        :func:`~galgen.inference.amortized.attach_amortized_posterior`, and pretrained
        models that ship one have it attached when loaded), with the amortised
        posterior's own draws as a defensive 10% unless ``scale="integrated"``;
        ``auto`` (the default): ``amortized`` where the model has one, else
        ``laplace``; or an :class:`~galgen.inference.amortized.AmortizedPosterior`.
        For ``sdss-vae``, ``laplace`` is about twice as fast and its diagnostics pass
        more often, but it misses modes of the shape that no importance weight can
        flag: simulation-based calibration under-covers e1 and e2 (0.59-0.60 at 68%;
        ``docs/inference.md``).
    min_ess, max_draws : optional
        ``is``: a galaxy whose effective sample size is below ``min_ess`` after
        ``draws`` proposals is proposed further rounds of ``draws // 4``, each from a
        proposal adapted to its weighted draws so far, up to ``max_draws`` (default
        ``16 * draws``); see :func:`~galgen.inference.importance.importance_sample`. A
        galaxy that after :data:`GIVE_UP_ROUNDS` times ``draws`` could not reach
        ``min_ess`` by ``max_draws`` at its efficiency so far stops early and is
        searched again (above).
    scale : {"redraw", "integrated", "joint", "fixed"}, optional
        How ``is`` treats the log flux scale ``s``. ``joint``: proposed with the latents
        ``z``, the amortised posterior's own draws a defensive 10% of the mixture.
        ``redraw`` (the default): the same, then ``s`` of every resampled draw drawn
        again from its exact conditional given ``z`` (:func:`draw_log_scale`), so that
        copies of one heavy draw spread over the flux posterior. ``integrated``:
        ``z`` proposed alone and weighted by the posterior with ``s`` integrated out
        (:func:`marginal_log_prob`; Rao-Blackwellised: more effective draws, without
        the defensive component), ``s`` then drawn from its conditional.
        ``fixed``: ``s`` held at ``map_result.log_scale`` (0 for ``fit_map(...,
        fit_flux=False)``: the model's own brightness, as its prior draws have it) and
        ``z`` alone proposed from the Laplace t of ``z`` given it; for ``is`` and
        ``laplace`` only, without a NUTS fallback (pass ``fallback=None``); the second
        search holds ``s`` too, with the amortised posterior's draws (where the model
        has one) as candidates only. For a model whose latent code carries the
        brightness (``sdss-vae``), a free ``s`` with its flat prior makes a thin curved
        ridge of the posterior along which the code's brightness trades off against
        ``s``; holding ``s`` removes it (``docs/inference.md``).
    **sampler_options
        :func:`~galgen.inference.hmc_sample` options: ``n_leapfrog``, ``metric``
        (``"diag"`` or ``"dense"``), ``max_depth``.

    Returns
    -------
    PosteriorResult
    """
    method = sampler_options.pop("sampler", None) if method is None else method
    method = "is" if method is None else method
    sampler_options.pop("sampler", None)
    if method not in POSTERIOR_METHODS:
        raise GalgenInputError(f"method: one of {POSTERIOR_METHODS}, got {method!r}")
    if fallback not in ("nuts", None):
        raise GalgenInputError(f"fallback: 'nuts' or None, got {fallback!r}")
    if scale not in SCALE_TREATMENTS:
        raise GalgenInputError(f"scale: one of {SCALE_TREATMENTS}, got {scale!r}")
    fixed = scale == "fixed"
    if fixed and method not in ("is", "laplace"):
        raise GalgenInputError(f"scale: 'fixed' goes with method 'is' or 'laplace', got {method!r}")
    if fixed and method == "is" and fallback is not None:
        raise GalgenInputError("scale: 'fixed' has no NUTS fallback; pass fallback=None (its failing galaxies "
                               "keep their weighted draws, flagged by pareto_k)")
    if fixed and (proposal == "amortized" or isinstance(proposal, AmortizedPosterior)):
        raise GalgenInputError("proposal: an amortised posterior proposes (z, s); with scale='fixed' use "
                               "'auto' or 'laplace'")
    dev = observation.psf.device
    B = len(observed)
    nan = torch.full((B,), math.nan)
    if method in ("hmc", "nuts"):
        h = _mcmc(model, observed, observation, map_result, cond, samples, chains, warmup, generator, method,
                  sampler_options)
        return PosteriorResult(samples=h.samples.cpu(), method=torch.full((B,), POSTERIOR_METHODS.index(method)),
                               accept_rate=h.accept_rate.cpu(), divergences=h.divergences.cpu(), pareto_k=nan,
                               is_ess=nan.clone())
    n_prop = max(1024, 4 * chains * samples) if draws is None else int(draws)
    chunk = 64
    q = _amortized(model, proposal, cond) if method == "is" else None
    mean, tril = laplace_approximation(model, observed, observation, map_result, cond, fit_flux=not fixed)
    mode, mode_tril = mean, tril  # the polished MAP (the NUTS fallback starts there)
    prop, logw = None, None
    if q is not None and not fixed:  # modes found from the amortised posterior's draws; its draws a defensive 10%
        prop = amortized_proposal(q, model, observed, observation)
        mean, tril, logw = multimodal_laplace(model, observed, observation, mean, tril, prop, generator=generator)
    adaptive = method == "is" and min_ess is not None
    options = dict(draws=-(-n_prop // chunk) * chunk, samples=samples, chains=chains, generator=generator,
                   chunk=chunk, weighted=method == "is", df=7 if method == "is" else None,
                   min_ess=min_ess if method == "is" else None, max_draws=max_draws)
    d = mean.shape[-1] - 1
    integrated = scale == "integrated" and method == "is"  # propose z alone; s from its exact conditional

    def draw(rows, loc, tril_, lw, prop_, **kw):
        obs_r = observation if rows is None else observation.select(rows.to(dev))
        obs_x = observed if rows is None else observed[rows.to(dev)]
        c = cond if cond is None or rows is None else cond[rows.to(cond.device)]
        if integrated:
            lp = marginal_log_prob(model, obs_r, obs_x, c, chains=chunk)
            return importance_sample(lp, loc[..., :d], tril_[..., :d, :d], log_weights=lw, **options, **kw)
        if fixed:  # z alone, the flux scale held at the mode's
            lp = _held_scale(posterior_log_prob(model, obs_r, obs_x, c, chains=chunk), loc[..., 0, d] if lw is not None
                             else loc[:, d], chunk)
            return importance_sample(lp, loc[..., :d], tril_, log_weights=lw, **options, **kw)
        lp = posterior_log_prob(model, obs_r, obs_x, c, chains=chunk)
        return importance_sample(lp, loc, tril_, proposal=prop_, mix=0.1, log_weights=lw, **options, **kw)

    # galaxies hopeless at their proposal's efficiency stop early, and have their modes searched again
    r = draw(None, mean, tril, logw, prop, give_up=GIVE_UP_ROUNDS * options["draws"] if adaptive else None)
    if method == "is":
        r, mode = _search_again(model, observed, observation, cond, q, r, mode, mode_tril, min_ess, draw,
                                integrated or fixed, generator, fit_flux=not fixed)
    if integrated or fixed:  # the flux scale's column: drawn below, or the held value
        held = mean[:, d].to(r.samples) if fixed else r.samples.new_zeros(B)
        draws_ = torch.cat([r.samples, held[:, None, None, None].expand(*r.samples.shape[:-1], 1)], -1)
    else:
        draws_ = r.samples
    poor = torch.nonzero(~(r.pareto_k <= K_HAT_THRESHOLD)).flatten()
    if scale in ("redraw", "integrated") and method == "is":  # s from its conditional (draws not redrawn by NUTS)
        keep = torch.ones(B, dtype=torch.bool)
        if fallback == "nuts":
            keep[poor] = False
        kept = torch.nonzero(keep).flatten()
        if len(kept):
            kd = kept.to(dev)
            z = draws_[kept, ..., :d].reshape(len(kept), chains * samples, d)
            s = draw_log_scale(model, observation.select(kd), observed[kd], z, None if cond is None else
                               cond[kd.to(cond.device)], generator)
            draws_[kept, ..., d] = s.to(draws_).view(len(kept), chains, samples)
    out = PosteriorResult(samples=draws_, method=torch.full((B,), POSTERIOR_METHODS.index(method)),
                          accept_rate=torch.full((B, chains), math.nan), divergences=torch.zeros(B, chains,
                                                                                                 dtype=torch.long),
                          pareto_k=r.pareto_k, is_ess=r.ess)
    if method == "is" and fallback == "nuts" and len(poor):  # the proposal misses these posteriors: MCMC
        c = None if cond is None else cond[poor.to(cond.device)]
        pd = poor.to(dev)
        obs_p, res_p = observation.select(pd), map_result.select(poor)
        # the metric: a Laplace covariance with the flow's thin directions, fixed (a few dozen
        # warm-up draws of two chains estimate a 17-d covariance worse than it is known)
        x_map = torch.cat([res_p.z, res_p.log_scale[:, None]], 1).to(dev)
        x0 = mode[pd].to(x_map)
        x0 = torch.where(torch.isfinite(x0).all(1, keepdim=True), x0, x_map)  # a polish that diverged
        _, ftril = laplace_approximation(model, observed[pd], obs_p, SimpleNamespace(z=x0[:, :d], log_scale=x0[:, d]),
                                         c, refine=0, curvature="upper")
        opts = {**sampler_options, "metric": "dense", "adapt_mass": False,
                "max_depth": min(int(sampler_options.get("max_depth", 8)), FALLBACK_MAX_DEPTH),
                "inv_mass": (ftril @ ftril.transpose(1, 2)).to(dev, res_p.z.dtype)}
        h = _mcmc(model, observed[pd], obs_p, res_p, c, samples, chains, warmup, generator, "nuts", opts, x0=x0)
        out.samples[poor] = h.samples.cpu()
        out.method[poor] = POSTERIOR_METHODS.index("nuts")
        out.accept_rate[poor] = h.accept_rate.cpu().float()
        out.divergences[poor] = h.divergences.cpu().long()
    return out


#: A galaxy whose importance sampling fails its diagnostics has its posterior searched again for
#: modes: this many starts (its best mode among them), the best apart of ``SEARCH_CANDIDATES``
#: draws of the amortised posterior and of its own resampled draws, each polished by up to
#: ``SEARCH_REFINE`` Levenberg-Marquardt steps. ``sdss-vae``'s posteriors of GalSim galaxies that
#: fail hold local modes 5-16 latent units apart and up to 11 nats above the MAP, which 10 steps
#: from 3 starts miss.
SEARCH_STARTS = 6
SEARCH_CANDIDATES = 256
SEARCH_REFINE = 50

#: With ``min_ess``, a galaxy that after ``GIVE_UP_ROUNDS`` times its first round of draws could
#: not reach ``min_ess`` by ``max_draws`` at its efficiency so far stops drawing and is searched
#: again (``give_up`` of :func:`~galgen.inference.importance.importance_sample`).
GIVE_UP_ROUNDS = 4


def _search_again(model, observed, observation, cond, q, r, mode, mode_tril, min_ess, draw, integrated, generator,
                  fit_flux=True):
    """Importance-sample once more, from more posterior modes, the galaxies whose diagnostics fail.

    Their modes are searched from the amortised posterior's draws (where the model has one)
    and from their own resampled draws, which lie where the weight was
    (:func:`~galgen.inference.amortized.multimodal_laplace` with ``SEARCH_*``); the new run
    replaces the first where its Pareto k passes or is lower. Returns the result and the
    modes, the best mode found for these galaxies (where a NUTS fallback starts).
    ``integrated``: the draws are of ``z`` alone (the mode's flux scale is added to them);
    ``fit_flux=False``: the flux scale is held (``scale="fixed"``).
    """
    short = ~(r.pareto_k <= K_HAT_THRESHOLD)
    if min_ess is not None:
        short |= ~(r.ess >= min_ess)
    idx = torch.nonzero(short).flatten()
    if not len(idx):
        return r, mode
    dev = observation.psf.device
    di = idx.to(dev)
    obs_i, x_i = observation.select(di), observed[di]
    c = None if cond is None else cond[di.to(cond.device)]
    prop = None if q is None else amortized_proposal(q, model, x_i, obs_i)
    seen = r.samples[idx].reshape(len(idx), -1, r.samples.shape[-1]).to(dev, torch.float64)
    if integrated:  # z alone: with the flux scale of the mode
        seen = torch.cat([seen, mode[di, None, -1:].to(seen).expand(-1, seen.shape[1], 1)], -1)
    means, trils, logw = multimodal_laplace(model, x_i, obs_i, mode[di], mode_tril[di], prop, starts=SEARCH_STARTS,
                                            candidates=SEARCH_CANDIDATES, refine=SEARCH_REFINE,
                                            generator=generator, extra=seen, cond=c, fit_flux=fit_flux)
    again = draw(idx, means, trils, logw, prop)
    better = (again.pareto_k <= K_HAT_THRESHOLD) | (again.pareto_k < r.pareto_k[idx])
    b = idx[better]
    r.samples[b], r.pareto_k[b], r.ess[b] = again.samples[better], again.pareto_k[better], again.ess[better]
    if r.draws is not None and again.draws is not None:  # the draws of both runs
        r.draws[idx] += again.draws.to(r.draws)
    mode = mode.clone()
    mode[di] = means[torch.arange(len(idx), device=dev), logw.argmax(1)].to(mode)
    return r, mode


def _amortized(model, proposal, cond=None):
    """The amortised posterior that ``proposal`` of :func:`sample_posterior` names, or None."""
    if not isinstance(proposal, AmortizedPosterior) and proposal not in ("auto", "laplace", "amortized"):
        raise GalgenInputError(f"proposal: 'auto', 'laplace', 'amortized' or an AmortizedPosterior, got {proposal!r}")
    if cond is not None:  # amortised posteriors are unconditional
        if proposal == "amortized" or isinstance(proposal, AmortizedPosterior):
            raise GalgenInputError("proposal: amortised posteriors of conditional models are not supported")
        return None
    if isinstance(proposal, AmortizedPosterior):
        return proposal
    q = attached_amortized_posterior(model) if proposal != "laplace" else None
    if q is None and proposal == "amortized":
        raise GalgenInputError("proposal: 'amortized', but this model has no amortised posterior "
                               "(train one with pipelines/train_amortized.py and attach it)")
    return q


def _mcmc(model, observed, observation, map_result, cond, samples, chains, warmup, generator, sampler, options,
          x0=None):
    dev = observation.psf.device
    res = map_result
    x0 = (torch.cat([res.z, res.log_scale[:, None]], 1) if x0 is None else x0).to(dev, res.z.dtype)
    init = x0[:, None, :] + 0.01 * torch.randn(len(observed), chains, x0.shape[1], generator=generator, device=dev)
    lp = posterior_log_prob(model, observation, observed, cond, chains=chains)
    return hmc_sample(lp, init, n_samples=samples, n_warmup=samples if warmup is None else warmup,
                      generator=generator, sampler=sampler, **options)


def thin_draws(samples: torch.Tensor, n_draws: int) -> torch.Tensor:
    """Draws thinned evenly over all chains.

    Parameters
    ----------
    samples : torch.Tensor
        ``(G, C, N, k)`` chains.
    n_draws : int

    Returns
    -------
    torch.Tensor
        ``(G, m, k)`` with ``m = min(n_draws, C * N)``.
    """
    draws = samples.reshape(samples.shape[0], -1, samples.shape[-1])
    pick = torch.linspace(0, draws.shape[1] - 1, min(n_draws, draws.shape[1])).round().long()
    return draws[:, pick]


def _posterior(model, b, res, samples, chains, warmup, gen, **options):
    h = sample_posterior(model, b.observed, b.observation, res, cond=b.cond, samples=samples, chains=chains,
                         warmup=warmup, generator=gen, **options)
    diag = summarize_chains(h.samples.cpu().numpy())
    derived, mean, std = posterior_images(model, b.observation, h.samples, b.cond)
    return {"samples": h.samples.cpu().numpy(), "rhat": diag["rhat"], "ess_bulk": diag["ess_bulk"],
            "ess_tail": diag["ess_tail"], "accept_rate": h.accept_rate.cpu().numpy(),
            "divergences": h.divergences.cpu().numpy().astype(np.int32),
            "posterior_mean": mean.cpu().numpy(), "posterior_std": std.cpu().numpy(),
            "derived_draws": derived.numpy(), "derived_quantiles": credible_intervals(derived.numpy()),
            "posterior_method": h.method.numpy().astype(np.int8), "pareto_k": h.pareto_k.numpy(),
            "is_ess": h.is_ess.numpy()}


def posterior_images(model, observation, samples: torch.Tensor, cond=None, *, n_draws: int = DERIVED_DRAWS,
                     chunk: int = 32):
    """Derived quantities and posterior predictive images from (thinned) posterior draws.

    Parameters
    ----------
    model : galgen.models.LatentModel
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
    sub = thin_draws(samples, n_draws).to(observation.psf.device)
    derived, s1, s2 = [], 0.0, 0.0
    with torch.no_grad():
        for a in range(0, sub.shape[1], chunk):
            part = sub[:, a:a + chunk]  # (G, m, d+1)
            m = part.shape[1]
            flat = part.transpose(0, 1).reshape(m * G, -1)
            c = None if cond is None else cond.repeat(m, 1)
            intr = model.decode(flat[:, :-1], c).float() * flat[:, -1].exp()[:, None, None]
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
