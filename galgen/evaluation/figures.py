"""Figures of the model-quality report (``galgen evaluate``): every model beside the real galaxies.

Each function takes the measured statistics (dicts of per-galaxy arrays, one per set, the
real galaxies under the key ``"real"``) and writes one PNG atomically; matplotlib is
imported lazily with the Agg backend.
"""

from __future__ import annotations

import numpy as np

from ..plotting import asinh_stretch, pyplot, save_figure

__all__ = ["sample_grid", "statistic_histograms", "statistic_planes", "power_spectra", "reconstruction_grid"]

_LABELS = {"flux": "log10 flux (ADU)", "sigma": "log10 HSM sigma (arcsec)", "r50": "log10 r50 (arcsec)",
           "e1": "e1", "e2": "e2", "e": "|e|", "concentration": "concentration C", "asymmetry": "asymmetry A",
           "smoothness": "smoothness S", "gini": "Gini", "m20": "M20"}
_LOG = ("flux", "sigma", "r50")


def _values(stats: dict, name: str) -> np.ndarray:
    v = np.asarray(stats[name], dtype=np.float64)
    if name in _LOG:
        v = np.log10(np.where(v > 0, v, np.nan))
    return v[np.isfinite(v)]


def _style(label: str) -> dict:
    return {"color": "k", "lw": 2.0} if label == "real" else {"lw": 1.2}


def sample_grid(panels: dict, noise, out, *, title: str = "observed through the same PSFs and noise"):
    """A grid of observed stamps: one row per set, one column per galaxy.

    Parameters
    ----------
    panels : dict of numpy.ndarray
        Set name -> ``(n, S, S)`` observed stamps (column ``j`` of every row shares the PSF
        and noise of real galaxy ``j``).
    noise : array_like
        ``(n,)`` sky-noise sigma per column (the asinh stretch's linear scale).
    out : str or os.PathLike
        PNG file.
    title : str, optional

    Returns
    -------
    pathlib.Path
    """
    plt = pyplot()
    names = list(panels)
    n = min(len(v) for v in panels.values())
    fig, axes = plt.subplots(len(names), n, figsize=(1.3 * n + 0.8, 1.35 * len(names) + 0.4), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(asinh_stretch(panels[name][c], float(noise[c])), cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"{title} (asinh stretch)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def statistic_histograms(stats: dict, names, out):
    """Histogram overlays of each statistic, real against every model.

    Parameters
    ----------
    stats : dict of dict
        Set name -> statistics (name -> ``(N,)`` values).
    names : sequence of str
        Statistics to draw (fluxes and sizes on a log scale).
    out : str or os.PathLike

    Returns
    -------
    pathlib.Path
    """
    plt = pyplot()
    names = list(names)
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        vals = {k: _values(v, name) for k, v in stats.items() if name in v}
        allv = np.concatenate([v for v in vals.values() if len(v)] or [np.zeros(1)])
        lo, hi = np.percentile(allv, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        for k, v in vals.items():
            ax.hist(v, bins=bins, histtype="step", density=True, label=k, **_style(k))
        ax.set_xlabel(_LABELS.get(name, name), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out)


def statistic_planes(stats: dict, out, *, zero_point: float | None = None):
    """The Gini-M20 plane and the size-magnitude plane, one column per model beside the real galaxies.

    Parameters
    ----------
    stats : dict of dict
        Set name -> statistics with ``gini``, ``m20``, ``flux`` and ``r50``; ``"real"``
        is drawn in grey under every model.
    out : str or os.PathLike
    zero_point : float, optional
        Magnitude zero point (``mag = zero_point - 2.5 log10 flux``); without it the
        abscissa is ``-2.5 log10 flux``.

    Returns
    -------
    pathlib.Path
    """
    plt = pyplot()
    models = [k for k in stats if k != "real"] or ["real"]
    fig, axes = plt.subplots(2, len(models), figsize=(3.2 * len(models), 6.0), squeeze=False)
    zp = 0.0 if zero_point is None else float(zero_point)

    def mag(s):
        f = np.asarray(s["flux"], dtype=np.float64)
        return zp - 2.5 * np.log10(np.where(f > 0, f, np.nan))

    real = stats["real"]
    for c, name in enumerate(models):
        s = stats[name]
        ax = axes[0, c]
        ax.scatter(real["m20"], real["gini"], s=2, c="0.6", alpha=0.4, label="real", rasterized=True)
        if name != "real":
            ax.scatter(s["m20"], s["gini"], s=2, alpha=0.4, label=name, rasterized=True)
        ax.set_xlim(0, -3.2)
        ax.set_ylim(0.3, 0.8)
        ax.set_xlabel("M20", fontsize=8)
        ax.set_ylabel("Gini", fontsize=8)
        ax.set_title(name, fontsize=8)
        ax = axes[1, c]
        ax.scatter(mag(real), real["r50"], s=2, c="0.6", alpha=0.4, rasterized=True)
        if name != "real":
            ax.scatter(mag(s), s["r50"], s=2, alpha=0.4, rasterized=True)
        ax.set_yscale("log")
        ax.set_xlabel("magnitude" if zero_point is not None else "-2.5 log10 flux", fontsize=8)
        ax.set_ylabel("r50 (arcsec)", fontsize=8)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save_figure(fig, out)


def power_spectra(k, spectra: dict, out):
    """Median azimuthally averaged power spectra of every set, and their ratio to the real one.

    Parameters
    ----------
    k : numpy.ndarray
        ``(n_bins,)`` spatial frequencies (cycles/arcsec).
    spectra : dict of numpy.ndarray
        Set name -> ``(N, n_bins)`` flux-normalised spectra.
    out : str or os.PathLike

    Returns
    -------
    pathlib.Path
    """
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.3))
    med = {name: np.nanmedian(p, 0) for name, p in spectra.items()}
    for name, m in med.items():
        a.loglog(k, m, label=name, **_style(name))
        if name != "real" and "real" in med:
            b.semilogx(k, m / med["real"], label=name)
    b.axhline(1, color="k", lw=1)
    a.set_xlabel("k (cycles/arcsec)")
    a.set_ylabel("median P(k) / flux^2")
    b.set_xlabel("k (cycles/arcsec)")
    b.set_ylabel("model / real")
    a.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out)


def reconstruction_grid(observed, reconstructed, normalized_residual, noise, out, *, title: str = ""):
    """Observed stamps, their reconstructions and the normalised residuals, one column per galaxy.

    Parameters
    ----------
    observed, reconstructed, normalized_residual : numpy.ndarray
        ``(n, S, S)``.
    noise : array_like
        ``(n,)`` sky-noise sigma (asinh stretch).
    out : str or os.PathLike
    title : str, optional

    Returns
    -------
    pathlib.Path
    """
    plt = pyplot()
    n = len(observed)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 0.8, 4.5), squeeze=False)
    for c in range(n):
        for r, img in enumerate((observed[c], reconstructed[c])):
            axes[r, c].imshow(asinh_stretch(img, float(noise[c])), cmap="gray", origin="lower")
        axes[2, c].imshow(normalized_residual[c], cmap="RdBu_r", vmin=-4, vmax=4, origin="lower")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, label in enumerate(("observed", "reconstruction", "residual / sigma")):
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)
