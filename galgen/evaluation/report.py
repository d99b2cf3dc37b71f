"""Summaries of cutout files: counts, noise check, sizes, as a dict and as text."""

from __future__ import annotations

import numpy as np

from ..data.cutouts import CutoutFile

__all__ = ["summarize_cutouts", "format_summary"]


def summarize_cutouts(path, max_galaxies: int = 2000) -> dict:
    """Measure a cutout file: what it holds and whether its noise and sizes are sane.

    Parameters
    ----------
    path : str or os.PathLike
        A galgen cutout file.
    max_galaxies : int, optional
        Measure at most this many galaxies (the first ones).

    Returns
    -------
    dict
        ``n_galaxies``, ``survey``, ``pixel_scale``, ``stamp_size``, ``oversampling``,
        ``datasets``; ``snr_median`` (sqrt of sum(observed^2/variance) - npix, a rough
        S/N); with noiseless images also ``chi2_per_pixel`` (mean of
        (observed - noiseless)^2 / variance over unmasked pixels; ~1 when the stored
        variance is right); with intrinsic images and ``hlr`` and ``bt`` catalog
        columns, for disk-dominated galaxies (B/T < 0.15, where the adaptive-moment
        size is a fixed multiple of the half-light radius, ~0.72 for an exponential):
        ``hsm_disk_sigma_over_hlr`` (median) and the Spearman correlation
        ``hsm_disk_spearman``.
    """
    from scipy.stats import spearmanr

    from .morphology import hsm_moments

    with CutoutFile(path) as f:
        a = f.attrs
        m = min(len(f), max_galaxies)
        sl = slice(0, m)
        obs = f.read("observed", sl).astype(np.float64)
        var = f.read("variance", sl).astype(np.float64)
        good = f.read("mask", sl) == 0
        summary = {
            "path": str(f.path), "n_galaxies": len(f), "survey": a["survey"],
            "pixel_scale": a["pixel_scale"], "stamp_size": a["stamp_size"],
            "oversampling": a["oversampling"], "datasets": f.keys, "source": a["source"],
            "n_measured": m,
        }
        with np.errstate(divide="ignore", invalid="ignore"):
            snr2 = np.where(good, obs**2 / var, 0).sum((1, 2)) - good.sum((1, 2))
        summary["snr_median"] = float(np.median(np.sqrt(np.clip(snr2, 0, None))))
        if "noiseless" in f.keys:
            model = f.read("noiseless", sl).astype(np.float64)
            chi2 = np.where(good, (obs - model) ** 2 / var, 0).sum() / good.sum()
            summary["chi2_per_pixel"] = float(chi2)
        cat = f.catalog[:m]
        if "intrinsic" in f.keys and {"hlr", "bt"} <= set(cat.colnames):
            disk = np.flatnonzero(np.asarray(cat["bt"]) < 0.15)
            if len(disk) > 2:
                scale = a["pixel_scale"] / a["oversampling"]
                mom = hsm_moments(f.read("intrinsic", disk), scale)
                ok = mom["ok"]
                hlr = np.asarray(cat["hlr"], float)[disk]
                summary["hsm_disk_ok_fraction"] = float(ok.mean())
                if ok.sum() > 2:
                    summary["hsm_disk_sigma_over_hlr"] = float(np.median(mom["sigma"][ok] / hlr[ok]))
                    summary["hsm_disk_spearman"] = float(spearmanr(mom["sigma"][ok], hlr[ok]).statistic)
    return summary


def format_summary(summary: dict) -> str:
    """Format a summary of :func:`summarize_cutouts` as aligned text lines.

    Parameters
    ----------
    summary : dict

    Returns
    -------
    str
    """
    width = max(len(k) for k in summary)
    lines = []
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines) + "\n"
