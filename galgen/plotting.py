"""Figures: grids of cutouts. matplotlib is imported lazily with the Agg backend."""

from __future__ import annotations

import numpy as np

from .data.atomic import atomic_output
from .data.cutouts import CutoutFile

__all__ = ["pyplot", "save_figure", "asinh_stretch", "cutout_grid", "training_curves", "fit_panel", "corner_plot",
           "fit_corner"]


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported lazily).

    Returns
    -------
    module
        ``matplotlib.pyplot``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out):
    """Write a figure as PNG atomically (110 dpi) and close it.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    out : str or os.PathLike
        PNG file.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from pathlib import Path

    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    fig.clf()
    pyplot().close(fig)
    return Path(out)


def asinh_stretch(image, noise: float | None = None, q: float = 3.0):
    """Map an image to [0, 1] with an asinh stretch (Lupton et al. 2004).

    Parameters
    ----------
    image : array_like
        Image.
    noise : float, optional
        Noise rms; the linear part of the stretch spans ``q * noise``. Default: 1% of
        the image maximum.
    q : float, optional
        Softening in units of ``noise``.

    Returns
    -------
    numpy.ndarray
        Stretched image in [0, 1].
    """
    image = np.asarray(image, dtype=np.float64)
    top = float(np.nanmax(image)) or 1.0
    soft = q * (noise if noise else 0.01 * abs(top))
    out = np.arcsinh(np.clip(image, 0, None) / soft) / np.arcsinh(abs(top) / soft)
    return np.clip(out, 0.0, 1.0)


_ROW_LABELS = {"observed": "observed", "noiseless": "noiseless", "intrinsic": "intrinsic (PSF-free)",
               "psf": "PSF", "variance": "variance"}


def cutout_grid(path, out, *, n: int = 8, keys=None, title: str | None = None):
    """Save a PNG grid: one column per galaxy, one row per dataset.

    Parameters
    ----------
    path : str or os.PathLike
        Cutout file.
    out : str or os.PathLike
        PNG file to write (atomically).
    n : int, optional
        Number of galaxies (the first ``n``).
    keys : sequence of str, optional
        Rows; default all of observed, noiseless, intrinsic, psf present in the file.
    title : str, optional
        Figure title; default describes the file.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    plt = pyplot()
    with CutoutFile(path) as f:
        keys = [k for k in (keys or ("observed", "noiseless", "intrinsic", "psf")) if k in f.keys]
        n = min(n, len(f))
        data = {k: f.read(k, slice(0, n)) for k in keys}
        var = f.read("variance", slice(0, n))
        cat = f.catalog[:n]
        a = f.attrs
    fig, axes = plt.subplots(len(keys), n, figsize=(1.6 * n, 1.7 * len(keys) + 0.5), squeeze=False)
    for r, k in enumerate(keys):
        for c in range(n):
            ax = axes[r, c]
            sigma = float(np.sqrt(np.median(var[c]))) if k in ("observed", "noiseless") else None
            img = data[k][c]
            ax.imshow(asinh_stretch(img, sigma), origin="lower", cmap="magma", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(_ROW_LABELS.get(k, k), fontsize=8)
            if r == 0 and "mag" in cat.colnames:
                label = f"m={float(cat['mag'][c]):.1f}"
                if "hlr" in cat.colnames:
                    label += f" r={float(cat['hlr'][c]):.1f}\""
                ax.set_title(label, fontsize=7)
    fig.suptitle(title or f"{a['survey']}: {a['pixel_scale']}\"/pix, stamp {a['stamp_size']}, "
                 f"oversampling {a['oversampling']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def training_curves(run_dir, out, *, keys=None):
    """Save a PNG of a training run's logged metrics against the step.

    Parameters
    ----------
    run_dir : str or os.PathLike
        Run directory with ``train_log.csv`` (and ``val_log.csv``).
    out : str or os.PathLike
        PNG file (written atomically).
    keys : sequence of str, optional
        Metrics to plot, one panel each; default: ``loss`` plus ``elbo`` and ``kl`` (VAE),
        ``wasserstein`` and ``gradient_penalty`` (WGAN-GP), ``generator_loss`` (GANs) and
        the validation KS distances ``ks_flux``, ``ks_sigma``, ``ks_e`` (GANs), when logged.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from pathlib import Path

    from .train.logs import TRAIN_LOG, VAL_LOG, read_log

    plt = pyplot()
    run_dir = Path(run_dir)
    train = read_log(run_dir / TRAIN_LOG, missing_ok=True)
    val = read_log(run_dir / VAL_LOG, missing_ok=True)
    if not train:
        from .errors import GalgenInputError

        raise GalgenInputError(f"{run_dir}: no train_log.csv (not a training run directory)")
    present = {k for rows in (train, val) for r in rows for k, v in r.items() if v}
    keys = list(keys or [k for k in ("loss", "elbo", "kl", "wasserstein", "gradient_penalty", "generator_loss",
                                     "ks_flux", "ks_sigma", "ks_e") if k in present])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(int(r["step"]), float(r[k])) for r in train if r.get(k)]
        if pts:
            ax.plot(*zip(*pts), lw=1, label="train")
        vpts = [(int(r["step"]), float(r[k])) for r in val if r.get(k)]
        if vpts:
            ax.plot(*zip(*vpts), "o-", ms=3, label="validation")
        ax.set_xlabel("step")
        ax.set_title(k, fontsize=9)
        if k in ("loss", "kl", "gradient_penalty") and pts and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)


def fit_panel(fit_path, out, *, rows=None, n: int = 6):
    """Save a PNG of fits: observed, MAP model, normalised residual and intrinsic galaxy.

    One column per galaxy, titled with its chi2/dof; a row of posterior predictive
    standard deviations is added where the fit file has samples.

    Parameters
    ----------
    fit_path : str or os.PathLike
        Fit file written by :func:`galgen.inference.fit.fit_file` (its ``data`` attribute
        names the cutout file of the observations, read for the ``observed`` row).
    out : str or os.PathLike
        PNG file (written atomically).
    rows : sequence of int, optional
        Positions in the fit file to show; default the first ``n``.
    n : int, optional

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from pathlib import Path

    from .data.fitfile import FitFile
    from .data.loading import ObservationLoader
    from .errors import GalgenInputError

    plt = pyplot()
    with FitFile(fit_path) as f:
        total = len(f)
        rows = list(range(min(n, total))) if rows is None else [int(r) for r in rows]
        if not rows or min(rows) < 0 or max(rows) >= total:
            raise GalgenInputError(f"rows: must lie in [0, {total}) for {fit_path}, got {rows}")
        keys = ["model", "normalized_residual", "intrinsic"] + (["posterior_std"] if f.has_samples else [])
        panels = {k: f.read(k, rows) for k in keys}
        chi2, dof, index = f.read("chi2", rows), f.read("dof", rows), f.read("index", rows)
        data_path, kind = f.data_path, f.attrs.get("model_kind", "")
    r = ObservationLoader(data_path, index).rows(np.arange(len(index)))
    observed, var = r["observed"].numpy(), r["variance"].numpy()
    panels = {"observed": observed, **panels}
    labels = {"observed": "observed", "model": "MAP model", "normalized_residual": "(data-model)/sigma",
              "intrinsic": "intrinsic (MAP)", "posterior_std": "posterior std"}
    fig, axes = plt.subplots(len(panels), len(rows), figsize=(1.7 * len(rows), 1.75 * len(panels) + 0.4),
                             squeeze=False)
    for r, (key, imgs) in enumerate(panels.items()):
        for c in range(len(rows)):
            ax = axes[r, c]
            if key == "normalized_residual":
                ax.imshow(imgs[c], origin="lower", cmap="RdBu_r", vmin=-4, vmax=4, interpolation="nearest")
            else:
                sigma = float(np.sqrt(np.median(var[c]))) if key in ("observed", "model") else None
                ax.imshow(asinh_stretch(imgs[c], sigma), origin="lower", cmap="magma", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(labels[key], fontsize=8)
            if r == 0:
                ax.set_title(f"#{int(index[c])} chi2/dof={chi2[c] / max(dof[c], 1):.2f}", fontsize=7)
    fig.suptitle(f"{kind} fits of {Path(str(data_path)).name}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def corner_plot(draws, out, *, names=None, truths=None, bins: int = 30, title: str | None = None):
    """Save a corner plot: 1-D histograms on the diagonal, 2-D histograms below it.

    Parameters
    ----------
    draws : array_like
        ``(n_draws, D)`` samples.
    out : str or os.PathLike
        PNG file (written atomically).
    names : sequence of str, optional
        ``D`` axis labels.
    truths : sequence of float, optional
        ``D`` reference values, drawn as lines.
    bins : int, optional
    title : str, optional

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from .errors import GalgenInputError

    x = np.asarray(draws, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise GalgenInputError(f"draws: need an (n_draws >= 2, D) array, got shape {x.shape}")
    d = x.shape[1]
    names = list(names) if names is not None else [f"x{i}" for i in range(d)]
    if len(names) != d or (truths is not None and len(truths) != d):
        raise GalgenInputError(f"names/truths: need {d} entries, one per column of draws")
    if not np.isfinite(x).all():
        raise GalgenInputError("draws: contain NaN or inf")
    plt = pyplot()
    fig, axes = plt.subplots(d, d, figsize=(1.9 * d + 0.5, 1.9 * d + 0.5), squeeze=False)
    lims = [(lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
            for lo, hi in zip(np.percentile(x, 0.5, 0), np.percentile(x, 99.5, 0))]
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.set_visible(False)
                continue
            if i == j:
                ax.hist(x[:, i], bins=bins, range=lims[i], histtype="step", color="k")
                lo, med, hi = np.percentile(x[:, i], [16, 50, 84])
                for v in (lo, med, hi):
                    ax.axvline(v, color="k", ls=":" if v != med else "-", lw=0.8)
                ax.set_yticks([])
                ax.set_title(f"{names[i]} = {med:.3g} +{hi - med:.2g} -{med - lo:.2g}", fontsize=7)
            else:
                ax.hist2d(x[:, j], x[:, i], bins=bins, range=[lims[j], lims[i]], cmap="Greys")
                if truths is not None:
                    ax.axhline(truths[i], color="tab:blue", lw=0.8)
            if truths is not None:
                ax.axvline(truths[j], color="tab:blue", lw=0.8)
            if i == d - 1:
                ax.set_xlabel(names[j], fontsize=8)
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(names[i], fontsize=8)
            elif i != j:
                ax.set_yticklabels([])
            ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)


def fit_corner(fit_path, out, *, row: int = 0, truths=None):
    """Save the corner plot of one galaxy's posterior derived quantities.

    Parameters
    ----------
    fit_path : str or os.PathLike
        Fit file with posterior samples (``galgen fit --samples``).
    out : str or os.PathLike
        PNG file (written atomically).
    row : int, optional
        Position of the galaxy in the fit file.
    truths : sequence of float, optional
        Reference flux, hlr, e1, e2 (e.g. a simulation's truth).

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    from .data.fitfile import FitFile
    from .errors import GalgenInputError

    with FitFile(fit_path) as f:
        if not f.has_samples:
            raise GalgenInputError(f"{fit_path}: no posterior samples (run galgen fit with --samples)")
        if not 0 <= row < len(f):
            raise GalgenInputError(f"row: must lie in [0, {len(f)}) for {fit_path}, got {row}")
        draws = f.read("derived_draws", row)
        names = f.derived_names
        rhat, index = float(f.read("rhat", row).max()), int(f.read("index", row))
    return corner_plot(draws, out, names=names, truths=truths,
                       title=f"galaxy #{index}: {len(draws)} posterior draws, max R-hat {rhat:.2f}")
