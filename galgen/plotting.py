"""Figures: grids of cutouts. matplotlib is imported lazily with the Agg backend."""

from __future__ import annotations

import numpy as np

from .data.atomic import atomic_output
from .data.cutouts import CutoutFile

__all__ = ["asinh_stretch", "cutout_grid", "training_curves"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def training_curves(run_dir, out, *, keys=None):
    """Save a PNG of a training run's logged metrics against the step.

    Parameters
    ----------
    run_dir : str or os.PathLike
        Run directory with ``train_log.csv`` (and ``val_log.csv``).
    out : str or os.PathLike
        PNG file (written atomically).
    keys : sequence of str, optional
        Metrics to plot, one panel each; default: ``loss`` plus ``elbo`` and ``kl`` (VAE)
        or ``wasserstein`` and ``gradient_penalty`` (WGAN-GP), when logged.

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    import csv
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)

    def read(name):
        path = run_dir / name
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    train, val = read("train_log.csv"), read("val_log.csv")
    if not train:
        from .errors import GalgenInputError

        raise GalgenInputError(f"{run_dir}: no train_log.csv (not a training run directory)")
    present = set(train[0]) | {k for r in train for k, v in r.items() if v}
    keys = list(keys or [k for k in ("loss", "elbo", "kl", "wasserstein", "gradient_penalty") if k in present])
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
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out)
