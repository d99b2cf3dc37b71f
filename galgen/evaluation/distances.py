"""Distances between a real and a generated set of galaxies.

Three ways of telling whether generated galaxies look like real ones, each beside the
figure it would take for two sets of *real* galaxies (the floor a perfect generator
reaches with the same number of galaxies):

* **One statistic at a time** (:func:`compare_statistics`): the two-sample
  Kolmogorov-Smirnov statistic and the 1-Wasserstein distance (normalised by the real
  sample's standard deviation, as Holzschuh et al. 2022) of each morphology statistic, and
  the same two distances between two disjoint random halves of the real set.
* **All statistics at once** (:func:`c2st_statistics`): a classifier two-sample test
  (Lopez-Paz & Oquab 2017) with gradient-boosted trees on the vector of statistics;
  :func:`c2st_images` does the same with a small CNN on the observed stamps themselves,
  which sees what no summary statistic measures.
* **Within bins** of flux or size (:func:`binned_comparison`): medians, 16-84% spreads
  and KS distances of each statistic for galaxies of similar brightness or size.

Inputs are dicts of per-galaxy statistics (name -> float array of length ``N``) as
:func:`galgen.evaluation.statistics.morphology_statistics` returns them. NaN marks a
failed measurement and is dropped statistic by statistic; the bookkeeping keys ``ok`` and
``flag`` (and any boolean array) are never compared. Every function returns plain
JSON-serialisable Python objects (floats, ints, lists, dicts); a figure that cannot be
computed (too few finite values) is ``None``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from scipy import stats as _st

from ..errors import GalgenInputError

__all__ = ["ks_distance", "wasserstein_distance", "compare_statistics", "c2st_statistics", "c2st_images",
           "binned_comparison", "split_half", "DEFAULT_TRANSFORMS"]

#: Keys of a statistics dict that are bookkeeping, not statistics.
_NOT_STATISTICS = frozenset({"ok", "flag"})


def _log10_positive(x: np.ndarray) -> np.ndarray:
    """``log10(x)`` where ``x > 0``, NaN elsewhere."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full_like(x, np.nan)
    pos = x > 0
    out[pos] = np.log10(x[pos])
    return out


#: Transforms applied before distances and classifiers unless ``transforms`` says
#: otherwise: ``log10`` (non-positive values become NaN) for the scale-like statistics.
DEFAULT_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "flux": _log10_positive, "sigma": _log10_positive, "r50": _log10_positive}


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _finite(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise GalgenInputError(f"{name}: not an array of numbers ({exc})") from None
    return a[np.isfinite(a)]


def _check_stats(d, arg: str) -> tuple[dict[str, np.ndarray], int]:
    """Arrays of a statistics dict and its number of galaxies; raise naming ``arg``."""
    if not isinstance(d, Mapping):
        raise GalgenInputError(f"{arg}: expected a dict of per-galaxy statistics, got {type(d).__name__}")
    if not d:
        raise GalgenInputError(f"{arg}: empty dict of statistics")
    out, n = {}, None
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        a = np.asarray(v)
        if a.ndim != 1:
            raise GalgenInputError(f"{arg}['{k}']: expected a 1-D array of length N, got shape {a.shape}")
        if n is None:
            n = len(a)
        elif len(a) != n:
            raise GalgenInputError(f"{arg}['{k}']: {len(a)} values, but {arg} has {n} galaxies")
        out[k] = a
    if n == 0:
        raise GalgenInputError(f"{arg}: no galaxies (arrays of length 0)")
    return out, n


def _numeric(a: np.ndarray) -> bool:
    """Integer or real floating dtype (booleans are masks, not statistics)."""
    return bool(np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating))


def _statistic_names(d: dict[str, np.ndarray]) -> list[str]:
    return [k for k, a in d.items() if k not in _NOT_STATISTICS and _numeric(a)]


def _resolve_names(real: dict, gen: dict | None, names, exclude=()) -> list[str]:
    """The statistics compared: ``names`` checked against both dicts, or the common default."""
    if names is None:
        r = [k for k in _statistic_names(real) if k not in exclude]
        if gen is not None:
            g = [k for k in _statistic_names(gen) if k not in exclude]
            if set(r) != set(g):
                raise GalgenInputError(
                    f"gen: statistics {sorted(g)} differ from those of real {sorted(r)} "
                    f"(missing: {sorted(set(r) - set(g))}, extra: {sorted(set(g) - set(r))}); "
                    f"pass names= to compare a subset")
        if not r:
            raise GalgenInputError("real: no numeric statistics to compare")
        return r
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise GalgenInputError("names: empty list of statistics")
    for k in names:
        for arg, d in (("real", real), ("gen", gen)):
            if d is None:
                continue
            if k not in d:
                raise GalgenInputError(f"names: '{k}' is not a statistic of {arg} (it has {sorted(d)})")
            if not _numeric(d[k]):
                raise GalgenInputError(f"names: '{k}' of {arg} is not numeric (dtype {d[k].dtype})")
    return names


def _transforms(transforms) -> dict[str, Callable]:
    t = dict(DEFAULT_TRANSFORMS)
    if transforms is None:
        return t
    if not isinstance(transforms, Mapping):
        raise GalgenInputError(f"transforms: expected a dict name -> function (or None), got "
                               f"{type(transforms).__name__}")
    for k, f in transforms.items():
        if f is None:
            t.pop(k, None)
        elif not callable(f):
            raise GalgenInputError(f"transforms['{k}']: not callable")
        else:
            t[k] = f
    return t


def _values(d: dict, name: str, tf: dict) -> np.ndarray:
    """Float64 values of one statistic after its transform (NaNs kept, infinities made NaN)."""
    a = np.asarray(d[name], dtype=np.float64)
    if name in tf:
        a = np.asarray(tf[name](a), dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def _float(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# distances of one statistic
# ---------------------------------------------------------------------------------------------

def ks_distance(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, NaNs dropped.

    Parameters
    ----------
    a, b : array_like
        Samples (any shape; flattened). Non-finite values are dropped.

    Returns
    -------
    float
        ``sup |F_a - F_b|`` in ``[0, 1]`` (:func:`scipy.stats.ks_2samp`); NaN if either
        sample has no finite value.

    Examples
    --------
    >>> ks_distance([1.0, 2.0, 3.0, float("nan")], [1.0, 2.0, 3.0])
    0.0
    >>> ks_distance([0.0, 1.0], [5.0, 6.0])
    1.0
    """
    a, b = _finite(a, "a"), _finite(b, "b")
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(_st.ks_2samp(a, b).statistic)


def wasserstein_distance(a, b, scale=None) -> float:
    """1-D Wasserstein-1 distance between two samples, divided by a scale.

    Parameters
    ----------
    a, b : array_like
        Samples (flattened); non-finite values are dropped. ``a`` is the reference
        (the real set).
    scale : float, optional
        Divisor; by default the standard deviation of ``a`` (``ddof=1``), which makes the
        distance dimensionless and comparable across statistics. ``scale=1`` gives the
        distance in the units of the samples.

    Returns
    -------
    float
        ``W1(a, b) / scale`` (:func:`scipy.stats.wasserstein_distance`); NaN if a sample
        is empty or the scale is zero or undefined.

    Examples
    --------
    >>> wasserstein_distance([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], scale=1)
    1.0
    >>> wasserstein_distance([0.0, 2.0], [1.0, 3.0])  # W1 = 1, std of a = sqrt(2)
    0.7071067811865475
    """
    a, b = _finite(a, "a"), _finite(b, "b")
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    if scale is None:
        scale = float(np.std(a, ddof=1)) if len(a) > 1 else float("nan")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        return float("nan")
    return float(_st.wasserstein_distance(a, b)) / scale


# ---------------------------------------------------------------------------------------------
# halves of a set
# ---------------------------------------------------------------------------------------------

def _halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    p = rng.permutation(n)
    return p[:n // 2], p[n // 2:]


def split_half(stats: dict, seed: int = 0) -> tuple[dict, dict]:
    """Two disjoint random halves of a statistics dict.

    The same random permutation is applied to every key (``ok`` and ``flag`` included),
    so a galaxy's statistics stay together. With an odd number of galaxies the second
    half has one more.

    Parameters
    ----------
    stats : dict of array_like
        Per-galaxy arrays of a common length ``N >= 2``.
    seed : int, optional

    Returns
    -------
    tuple of dict of numpy.ndarray
        ``(a, b)`` with ``N // 2`` and ``N - N // 2`` galaxies.

    Raises
    ------
    galgen.errors.GalgenInputError
        If ``stats`` is not a dict of equally long 1-D arrays or has fewer than 2 galaxies.

    Examples
    --------
    >>> a, b = split_half({"r50": np.arange(5.0), "ok": np.ones(5, bool)}, seed=1)
    >>> len(a["r50"]), len(b["r50"]), sorted(np.concatenate([a["r50"], b["r50"]]).tolist())
    (2, 3, [0.0, 1.0, 2.0, 3.0, 4.0])
    """
    d, n = _check_stats(stats, "stats")
    if n < 2:
        raise GalgenInputError(f"stats: {n} galaxy, at least 2 needed to split in halves")
    ia, ib = _halves(n, np.random.default_rng(seed))
    return {k: v[ia] for k, v in d.items()}, {k: v[ib] for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# per-statistic comparison with its floor
# ---------------------------------------------------------------------------------------------

def _location(values, side: str) -> dict:
    """Median, mean and 10th/90th percentiles of the finite values (None when there are none)."""
    v = values[np.isfinite(values)]
    if not len(v):
        return {f"{k}_{side}": None for k in ("median", "mean", "p10", "p90")}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {f"median_{side}": _float(p50), f"mean_{side}": _float(v.mean()), f"p10_{side}": _float(p10),
            f"p90_{side}": _float(p90)}


def compare_statistics(real: dict, gen: dict, *, names=None, seed: int = 0, transforms=None,
                       repeats: int = 10) -> dict:
    """KS and normalised W1 distances of each statistic, beside their real-vs-real floor.

    The real set is split into two disjoint random halves A and B. The **floor** is the
    distance between A and B: what a perfect generator would score given the finite
    sample. The **distance** is between the generated set, randomly subsampled to
    ``|B|`` galaxies, and half B. Both distances thus compare samples of the same sizes
    (``N/2`` vs ``N/2``), so their ratio is about 1 for a perfect generator. (Comparing all
    ``N`` real galaxies with ``N`` generated ones against a floor from halves would bias
    the floor high, by about ``sqrt(2)`` for both KS and W1, and flatter the generator.)
    The split and subsample are redrawn ``repeats`` times and the distances averaged,
    which steadies the ratio. (A generated set smaller than ``|B|`` is used whole, and its
    distance is then noisier than the floor's.) The distances between *all* real and *all* generated
    galaxies are also given (``ks_all``, ``w1_all``), more precise but to be read against
    ``floor / sqrt(2)`` rather than the floor.

    W1 is normalised by the standard deviation of the whole (transformed) real sample,
    for the distance and its floor alike.

    Parameters
    ----------
    real, gen : dict of array_like
        Per-galaxy statistics (name -> array of length N), NaN for failed measurements
        (dropped statistic by statistic). ``ok``, ``flag`` and boolean arrays are ignored.
    names : list of str, optional
        Statistics to compare; by default every numeric statistic of ``real`` (and then
        ``gen`` must have the same ones).
    seed : int, optional
        Seed of the splits and subsamples.
    transforms : dict, optional
        Name -> function applied to the values before the distances, updating
        :data:`DEFAULT_TRANSFORMS` (``log10`` of ``flux``, ``sigma``, ``r50``, with
        non-positive values dropped); map a name to ``None`` to compare its raw values.
        KS is unchanged by monotone transforms; W1 is not.
    repeats : int, optional
        Number of random splits averaged (10).

    Returns
    -------
    dict
        ``statistics``: name -> dict with ``ks``, ``w1`` (generated vs half B), ``ks_floor``,
        ``w1_floor`` (half A vs half B), ``ks_ratio``, ``w1_ratio`` (distance / floor),
        ``ks_all``, ``w1_all`` (all real vs all generated), ``ks_pvalue_all`` (of
        ``ks_all``), ``median_real``, ``median_gen``, ``mean_real``, ``mean_gen``,
        ``p10_real``, ``p90_real``, ``p10_gen``, ``p90_gen`` (of the raw, untransformed values),
        ``n_real``, ``n_gen`` (finite values after the transform), ``transformed`` (bool);
        ``summary``: ``w1_mean``, ``w1_floor_mean``, ``w1_ratio`` (their ratio), ``ks_mean``,
        ``ks_floor_mean``, ``ks_ratio`` over the statistics where all are defined
        (``names``); plus ``n_real``, ``n_gen``, ``repeats``, ``seed``. Undefined figures
        are ``None``.

    Raises
    ------
    galgen.errors.GalgenInputError
        For an empty set, arrays of unequal lengths, different statistics in ``real`` and
        ``gen``, or an unknown name.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> real = {"e1": rng.normal(0, 0.3, 2000)}
    >>> gen = {"e1": rng.normal(0.3, 0.3, 2000)}
    >>> res = compare_statistics(real, gen)
    >>> res["statistics"]["e1"]["w1_ratio"] > 5
    True
    """
    r, nr = _check_stats(real, "real")
    g, ng = _check_stats(gen, "gen")
    names = _resolve_names(r, g, names)
    tf = _transforms(transforms)
    repeats = int(repeats)
    if repeats < 1:
        raise GalgenInputError(f"repeats: {repeats}, at least 1 needed")
    if nr < 4:
        raise GalgenInputError(f"real: {nr} galaxies, at least 4 needed to split in halves")
    rng = np.random.default_rng(seed)
    rv = {k: _values(r, k, tf) for k in names}
    gv = {k: _values(g, k, tf) for k in names}
    scales = {k: np.nanstd(rv[k], ddof=1) if np.isfinite(rv[k]).sum() > 1 else np.nan for k in names}
    acc = {k: np.zeros(4) for k in names}  # ks, w1, ks_floor, w1_floor summed over repeats
    cnt = {k: np.zeros(4) for k in names}
    for _ in range(repeats):
        ia, ib = _halves(nr, rng)
        ig = rng.permutation(ng)[:len(ib)]
        for k in names:
            scale = scales[k]
            a, b, x = rv[k][ia], rv[k][ib], gv[k][ig]
            vals = (ks_distance(x, b), wasserstein_distance(b, x, scale),
                    ks_distance(a, b), wasserstein_distance(b, a, scale))
            for j, v in enumerate(vals):
                if math.isfinite(v):
                    acc[k][j] += v
                    cnt[k][j] += 1
    per = {}
    for k in names:
        m = np.where(cnt[k] == repeats, acc[k] / np.maximum(cnt[k], 1), np.nan)
        ks, w1, ksf, w1f = (float(v) for v in m)
        fr, fg = np.isfinite(rv[k]), np.isfinite(gv[k])
        raw_r = np.asarray(r[k], dtype=np.float64)
        raw_g = np.asarray(g[k], dtype=np.float64)
        if fr.any() and fg.any():
            kt = _st.ks_2samp(rv[k][fr], gv[k][fg])
            ks_all, ks_p = kt.statistic, kt.pvalue
        else:
            ks_all = ks_p = np.nan
        per[k] = {
            "ks": _float(ks), "w1": _float(w1), "ks_floor": _float(ksf), "w1_floor": _float(w1f),
            "ks_ratio": _float(ks / ksf) if ksf > 0 else None,
            "w1_ratio": _float(w1 / w1f) if w1f > 0 else None,
            "ks_all": _float(ks_all), "ks_pvalue_all": _float(ks_p),
            "w1_all": _float(wasserstein_distance(rv[k], gv[k], scales[k])),
            **_location(raw_r, "real"), **_location(raw_g, "gen"),
            "n_real": int(fr.sum()), "n_gen": int(fg.sum()), "transformed": k in tf,
        }
    used = [k for k in names if all(per[k][f] is not None for f in ("ks", "w1", "ks_floor", "w1_floor"))]
    summary = {"names": used}
    for f in ("w1", "ks"):
        if used:
            mean = float(np.mean([per[k][f] for k in used]))
            floor = float(np.mean([per[k][f + "_floor"] for k in used]))
            summary.update({f"{f}_mean": mean, f"{f}_floor_mean": floor,
                            f"{f}_ratio": _float(mean / floor) if floor > 0 else None})
        else:
            summary.update({f"{f}_mean": None, f"{f}_floor_mean": None, f"{f}_ratio": None})
    return {"statistics": per, "summary": summary, "n_real": nr, "n_gen": ng, "repeats": repeats,
            "seed": int(seed)}


# ---------------------------------------------------------------------------------------------
# classifier two-sample tests
# ---------------------------------------------------------------------------------------------

def _binomial_result(correct: int, n: int) -> dict:
    """Accuracy, its standard error under the null and the one-sided binomial p-value."""
    return {"accuracy": correct / n, "se": math.sqrt(0.25 / n), "n": int(n),
            "p_value": float(_st.binomtest(int(correct), int(n), 0.5, alternative="greater").pvalue)}


def _cv_accuracy(x0: np.ndarray, x1: np.ndarray, rng: np.random.Generator, folds: int, seed: int,
                 threads: int | None) -> dict:
    """Balanced, stratified k-fold accuracy of gradient-boosted trees telling ``x0`` from ``x1``."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    m = min(len(x0), len(x1))
    if m < folds:
        raise GalgenInputError(f"real, gen: {m} galaxies per class after balancing, fewer than folds={folds}")
    x0 = x0[rng.permutation(len(x0))[:m]]
    x1 = x1[rng.permutation(len(x1))[:m]]
    x = np.concatenate([x0, x1])
    y = np.concatenate([np.zeros(m, int), np.ones(m, int)])
    correct = 0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = HistGradientBoostingClassifier(max_iter=100, max_leaf_nodes=15, random_state=seed)
        with threadpool_limits(threads):
            clf.fit(x[train], y[train])
            correct += int((clf.predict(x[test]) == y[test]).sum())
    return _binomial_result(correct, 2 * m)


def c2st_statistics(real: dict, gen: dict, *, names=None, seed: int = 0, folds: int = 5,
                    transforms=None, threads: int | None = 1) -> dict:
    """Classifier two-sample test on the vector of morphology statistics.

    A :class:`sklearn.ensemble.HistGradientBoostingClassifier` (which handles the NaNs of
    failed measurements natively) learns to tell real from generated galaxies; its
    accuracy on held-out folds of a stratified k-fold cross-validation is 0.5 when the two
    sets are indistinguishable (in these statistics, to this classifier) and rises towards
    1 as they differ. The larger set is randomly subsampled so both classes are equally
    many. The standard error ``sqrt(0.25 / n)`` and the one-sided p-value (binomial,
    ``accuracy > 0.5``) treat the ``n`` held-out predictions as independent, the usual
    approximation for cross-validated C2ST. All of ``real`` is used against ``gen`` (the
    null distribution is known, so no halving is needed); ``floor`` is the same test
    between two disjoint random halves of ``real``, a check that should read 0.5 within
    ``floor_se``.

    Parameters
    ----------
    real, gen : dict of array_like
        Per-galaxy statistics, as for :func:`compare_statistics`.
    names : list of str, optional
        Features (default: every numeric statistic, the same in both).
    seed : int, optional
        Seed of the subsampling, the folds and the classifier.
    folds : int, optional
        Number of cross-validation folds (5).
    transforms : dict, optional
        As for :func:`compare_statistics` (default ``log10`` of flux, sigma, r50).
    threads : int or None, optional
        OpenMP threads of the classifier during the call (:mod:`threadpoolctl`; ``None``:
        no limit). One thread is about as fast for a few thousand galaxies, and many times
        faster when the cores are shared with other work.

    Returns
    -------
    dict
        ``accuracy``, ``se`` (binomial standard error under the null), ``n`` (held-out
        predictions, both classes), ``p_value`` (one-sided, against 0.5), ``floor``,
        ``floor_se``, ``floor_n``, ``floor_p_value`` (real half vs real half), ``names``,
        ``folds``, ``seed``.

    Raises
    ------
    galgen.errors.GalgenInputError
        For bad sets or names, or fewer galaxies per class than folds.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> real = {"r50": rng.lognormal(0, 0.3, 600), "e": rng.uniform(0, 0.6, 600)}
    >>> gen = {"r50": 1.5 * rng.lognormal(0, 0.3, 600), "e": rng.uniform(0, 0.6, 600)}
    >>> c2st_statistics(real, gen)["accuracy"] > 0.7
    True
    """
    r, nr = _check_stats(real, "real")
    g, ng = _check_stats(gen, "gen")
    names = _resolve_names(r, g, names)
    tf = _transforms(transforms)
    folds = int(folds)
    if folds < 2:
        raise GalgenInputError(f"folds: {folds}, at least 2 needed")
    xr = np.stack([_values(r, k, tf) for k in names], 1)
    xg = np.stack([_values(g, k, tf) for k in names], 1)
    rng = np.random.default_rng(seed)
    res = _cv_accuracy(xr, xg, rng, folds, seed, threads)
    ia, ib = _halves(nr, rng)
    fl = _cv_accuracy(xr[ia], xr[ib], rng, folds, seed, threads)
    return {**res, "floor": fl["accuracy"], "floor_se": fl["se"], "floor_n": fl["n"],
            "floor_p_value": fl["p_value"], "names": list(names), "folds": folds, "seed": int(seed)}


def _images(x, arg: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise GalgenInputError(f"{arg}: not an array of images ({exc})") from None
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise GalgenInputError(f"{arg}: expected square images (N, S, S), got shape {a.shape}")
    if len(a) == 0:
        raise GalgenInputError(f"{arg}: no images")
    if not np.isfinite(a).all():
        raise GalgenInputError(f"{arg}: images contain NaN or infinite pixels")
    return a


def _border_noise(images, width: int = 4) -> np.ndarray:
    """Per-image sky-noise sigma from the median absolute deviation of the stamp border.

    ``1.4826 * MAD`` of the pixels within ``width`` pixels of the edge, robust to a
    galaxy's light reaching the border.
    """
    a = np.asarray(images, dtype=np.float64)
    s = a.shape[-1]
    w = max(1, min(width, s // 4))
    edge = np.ones(a.shape[-2:], bool)
    edge[w:s - w, w:s - w] = False
    b = a[:, edge]
    med = np.median(b, axis=1, keepdims=True)
    return 1.4826 * np.median(np.abs(b - med), axis=1)


def _noise_for(noise, images: np.ndarray, arg: str) -> np.ndarray:
    n = len(images)
    if noise is None:
        sig = _border_noise(images)
    else:
        sig = np.asarray(noise, dtype=np.float64)
        if sig.ndim == 0:
            sig = np.full(n, float(sig))
        if sig.shape != (n,):
            raise GalgenInputError(f"noise: for {arg}, expected a scalar or {n} per-image values, "
                                   f"got shape {sig.shape}")
    if not np.isfinite(sig).all() or (sig < 0).any():
        raise GalgenInputError(f"noise: non-finite or negative noise sigma for {arg}")
    # a noiseless stamp (sigma 0) would blow up asinh; floor at a tiny fraction of its peak
    peak = np.abs(images).reshape(n, -1).max(1)
    return np.maximum(sig, 1e-6 * np.maximum(peak, 1e-30))


class _SmallCNN(torch.nn.Module):
    """Three 3x3 convolutions (8, 16, 32 channels), ReLU, max-pooling, global mean and max pool, linear."""

    def __init__(self):
        super().__init__()
        c = (8, 16, 32)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, c[0], 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c[0], c[1], 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c[1], c[2], 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(2 * c[2], 1)

    def forward(self, x):
        h = self.features(x[:, None])
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))[:, 0]


def c2st_images(real, gen, *, seed: int = 0, epochs: int = 8, noise=None, device="cpu", size: int = 32,
                batch_size: int = 64, lr: float = 3e-3, threads: int | None = 1) -> dict:
    """Classifier two-sample test on observed stamps with a small CNN.

    A CNN of 5,953 parameters (three 3x3 convolutions of 8, 16 and 32 channels with
    ReLU and 2x2 max-pooling, global mean and max pooling, a linear layer) learns to tell
    real from generated **observed** stamps. Each stamp is shown as ``asinh(x / noise)``,
    linear within the noise and logarithmic in the bright core, and average-pooled by an
    integer factor to at most ``size`` pixels on a side (64 -> 32 by default) to keep it
    fast. The classes are balanced (the larger set randomly subsampled), split 70/30 per
    class; the network is trained with Adam and binary cross-entropy for ``epochs`` epochs
    on the 70% (with random flips and 90-degree rotations, the symmetries of a galaxy
    population), and its accuracy on the held-out 30% is returned: 0.5 within ``se``
    when the two sets are indistinguishable to it.

    Randomness (split, initial weights, batches, augmentation) comes from ``seed``; the
    global torch random state is left untouched (:func:`torch.random.fork_rng`). On CPU,
    2 x 2000 stamps of 64 x 64 take about 10 s with the defaults (one thread, 8 epochs).

    Parameters
    ----------
    real, gen : array_like
        ``(N, S, S)`` observed stamps (numpy arrays or tensors), same ``S``.
    seed : int, optional
    epochs : int, optional
        Passes over the training set (8).
    noise : float or tuple, optional
        Sky-noise sigma dividing the images before ``asinh``: a scalar for both sets, or
        a pair ``(noise_real, noise_gen)`` of scalars or per-image arrays. By default each
        image's own ``1.4826 * MAD`` of its 4-pixel border.
    device : str or torch.device, optional
    size : int, optional
        Largest side fed to the CNN (32); larger stamps are average-pooled by
        ``ceil(S / size)`` (the trailing rows and columns that do not fill a block are
        dropped).
    batch_size : int, optional
    lr : float, optional
        Adam learning rate.
    threads : int or None, optional
        CPU threads torch uses during the call (restored afterwards); ``None`` keeps the
        current setting. One thread (the default) is as fast as several for so small a
        network, and many times faster when the cores are shared with other work
        (OpenMP threads then wait on each other).

    Returns
    -------
    dict
        ``accuracy`` on the held-out 30%, ``se`` (binomial standard error
        ``sqrt(0.25 / n_test)`` under the null), ``n_test``, ``p_value`` (one-sided
        binomial, against 0.5), ``n_train``, ``train_accuracy`` (last epoch), ``input_size``,
        ``epochs``, ``seconds``.

    Raises
    ------
    galgen.errors.GalgenInputError
        For stacks that are not ``(N, S, S)``, of different ``S``, with non-finite pixels,
        too few images, or a ``noise`` of the wrong shape.
    """
    t0 = time.perf_counter()
    xr, xg = _images(real, "real"), _images(gen, "gen")
    if xr.shape[1:] != xg.shape[1:]:
        raise GalgenInputError(f"gen: stamps of {xg.shape[1:]} pixels, real has {xr.shape[1:]}")
    if isinstance(noise, (tuple, list)) and len(noise) == 2:
        nr_, ng_ = noise
    elif noise is None or np.ndim(noise) == 0:
        nr_, ng_ = noise, noise
    else:
        raise GalgenInputError("noise: expected None, a scalar, or a pair (noise_real, noise_gen)")
    epochs = int(epochs)
    if epochs < 1:
        raise GalgenInputError(f"epochs: {epochs}, at least 1 needed")
    sr, sg = _noise_for(nr_, xr, "real"), _noise_for(ng_, xg, "gen")
    m = min(len(xr), len(xg))
    n_train = int(round(0.7 * m))
    if n_train < 1 or m - n_train < 1:
        raise GalgenInputError(f"real, gen: {m} images per class, too few for a 70/30 split")
    rng = np.random.default_rng(seed)
    ir = rng.permutation(len(xr))[:m]
    ig = rng.permutation(len(xg))[:m]
    s = xr.shape[1]
    f = max(1, math.ceil(s / int(size)))

    def prep(x, sig):
        t = torch.asinh(torch.from_numpy(x) / torch.from_numpy(sig.astype(np.float32))[:, None, None])
        if f > 1:
            t = torch.nn.functional.avg_pool2d(t[:, None], f)[:, 0]
        return t

    x = torch.cat([prep(xr[ir], sr[ir]), prep(xg[ig], sg[ig])]).to(device)
    y = torch.cat([torch.zeros(m), torch.ones(m)]).to(device)
    train = np.concatenate([np.arange(n_train), m + np.arange(n_train)])
    test = np.concatenate([np.arange(n_train, m), m + np.arange(n_train, m)])
    # one global scale so the network sees inputs of order unity
    scale = x[torch.from_numpy(train).to(device)].std().clamp_min(1e-6)
    x = x / scale
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        correct, correct_train = _train_and_test(x, y, train, test, seed=seed, epochs=epochs, lr=lr,
                                                 batch_size=batch_size, devices=devices)
    finally:
        torch.set_num_threads(old_threads)
    res = _binomial_result(correct, len(test))
    return {"accuracy": res["accuracy"], "se": res["se"], "n_test": res["n"], "p_value": res["p_value"],
            "n_train": int(len(train)), "train_accuracy": correct_train / len(train),
            "input_size": int(s // f), "epochs": epochs, "seconds": time.perf_counter() - t0}


def _train_and_test(x, y, train, test, *, seed, epochs, lr, batch_size, devices) -> tuple[int, int]:
    """Train a :class:`_SmallCNN` on ``x[train]``; correct predictions on ``x[test]`` and in the last epoch."""
    device = x.device
    train_t = torch.from_numpy(train).to(device)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        net = _SmallCNN().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen_t = torch.Generator().manual_seed(seed)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        net.train()
        correct_train = 0
        for _ in range(epochs):
            order = train_t[torch.randperm(len(train_t), generator=gen_t).to(device)]
            correct_train = 0
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                xb, yb = x[idx], y[idx]
                k = int(torch.randint(4, (1,), generator=gen_t))
                xb = torch.rot90(xb, k, (1, 2))
                if bool(torch.randint(2, (1,), generator=gen_t)):
                    xb = torch.flip(xb, (2,))
                logit = net(xb.contiguous())
                loss = loss_fn(logit, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                correct_train += int(((logit > 0).float() == yb).sum())
        net.eval()
        with torch.no_grad():
            test_t = torch.from_numpy(test).to(device)
            correct = sum(int(((net(x[test_t[i:i + 512]]) > 0).float() == y[test_t[i:i + 512]]).sum())
                          for i in range(0, len(test_t), 512))
    return correct, correct_train


# ---------------------------------------------------------------------------------------------
# comparison in bins of flux or size
# ---------------------------------------------------------------------------------------------

def _summary(v: np.ndarray) -> tuple:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None, None, None, 0
    p16, med, p84 = np.percentile(v, [16, 50, 84])
    return float(med), float(p16), float(p84), int(len(v))


def binned_comparison(real: dict, gen: dict, *, by: str, names=None, bins=4) -> dict:
    """Medians, spreads and KS distances of each statistic in bins of one statistic.

    Galaxies are binned by ``by`` (``"flux"`` for brightness: quantile bins of flux are
    magnitude bins; ``"r50"`` or ``"sigma"`` for size) with edges at quantiles of the
    **real** set, so each bin holds about the same number of real galaxies; generated
    galaxies fall in the same bins (the outer bins are open-ended, so generated galaxies
    beyond the range of the real ones count in the first or last bin). Galaxies whose
    ``by`` is NaN are left out. In each bin, each statistic's median and 16-84% range in
    both sets, their counts and the two-sample KS statistic with its p-value are given:
    a bin where the generator goes wrong stands out with a small p-value.

    Parameters
    ----------
    real, gen : dict of array_like
        Per-galaxy statistics, as for :func:`compare_statistics`.
    by : str
        Statistic to bin by (in both sets).
    names : list of str, optional
        Statistics compared (default: every numeric statistic but ``by``).
    bins : int or array_like, optional
        Number of equal-count bins of the real set (4), or increasing bin edges in the
        units of ``by`` (values outside them are left out).

    Returns
    -------
    dict
        ``by``, ``edges`` (list of ``len(bins) + 1`` floats; with quantile bins the outer
        two are the real set's minimum and maximum), ``n_real``, ``n_gen`` (per bin
        lists), ``frac_real``, ``frac_gen`` (fractions of each set in each bin), and
        ``bins``: a list with, per bin, ``{"lo", "hi", "n_real", "n_gen", "statistics":
        {name: {"median_real", "p16_real", "p84_real", "n_real", "median_gen",
        "p16_gen", "p84_gen", "n_gen", "ks", "ks_pvalue"}}}``; ``None`` where a bin has
        no finite value.

    Raises
    ------
    galgen.errors.GalgenInputError
        For bad sets, an unknown ``by`` or name, or bad ``bins``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> real = {"flux": rng.lognormal(5, 1, 1000), "e": rng.uniform(0, 0.6, 1000)}
    >>> res = binned_comparison(real, real, by="flux", bins=2)
    >>> res["n_real"], [b["statistics"]["e"]["ks"] for b in res["bins"]]
    ([500, 500], [0.0, 0.0])
    """
    r, nr = _check_stats(real, "real")
    g, ng = _check_stats(gen, "gen")
    if not isinstance(by, str):
        raise GalgenInputError(f"by: expected a statistic name, got {by!r}")
    for arg, d in (("real", r), ("gen", g)):
        if by not in d or not _numeric(d[by]):
            raise GalgenInputError(f"by: '{by}' is not a numeric statistic of {arg} (it has {sorted(d)})")
    names = _resolve_names(r, g, names, exclude=(by,))
    br = np.asarray(r[by], dtype=np.float64)
    bg = np.asarray(g[by], dtype=np.float64)
    fr = br[np.isfinite(br)]
    if len(fr) == 0:
        raise GalgenInputError(f"real: no finite values of '{by}' to bin by")
    if np.ndim(bins) == 0:
        nb = int(bins)
        if nb < 1:
            raise GalgenInputError(f"bins: {bins}, at least 1 needed")
        edges = np.quantile(fr, np.linspace(0, 1, nb + 1))
        open_ends = True
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 2 or not np.all(np.diff(edges) > 0) or not np.isfinite(edges).all():
            raise GalgenInputError("bins: expected an int or at least 2 finite increasing edges")
        nb = len(edges) - 1
        open_ends = False

    def assign(v):
        i = np.searchsorted(edges, v, side="right") - 1
        i = np.where(v == edges[-1], nb - 1, i)  # the last edge belongs to the last bin
        if open_ends:
            i = np.clip(i, 0, nb - 1)
        return np.where(np.isfinite(v) & (i >= 0) & (i < nb), i, -1)

    ir, ig = assign(br), assign(bg)
    out_bins = []
    for j in range(nb):
        sr, sg = ir == j, ig == j
        st = {}
        for k in names:
            vr = np.asarray(r[k], dtype=np.float64)[sr]
            vg = np.asarray(g[k], dtype=np.float64)[sg]
            mr, lr, hr, cr = _summary(vr)
            mg, lg, hg, cg = _summary(vg)
            if cr and cg:
                kt = _st.ks_2samp(vr[np.isfinite(vr)], vg[np.isfinite(vg)])
                ks, p = _float(kt.statistic), _float(kt.pvalue)
            else:
                ks = p = None
            st[k] = {"median_real": mr, "p16_real": lr, "p84_real": hr, "n_real": cr,
                     "median_gen": mg, "p16_gen": lg, "p84_gen": hg, "n_gen": cg, "ks": ks, "ks_pvalue": p}
        out_bins.append({"lo": float(edges[j]), "hi": float(edges[j + 1]), "n_real": int(sr.sum()),
                         "n_gen": int(sg.sum()), "statistics": st})
    n_r = [b["n_real"] for b in out_bins]
    n_g = [b["n_gen"] for b in out_bins]
    return {"by": by, "edges": [float(e) for e in edges], "n_real": n_r, "n_gen": n_g,
            "frac_real": [c / nr for c in n_r], "frac_gen": [c / ng for c in n_g],
            "names": list(names), "bins": out_bins}
