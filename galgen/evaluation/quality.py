"""Quality of trained models on held-out cutouts (``galgen evaluate``).

Two questions, answered with the physics of the data:

1. **Reconstruction** (AE, VAE): does the model explain each held-out galaxy down to the
   noise? The reduced chi-square of the reconstruction, observed through the galaxy's own
   PSF and compared with its own variance, is about 1 when it does. The same figure for
   the simulator's noiseless truth is printed beside it: it is the floor no model can
   beat.
2. **Generation** (VAE with its flow prior, VAE with N(0, I), WGAN-GP): do new galaxies
   look like real ones? Generated intrinsic galaxies are observed through the PSFs and
   noise of held-out galaxies (the same ones for every model), then flux, HSM size and
   ellipticity are measured on the noise-free observed images of both, and their
   distributions compared (medians, and the Kolmogorov-Smirnov distance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.atomic import atomic_output
from ..data.cutouts import CutoutFile
from ..data.loading import ObservationLoader
from ..errors import GalgenInputError
from ..models.base import amortised_guess, good_pixels, sample_latents
from ..runtime import generator, resolve_device, resolve_model

__all__ = ["reconstruction_chi2", "generated_observations", "morphology_statistics", "evaluate_models"]


def _holdout(data, n, device, conditions=()) -> ObservationLoader:
    with CutoutFile(data) as f:
        m = min(n, len(f)) if n else len(f)
    return ObservationLoader(data, np.arange(m), conditions, in_memory=True, device=device)


@torch.no_grad()
def _reconstruction_scores(model, loader: ObservationLoader, batch_size: int) -> np.ndarray | None:
    """Reduced chi-square of ``decode(encode(x))`` per galaxy; None for a model without an encoder."""
    out = []
    for batch in loader.iter_batches(batch_size):
        guess = amortised_guess(model, batch.observed, batch.cond)
        if guess is None:
            return None
        model_img = batch.observation.noiseless(model.decode(guess, batch.cond).float())
        chi2 = batch.observation.noise.chi2(batch.observed, model_img)
        out.append((chi2 / good_pixels(batch.observed, batch.observation)).float().cpu())
    return torch.cat(out).numpy()


def reconstruction_chi2(model, data, *, n: int | None = None, batch_size: int = 256, device="cpu") -> dict:
    """Per-galaxy reduced chi-square of a model's reconstructions of held-out cutouts.

    The reconstruction is ``decode(encode(x))`` (the encoder's guess, a VAE's posterior
    mean) observed through the galaxy's own PSF and compared with its own variance.

    Parameters
    ----------
    model : galgen.models.LatentModel
        A model whose ``encode`` gives a guess (an auto-encoder, a VAE).
    data : str or os.PathLike
        Cutout file (the first ``n`` galaxies are used).
    n : int, optional
        Number of galaxies (all by default).
    batch_size : int, optional
    device : str or torch.device, optional

    Returns
    -------
    dict
        ``chi2_pixel`` (per-galaxy array), ``median``, ``p16``, ``p84``,
        ``fraction_in_0.95_1.15``, and ``truth_median`` (the same figure for the
        simulator's noiseless images, when the file has them).
    """
    loader = _holdout(data, n, device, model.conditions)
    chi2 = _reconstruction_scores(model, loader, batch_size)
    if chi2 is None:
        raise GalgenInputError(f"model: a {type(model).__name__} has no encoder to reconstruct observations")
    return {"chi2_pixel": chi2, **_reconstruction_summary(chi2, loader)}


def _reconstruction_summary(chi2: np.ndarray, loader: ObservationLoader) -> dict:
    """Median, 16-84% range and the fraction near 1 of reduced chi-squares, with the noiseless truth's median."""
    res = {"n": int(len(chi2)), "median": float(np.median(chi2)),
           "p16": float(np.percentile(chi2, 16)), "p84": float(np.percentile(chi2, 84)),
           "fraction_in_0.95_1.15": float(np.mean((chi2 >= 0.95) & (chi2 <= 1.15)))}
    with CutoutFile(loader.path) as f:
        if "noiseless" in f.keys:
            r = loader.rows(torch.arange(len(chi2)))
            obs, var = r["observed"].double().cpu().numpy(), r["variance"].double().cpu().numpy()
            good = ~r["mask"].cpu().numpy()
            model_img = f.read("noiseless", slice(0, len(chi2))).astype(np.float64)
            truth = np.where(good, (obs - model_img) ** 2 / var, 0).sum((1, 2)) / good.sum((1, 2)).clip(1)
            res["truth_median"] = float(np.median(truth))
    return res


def generated_observations(model, data, *, n: int, seed: int = 0, batch_size: int = 256, device="cpu") -> dict:
    """Draw ``n`` galaxies and observe them through the PSFs and noise of held-out galaxies.

    Galaxy ``i`` gets the PSF of held-out galaxy ``i`` and CCD noise with the survey's
    sky level, gain and read noise (from the file's catalog), so every model is seen
    exactly as the real galaxies were.

    Parameters
    ----------
    model : galgen.models.LatentModel
        Latent codes are drawn from ``model.prior(cond)`` and decoded (choose a VAE's
        prior with ``model.with_prior(name)``).
    data : str or os.PathLike
        Held-out cutout file (PSFs, catalog with ``sky_level``, ``gain``, ``read_noise``).
    n : int
        Number of galaxies.
    seed : int, optional
    batch_size : int, optional
    device : str or torch.device, optional

    Returns
    -------
    dict of numpy.ndarray
        ``intrinsic``, ``noiseless``, ``observed``.
    """
    from ..physics import CCDNoise, Observation

    loader = _holdout(data, n, device, model.conditions)
    loader.check_grid(model.config.get("stamp", loader.stamp_size),
                      model.config.get("oversampling", loader.oversampling))
    with CutoutFile(data) as f:
        cat = f.catalog[:len(loader)]
    for col in ("sky_level", "gain", "read_noise"):
        if col not in cat.colnames:
            raise GalgenInputError(f"{data}: catalog needs '{col}' to observe generated galaxies like real ones")
    noise = CCDNoise(float(cat["sky_level"][0]), float(cat["gain"][0]), float(cat["read_noise"][0]))
    gen = generator(device, seed)
    out = {"intrinsic": [], "noiseless": [], "observed": []}
    for batch in loader.iter_batches(batch_size):
        o = batch.observation
        obs = Observation(o.psf, pixel_scale=o.pixel_scale, oversampling=o.oversampling, stamp=o.stamp, noise=noise)
        with torch.no_grad():
            z = sample_latents(model.prior(batch.cond), len(batch), generator=gen)
            intr = model.decode(z, batch.cond).float()
        noiseless, observed = obs.observe(intr, generator=gen)
        for key, v in (("intrinsic", intr), ("noiseless", noiseless), ("observed", observed)):
            out[key].append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def morphology_statistics(images, pixel_scale: float) -> dict:
    """Flux, HSM size and ellipticity of a stack of (noise-free) images.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, S, S)``.
    pixel_scale : float
        Arcsec per pixel.

    Returns
    -------
    dict of numpy.ndarray
        ``flux`` (sum, ADU), ``sigma`` (arcsec), ``e1``, ``e2``, ``e`` (modulus), ``ok``.
    """
    from .morphology import hsm_moments

    mom = hsm_moments(images, pixel_scale)
    return {"flux": images.sum((1, 2)), "sigma": mom["sigma"], "e1": mom["e1"], "e2": mom["e2"],
            "e": np.hypot(mom["e1"], mom["e2"]), "ok": mom["ok"]}


def _compare(real: dict, gen: dict) -> dict:
    from scipy.stats import ks_2samp

    out = {"hsm_ok_fraction": float(np.mean(gen["ok"]))}
    for q in ("flux", "sigma", "e1", "e2", "e"):
        a, b = real[q][np.isfinite(real[q])], gen[q][np.isfinite(gen[q])]
        if len(a) > 1 and len(b) > 1:
            out[q] = {"median": float(np.median(b)), "real_median": float(np.median(a)),
                      "ks": float(ks_2samp(a, b).statistic)}
    return out


def _grid(panels: dict, variance, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import asinh_stretch

    names = list(panels)
    n = min(len(v) for v in panels.values())
    fig, axes = plt.subplots(len(names), n, figsize=(1.5 * n, 1.6 * len(names) + 0.3), squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(asinh_stretch(panels[name][c], float(np.sqrt(np.median(variance[c])))), cmap="gray",
                      origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("observed through the same PSFs and noise (asinh stretch)", fontsize=9)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _histograms(stats: dict, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs = [("flux", "log10 flux (ADU)", lambda x: np.log10(np.clip(x, 1e-3, None))),
          ("sigma", "HSM size sigma (arcsec)", lambda x: x), ("e1", "e1", lambda x: x), ("e2", "e2", lambda x: x)]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (q, label, f) in zip(axes, qs):
        vals = {k: f(v[q][np.isfinite(v[q])]) for k, v in stats.items()}
        allv = np.concatenate(list(vals.values()))
        lo, hi = np.percentile(allv, [0.5, 99.5]) if len(allv) else (0, 1)
        bins = np.linspace(lo, hi, 40)
        for k, v in vals.items():
            ax.hist(v, bins=bins, histtype="step", density=True, label=k, lw=1.8 if k == "real" else 1.2)
        ax.set_xlabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def evaluate_models(models, data, out, *, n: int = 5000, n_grid: int = 8, seed: int = 0, batch_size: int = 256,
                    device="cpu") -> dict:
    """Reconstruction and generation quality of models on a held-out cutout file.

    Parameters
    ----------
    models : sequence
        Models, run directories, checkpoint files or pretrained names (see
        :func:`galgen.sample.resolve_model`).
    data : str or os.PathLike
        Held-out cutout file (simulated: with ``noiseless`` images).
    out : str or os.PathLike
        Directory for ``quality.json``, ``samples.png``, ``histograms.png`` and, for
        models loaded from a run directory, ``training_<name>.png`` (logged metrics).
    n : int, optional
        Galaxies evaluated.
    n_grid : int, optional
        Galaxies per row of the image grid.
    seed : int, optional
    batch_size : int, optional
    device : str or torch.device, optional

    Returns
    -------
    dict
        ``reconstruction`` (per reconstructing model: median chi2/pixel, ...),
        ``generation`` (per generator: medians and KS distances of flux, size,
        ellipticity against the real galaxies), ``n``, ``data``.
    """
    device = resolve_device(device)
    out = Path(out)
    with CutoutFile(data) as f:
        n = min(n, len(f))
        scale = f.pixel_scale
        real_noiseless = f.read("noiseless" if "noiseless" in f.keys else "observed", slice(0, n))
        real_observed = f.read("observed", slice(0, n_grid))
        variance = f.read("variance", slice(0, n_grid))
    report = {"data": str(data), "n": n, "reconstruction": {}, "generation": {}}
    stats = {"real": morphology_statistics(real_noiseless.astype(np.float64), scale)}
    panels = {"real": real_observed}
    for i, spec in enumerate(models):
        model = resolve_model(spec, device)
        name = spec if isinstance(spec, str) and not Path(str(spec)).exists() else f"{model.kind}-{i}"
        run_dir = Path(model.checkpoint_path or "").parent
        if (run_dir / "train_log.csv").exists():
            from ..plotting import training_curves

            out.mkdir(parents=True, exist_ok=True)
            training_curves(run_dir, out / f"training_{name}.png")
        held_out = _holdout(data, n, device, model.conditions)
        rec = _reconstruction_scores(model, held_out, batch_size)
        if rec is not None:  # models with an encoder (AE, VAE) reconstruct observations
            report["reconstruction"][name] = _reconstruction_summary(rec, held_out)
        variants = [(f" ({label})", model.with_prior(choice)) for choice, label in model.prior_choices.items()]
        for suffix, variant in variants or [("", model)]:
            label = name + suffix
            g = generated_observations(variant, data, n=n, seed=seed, batch_size=batch_size, device=device)
            st = morphology_statistics(g["noiseless"].astype(np.float64), scale)
            stats[label] = st
            report["generation"][label] = _compare(stats["real"], st)
            panels[label] = g["observed"][:n_grid]
    out.mkdir(parents=True, exist_ok=True)
    _grid(panels, variance, out / "samples.png")
    _histograms(stats, out / "histograms.png")
    with atomic_output(out / "quality.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report
