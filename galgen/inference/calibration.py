"""Simulation-based calibration (SBC) of galgen posteriors.

Are the credible intervals of a fit honest? SBC (Talts et al. 2018) answers it without
any real data: draw a galaxy from the model's own prior, observe it through the physics
layer with a real PSF and noise, sample its posterior with the same code that fits real
data, and record where the true value falls among the posterior draws. If the sampler
and the model agree, the rank of the truth is uniform and a 68% interval holds the truth
68% of the time.

The quantities checked are the derived ones astronomers use (flux, half-light radius,
e1, e2, :mod:`galgen.inference.derived`), plus every latent coordinate. The latent code
is drawn from the model's prior (a VAE's flow prior, or N(0, I)); the log flux scale
multiplying the decoded galaxy has a flat prior in the posterior, and the true value is
0 (the decoder's own flux), for which the flat-prior posterior of this location
parameter is calibrated too.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from ..errors import GalgenInputError
from ..models.base import sample_latents
from .derived import DERIVED_NAMES, derived_quantities
from .diagnostics import summarize_chains
from .fit import posterior_images, sample_posterior, thin_draws
from .map import fit_map

__all__ = ["simulation_based_calibration", "coverage", "rank_uniformity"]


def simulation_based_calibration(model, observation, *, samples: int = 200, chains: int = 4,
                                 warmup: int | None = None, n_leapfrog: int = 16, n_draws: int = 199,
                                 prior: str | None = None, max_iter: int = 300, log_scale=None,
                                 metric: str = "diag", sampler: str = "hmc", max_depth: int = 8,
                                 seed: int = 0, latent_names=None, draws: int | None = None,
                                 fallback: str | None = "nuts", proposal="auto", min_ess: float | None = None,
                                 max_draws: int | None = None, scale: str = "redraw") -> dict:
    """Simulate one galaxy per observation from the prior, sample its posterior, rank the truth.

    Parameters
    ----------
    model : galgen.models.LatentModel
        Any model of the latent-model contract, in eval mode, on the observation's
        device; the truths are drawn from ``model.prior()`` (choose a VAE's prior with
        ``model.with_prior(name)``).
    observation : galgen.physics.Observation
        ``B`` galaxies' PSFs and noise (e.g. :func:`galgen.data.observation_from_cutouts`
        of held-out data); one simulated galaxy per entry. Batch over calls for large
        studies.
    samples, chains, warmup, n_leapfrog : int, optional
        HMC settings, as in :func:`galgen.inference.fit_file`.
    n_draws : int, optional
        Posterior draws (thinned evenly over all chains) against which the truth is
        ranked; ranks run from 0 to ``n_draws`` (199 makes the 68% and 95% rank
        intervals of :func:`coverage` exact).
    prior : str, optional
        Deprecated: pass ``model.with_prior(name)`` (the prior used both to simulate
        and to fit).
    max_iter : int, optional
        MAP iterations of the starting point.
    log_scale : torch.Tensor, optional
        ``(B,)`` true log flux scales multiplying the decoded galaxies (default 0: the
        decoder's own flux, right for a VAE). A parametric model renders unit flux: give
        it realistic fluxes, e.g. ``SersicModel.initial_log_scale`` of the observed cutouts.
        The fits' log flux scale has a flat prior, so that any fixed truth is covered as
        a location parameter is, up to the non-Gaussianity of its likelihood.
    metric : {"diag", "dense"}, optional
        HMC mass matrix, as in :func:`galgen.inference.fit_file`.
    sampler : {"hmc", "nuts", "is", "laplace"}, optional
        The posterior method of :func:`~galgen.inference.sample_posterior`.
    max_depth : int, optional
        As in :func:`galgen.inference.fit_file`.
    seed : int, optional
    latent_names : sequence of str, optional
        Names of the latent coordinates in ``names`` (default ``z0``, ``z1``, ...;
        e.g. ``model.latent_names``).
    draws, fallback, proposal, min_ess, max_draws, scale : optional
        Importance sampling's proposals per galaxy, fallback, proposal, adaptive
        number of draws and treatment of the flux scale, as in
        :func:`~galgen.inference.sample_posterior` (with ``scale="fixed"`` the MAP
        fits ``z`` alone, the flux scale held at the truth's 0).

    Returns
    -------
    dict
        ``names`` (derived names, then ``z0``...), ``truth`` ``(B, p)``, ``ranks``
        ``(B, p)`` int, ``draws`` ``(B, n_draws, p)``, ``rhat_max`` and
        ``ess_bulk_min`` ``(B,)`` of the latent chains, ``divergences`` ``(B,)``,
        ``wall_s``.
    """
    t0 = time.perf_counter()
    if prior is not None:
        warnings.warn("the prior= argument is deprecated: pass model.with_prior(name)", DeprecationWarning,
                      stacklevel=2)
        model = model.with_prior(prior)
    dev = observation.psf.device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    if observation.psf.ndim != 3 and observation.noise.variance_map.ndim != 3:
        raise GalgenInputError("observation: needs a per-galaxy PSF or variance map (B, ., .), one per simulated galaxy")
    B = observation.psf.shape[0] if observation.psf.ndim == 3 else observation.noise.variance_map.shape[0]
    if scale == "fixed" and log_scale is not None:
        raise GalgenInputError("log_scale: scale='fixed' holds the flux scale at 0, the decoder's own flux; "
                               "simulate without log_scale")
    with torch.no_grad():
        z_true = sample_latents(model.prior(), B, generator=gen).float()
        intr = model.decode(z_true).float()
        if log_scale is not None:
            log_scale = torch.as_tensor(log_scale, dtype=intr.dtype, device=intr.device).reshape(-1)
            if log_scale.shape != (B,) or not bool(torch.isfinite(log_scale).all()):
                raise GalgenInputError(f"log_scale: expected {B} finite values, got shape {tuple(log_scale.shape)}")
            intr = intr * log_scale.exp()[:, None, None]
        _, observed = observation.observe(intr, generator=gen)
    # with scale="fixed" the flux scale is held at the truth's (0): the MAP fits z alone
    res = fit_map(model, observed, observation, max_iter=max_iter, generator=gen, fit_flux=scale != "fixed")
    h = sample_posterior(model, observed, observation, res, samples=samples, chains=chains, warmup=warmup,
                         generator=gen, n_leapfrog=n_leapfrog, metric=metric, method=sampler, max_depth=max_depth,
                         draws=draws, fallback=fallback, proposal=proposal, min_ess=min_ess, max_draws=max_draws,
                         scale=scale)
    derived, _, _ = posterior_images(model, observation, h.samples, n_draws=n_draws)
    d = z_true.shape[1]
    draws = torch.cat([derived.double(), thin_draws(h.samples, n_draws)[..., :d].double().cpu()], 2).numpy()
    truth = torch.cat([derived_quantities(intr, observation.intrinsic_scale).cpu(), z_true.double().cpu()], 1).numpy()
    ranks = (draws < truth[:, None, :]).sum(1)
    diag = summarize_chains(h.samples.cpu().numpy())
    latent_names = list(latent_names) if latent_names is not None else [f"z{i}" for i in range(d)]
    return {"names": list(DERIVED_NAMES) + latent_names, "truth": truth, "ranks": ranks,
            "draws": draws, "rhat_max": diag["rhat"].max(1), "ess_bulk_min": diag["ess_bulk"].min(1),
            "divergences": h.divergences.sum(1).cpu().numpy(), "pareto_k": h.pareto_k.numpy(),
            "is_ess": h.is_ess.numpy(), "posterior_method": h.method.numpy(), "wall_s": time.perf_counter() - t0}


def coverage(ranks, n_draws: int, levels=(0.68, 0.95)) -> dict:
    """Empirical coverage of central credible intervals, from SBC ranks.

    The truth lies inside the central interval of level ``lev`` when its rank among the
    ``n_draws`` posterior draws is one of the central ``lev`` fraction of the
    ``n_draws + 1`` possible ranks. Counting ranks (rather than comparing with sample
    quantiles, which under-cover with a finite number of draws) makes the nominal
    level exact: choose ``n_draws`` so that ``(n_draws + 1) * (1 - lev) / 2`` is an
    integer (199 serves 68% and 95%); otherwise the exact nominal fraction of included
    ranks is returned beside the empirical one.

    Parameters
    ----------
    ranks : array_like
        ``(B, p)`` integer ranks in ``0..n_draws``.
    n_draws : int
    levels : sequence of float, optional

    Returns
    -------
    dict
        ``{level: (fraction (p,), nominal, standard error)}``: the fraction of galaxies
        whose truth lies inside the interval, the exact nominal coverage, and the
        binomial standard error of the fraction at the nominal coverage.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> mu = rng.normal(size=(4000, 1))            # truth ~ prior N(0, 1)
    >>> x = mu + rng.normal(size=mu.shape)         # one observation, unit noise
    >>> post = x[:, None] / 2 + rng.normal(size=(4000, 199, 1)) * np.sqrt(0.5)
    >>> frac, nominal, se = coverage((post < mu[:, None]).sum(1), 199)[0.68]
    >>> bool(abs(frac[0] - nominal) < 3 * se)
    True
    """
    ranks = np.asarray(ranks)
    L1 = n_draws + 1
    out = {}
    for lev in levels:
        lo = int(np.ceil(L1 * (1 - lev) / 2 - 1e-9))
        hi = L1 - lo  # ranks lo .. hi-1 are inside
        nominal = (hi - lo) / L1
        frac = ((ranks >= lo) & (ranks < hi)).mean(0)
        out[lev] = (frac, nominal, float(np.sqrt(nominal * (1 - nominal) / len(ranks))))
    return out


def rank_uniformity(ranks, n_draws: int, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Chi-square test that SBC ranks are uniform.

    Parameters
    ----------
    ranks : array_like
        ``(B, p)`` integer ranks in ``0..n_draws``.
    n_draws : int
    bins : int, optional
        Equal-width bins over the ``n_draws + 1`` possible ranks (``n_draws + 1`` must be
        divisible by ``bins`` for exactly equal bins; otherwise bins differ by one rank
        and the expected counts account for it).

    Returns
    -------
    counts : numpy.ndarray
        ``(bins, p)``.
    p_value : numpy.ndarray
        ``(p,)`` chi-square p-values with ``bins - 1`` degrees of freedom.
    """
    from scipy.stats import chi2

    ranks = np.asarray(ranks)
    edges = np.linspace(0, n_draws + 1, bins + 1).round().astype(int)
    counts = np.stack([((ranks >= a) & (ranks < b)).sum(0) for a, b in zip(edges[:-1], edges[1:])])
    expected = np.diff(edges)[:, None] / (n_draws + 1) * len(ranks)
    stat = ((counts - expected) ** 2 / expected).sum(0)
    return counts, chi2.sf(stat, bins - 1)
