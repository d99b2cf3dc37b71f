"""MCMC convergence diagnostics for thousands of galaxies at once.

Rank-normalised split R-hat and bulk / tail effective sample sizes of Vehtari, Gelman,
Simpson, Carpenter & Bürkner (2021), the definitions ``arviz`` implements, written for
arrays of shape ``(..., chains, draws)`` so that every galaxy and parameter is handled in
one vectorised pass (arviz loops over variables in Python). The tests check the values
against ``arviz.rhat`` and ``arviz.ess`` on the same chains.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

__all__ = ["split_rhat", "ess_bulk", "ess_tail", "summarize_chains"]


def _split(x):
    half = x.shape[-1] // 2
    return np.concatenate([x[..., :half], x[..., -half:]], axis=-2)


def _z_scale(x):
    shape = x.shape
    flat = x.reshape(shape[:-2] + (-1,))
    ranks = rankdata(flat, axis=-1, method="average")
    z = ndtri((ranks - 0.375) / (flat.shape[-1] + 0.25))
    return z.reshape(shape)


def _rhat(x):
    n = x.shape[-1]
    between = n * np.var(x.mean(-1), axis=-1, ddof=1)
    within = np.mean(np.var(x, axis=-1, ddof=1), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt((between / within + n - 1) / n)


def _autocov(x):
    n = x.shape[-1]
    m = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(x - x.mean(-1, keepdims=True), n=m, axis=-1)
    return np.fft.irfft(f * np.conj(f), n=m, axis=-1)[..., :n] / n


def _ess(x):
    """ESS of (..., chains, draws) with Geyer's initial monotone sequence (as arviz)."""
    chains, n = x.shape[-2:]
    acov = _autocov(x)
    mean_var = acov[..., 0].mean(-1) * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if chains > 1:
        var_plus = var_plus + np.var(x.mean(-1), axis=-1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = 1.0 - (mean_var[..., None] - acov.mean(-2)) / var_plus[..., None]
    rho[..., 0] = 1.0
    # Pairs (0,1), (2,3), ... up to the last one arviz's loop reaches (t odd, t < n - 3).
    t_max = n - 4 if (n - 4) % 2 else n - 5
    k_max = max((t_max + 1) // 2, 0)
    pairs = rho[..., 0:2 * k_max + 1:2] + rho[..., 1:2 * k_max + 2:2]
    negative = pairs < 0
    negative[..., 0] = False
    has_neg = negative.any(-1)
    k_end = np.where(has_neg, negative.argmax(-1), k_max)
    keep = np.arange(pairs.shape[-1]) < k_end[..., None]
    mono = np.minimum.accumulate(np.where(keep, pairs, np.inf), axis=-1)
    tau = -1.0 + 2.0 * np.where(keep, mono, 0.0).sum(-1)
    even_end = np.take_along_axis(rho, (2 * k_end)[..., None], -1)[..., 0]
    tau = tau + np.where(has_neg, np.where(even_end > 0, even_end, 0.0), even_end)
    total = chains * n
    tau = np.maximum(tau, 1.0 / np.log10(total))
    ess = total / tau
    constant = (x.max((-2, -1)) - x.min((-2, -1))) < np.finfo(float).resolution
    return np.where(constant, float(total), ess)


def split_rhat(x) -> np.ndarray:
    """Rank-normalised split R-hat: max of the bulk and folded (tail) versions.

    Parameters
    ----------
    x : array_like
        ``(..., chains, draws)``.

    Returns
    -------
    numpy.ndarray
        ``(...)``; values near 1 (below ~1.01) indicate convergence.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> float(split_rhat(rng.normal(size=(4, 1000)))) < 1.01
    True
    """
    x = np.asarray(x, dtype=float)
    bulk = _rhat(_z_scale(_split(x)))
    folded = np.abs(x - np.median(x.reshape(x.shape[:-2] + (-1,)), axis=-1)[..., None, None])
    tail = _rhat(_z_scale(_split(folded)))
    return np.maximum(bulk, tail)


def ess_bulk(x) -> np.ndarray:
    """Bulk effective sample size (rank-normalised split chains).

    Parameters
    ----------
    x : array_like
        ``(..., chains, draws)``.

    Returns
    -------
    numpy.ndarray
        ``(...)``.
    """
    return _ess(_z_scale(_split(np.asarray(x, dtype=float))))


def ess_tail(x) -> np.ndarray:
    """Tail effective sample size: the smaller ESS of the 5% and 95% quantile indicators.

    Parameters
    ----------
    x : array_like
        ``(..., chains, draws)``.

    Returns
    -------
    numpy.ndarray
        ``(...)``.
    """
    x = np.asarray(x, dtype=float)
    flat = x.reshape(x.shape[:-2] + (-1,))
    out = []
    for q in (0.05, 0.95):
        cut = np.quantile(flat, q, axis=-1)[..., None, None]
        out.append(_ess(_split((x <= cut).astype(float))))
    return np.minimum(*out)


def summarize_chains(x) -> dict:
    """R-hat and bulk/tail ESS of every galaxy and parameter.

    Parameters
    ----------
    x : array_like
        ``(galaxies, chains, draws, parameters)`` (as :class:`HMCResult.samples`).

    Returns
    -------
    dict of numpy.ndarray
        ``rhat``, ``ess_bulk``, ``ess_tail``, each ``(galaxies, parameters)``.
    """
    x = np.moveaxis(np.asarray(x, dtype=float), -1, 1)  # (G, d, C, N)
    return {"rhat": split_rhat(x), "ess_bulk": ess_bulk(x), "ess_tail": ess_tail(x)}
