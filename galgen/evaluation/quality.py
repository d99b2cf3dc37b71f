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
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.atomic import atomic_output
from ..data.cutouts import CutoutFile
from ..data.loading import ObservationLoader
from ..errors import GalgenInputError
from ..models.base import amortised_guess, good_pixels, sample_latents
from ..runtime import generator, resolve_device, resolve_model
from .statistics import morphology_statistics

log = logging.getLogger("galgen.evaluate")

__all__ = ["reconstruction_chi2", "generated_observations", "survey_noise", "morphology_statistics", "evaluate_models"]


def _holdout(data, n, device, conditions=()) -> ObservationLoader:
    with CutoutFile(data) as f:
        m = min(n, len(f)) if n else len(f)
    return ObservationLoader(data, np.arange(m), conditions, in_memory=True, device=device)


@torch.no_grad()
def _reconstruction_scores(model, loader: ObservationLoader, batch_size: int) -> np.ndarray | None:
    """Reduced chi-square of ``decode(encode(x))`` per galaxy; None for a model without an encoder."""
    out = []
    for batch in loader.iter_batches(batch_size):
        guess = amortised_guess(model, batch.observed, batch.cond, batch.observation)
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


def generated_observations(model, data, *, n: int, seed: int = 0, batch_size: int = 256, device="cpu",
                           latents=None, conditions: str = "data", images=None) -> dict:
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
    latents : tuple of torch.Tensor, optional
        ``(z, log_scale)`` of shapes ``(n, d)`` and ``(n,)``: render these galaxies
        (``decode(z) * exp(log_scale)``, e.g. parametric fits of other real galaxies)
        instead of drawing ``z`` from the prior.
    conditions : {"data", "model"}, optional
        For a conditional model: galaxy ``i`` takes the conditions of held-out galaxy
        ``i`` (``"data"``), or conditions drawn from the training set's that the model
        stores (``"model"``, :meth:`galgen.models.GenerativeModel.draw_conditions`: the
        population as ``galgen sample`` draws it without ``--cond``).
    images : array_like, optional
        ``(n, S * oversampling, S * oversampling)`` intrinsic images to observe instead of
        a model's (e.g. the file's own ``intrinsic``: the held-out galaxies observed anew,
        which separates what the noise model does from what the model does); ``model``
        is then ignored and may be None.

    Returns
    -------
    dict of numpy.ndarray
        ``intrinsic``, ``noiseless``, ``observed`` and ``variance`` (the noise variance
        of each observed pixel, as a cutout file's ``variance``).
    """
    from ..physics import Observation

    loader = _holdout(data, n, device, () if images is not None else model.conditions)
    if images is not None:
        images = torch.as_tensor(np.asarray(images))
        size = loader.stamp_size * loader.oversampling
        if images.ndim != 3 or images.shape[0] < len(loader) or tuple(images.shape[1:]) != (size, size):
            raise GalgenInputError(f"images: expected ({len(loader)}, {size}, {size}) intrinsic images for {data}, "
                                   f"got {tuple(images.shape)}")
    else:
        loader.check_grid(model.config.get("stamp", loader.stamp_size),
                          model.config.get("oversampling", loader.oversampling))
    noise = survey_noise(data)
    if latents is not None and len(latents[0]) < len(loader):
        raise GalgenInputError(f"latents: {len(latents[0])} galaxies for {len(loader)} observations")
    if conditions not in ("data", "model"):
        raise GalgenInputError(f"conditions: 'data' or 'model', got {conditions!r}")
    gen = generator(device, seed)
    out = {"intrinsic": [], "noiseless": [], "observed": [], "variance": []}
    for batch in loader.iter_batches(batch_size):
        o = batch.observation
        obs = Observation(o.psf, pixel_scale=o.pixel_scale, oversampling=o.oversampling, stamp=o.stamp, noise=noise)
        with torch.no_grad():
            if images is not None:
                intr = images[batch.index.cpu()].to(device=device, dtype=torch.float32)
            elif latents is None:
                cond = batch.cond
                if conditions == "model" and model.cond_dim:
                    cond = model.draw_conditions(len(batch), gen)
                intr = model.decode(sample_latents(model.prior(cond), len(batch), generator=gen), cond).float()
            else:
                rows = batch.index.to(latents[0].device)
                z, s = latents[0][rows].to(device), latents[1][rows].to(device)
                intr = model.decode(z, batch.cond).float() * s.exp().float()[:, None, None]
        noiseless, observed = obs.observe(intr, generator=gen)
        for key, v in (("intrinsic", intr), ("noiseless", noiseless), ("observed", observed),
                       ("variance", noise.variance(noiseless))):
            out[key].append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def survey_noise(data):
    """The CCD noise of a cutout file's survey, to observe new galaxies as its galaxies were.

    Parameters
    ----------
    data : str or os.PathLike
        Cutout file whose catalog has ``sky_level``, ``gain`` and ``read_noise`` (those
        of its first row are used: one survey per file).

    Returns
    -------
    galgen.physics.CCDNoise

    Raises
    ------
    galgen.errors.GalgenInputError
        If the catalog lacks one of the columns.
    """
    from ..physics import CCDNoise

    with CutoutFile(data) as f:
        cat = f.catalog[:1]
    for col in ("sky_level", "gain", "read_noise"):
        if col not in cat.colnames:
            raise GalgenInputError(f"{data}: catalog needs '{col}' to observe generated galaxies like real ones")
    return CCDNoise(float(cat["sky_level"][0]), float(cat["gain"][0]), float(cat["read_noise"][0]))


def parametric_fits(kind, data, rows, *, batch_size: int = 64, device="cpu", seed: int = 0):
    """MAP fits of a parametric model to real galaxies: the population a baseline redraws.

    This is the classical alternative to a deep generative model, as GalSim's
    ``COSMOSCatalog(use_real=False)`` draws parametric fits of real galaxies: fit a
    Sersic (or bulge + disk) profile to each galaxy of a real set, then render the fitted
    parameters into new observations.

    Parameters
    ----------
    kind : {"sersic", "bulge-disk"}
    data : str or os.PathLike
        Cutout file.
    rows : array_like of int
        Galaxies fitted (disjoint from those the baseline is compared with).
    batch_size : int, optional
    device : str or torch.device, optional
    seed : int, optional

    Returns
    -------
    model : galgen.models.parametric.SersicModel
        Built for the file's grid.
    z : torch.Tensor
        ``(len(rows), d)`` fitted parameters.
    log_scale : torch.Tensor
        ``(len(rows),)`` fitted log fluxes.
    """
    from ..inference import fit_map

    device = resolve_device(device)
    loader = ObservationLoader(data, np.asarray(rows), (), device=device)
    model = resolve_model(kind, device, data=(loader.stamp_size, loader.oversampling, loader.pixel_scale))
    zs, ss = [], []
    for b in loader.iter_batches(batch_size):
        res = fit_map(model, b.observed, b.observation, generator=generator(device, seed, int(b.index[0])))
        zs.append(res.z)
        ss.append(res.log_scale)
    return model, torch.cat(zs), torch.cat(ss)


def _model_name(spec, model, i) -> str:
    return spec if isinstance(spec, str) and not Path(str(spec)).exists() else f"{model.kind}-{i}"


def _noise_sigma(variance: np.ndarray) -> np.ndarray:
    """Per-stamp sky-noise sigma: the median variance's square root."""
    return np.sqrt(np.median(variance.reshape(len(variance), -1), 1))


def _targets(gen: dict, c2st: dict, names) -> dict:
    """The targets: normalised W1 <= 2x the real-vs-real floor on every statistic, C2ST <= 0.60."""
    per = gen["statistics"]
    w1_ok = {q: bool(per[q]["w1"] is not None and per[q]["w1_floor"] is not None
                     and per[q]["w1"] <= 2 * per[q]["w1_floor"]) for q in names if q in per}
    return {"w1_within_2x_floor": w1_ok, "w1_all_within_2x_floor": bool(all(w1_ok.values())),
            "missed": sorted(q for q, ok in w1_ok.items() if not ok),
            "c2st_at_most_0.60": bool(c2st["accuracy"] <= 0.60)}


def evaluate_models(models, data, out, *, n: int = 5000, n_grid: int = 8, seed: int = 0, batch_size: int = 256,
                    device="cpu", baseline: str | None = "sersic", image_c2st: bool = True,
                    measure_on: str = "auto") -> dict:
    """The quality report of generative models on held-out galaxies (``galgen evaluate``).

    Every model (each prior choice of a VAE separately) draws ``n`` galaxies, observed
    through the PSFs and noise of the first ``n`` held-out galaxies. The morphology
    statistics of :func:`~galgen.evaluation.statistics.morphology_statistics` are
    measured on the noise-free observed images of both (the noisy ones, with their
    variance maps, where the file holds no ``noiseless``; ``measure_on`` chooses), and
    compared by
    :func:`~galgen.evaluation.distances.compare_statistics` (KS and normalised W1, each
    beside the same distance between two halves of the real set: the floor), by a
    classifier two-sample test on the statistics (and on the observed stamps with a small
    CNN), and in bins of magnitude and size. Models with an encoder also reconstruct the
    held-out galaxies (chi-square per pixel and residual maps). A parametric baseline
    (Sersic fits of *other* real galaxies of the file, rows ``n .. 2n``, rendered through
    the same PSFs and noise) is evaluated the same way: what a user gets without deep
    learning.

    Parameters
    ----------
    models : sequence
        Models, run directories, checkpoint files or pretrained names (see
        :func:`galgen.runtime.resolve_model`); may be empty with a ``baseline``.
    data : str or os.PathLike
        Held-out cutout file (simulated: with ``noiseless`` images).
    out : str or os.PathLike
        Report directory: ``report.md``, ``report.html``, ``quality.json``,
        ``statistics.h5`` (every galaxy's statistics, a group per set) and the figures
        (``samples.png``, ``histograms.png``, ``planes.png``, ``power_spectra.png``,
        ``reconstruction_<model>.png``, ``training_<model>.png`` for models loaded from a
        run directory).
    n : int, optional
        Galaxies evaluated.
    n_grid : int, optional
        Galaxies per row of the image grids.
    seed : int, optional
    batch_size : int, optional
    device : str or torch.device, optional
    baseline : {"sersic", "bulge-disk", None}, optional
        The parametric baseline (skipped, with a note in the report, where the file has
        fewer than ``2 n`` galaxies).
    image_c2st : bool, optional
        Also run the CNN classifier test on the observed stamps.
    measure_on : {"auto", "noiseless", "observed"}, optional
        The images the statistics are measured on: the noise-free observed images
        (``"noiseless"``; simulated files only), the noisy ones with their variance maps
        (``"observed"``: noise terms subtracted from asymmetry and smoothness, galaxy
        pixels found above the noise, as statmorph does on real images), or the
        noise-free ones where the file has them and the noisy ones otherwise
        (``"auto"``). The noise-free test is the harsher one: it also sees structure
        below the noise, which a model trained on noisy images learns only indirectly;
        the observed one compares what a survey shows.

    Returns
    -------
    dict
        What ``quality.json`` holds: ``generation`` (per set: per statistic KS, W1, their
        floors and medians), ``c2st`` and ``c2st_images`` (per set, with the real-vs-real
        ``floor``; ``c2st_images_floor`` is the CNN test of one half of the real stamps
        against the other, at half the sample size), ``binned`` (per
        set: by magnitude and by size), ``reconstruction`` (per reconstructing model),
        ``targets`` (per set), ``timing``, ``n``, ``data``, ``measured_on``.
    """
    import time

    from . import figures
    from .distances import binned_comparison, c2st_images, c2st_statistics, compare_statistics
    from .page import write_report
    from .statistics import STATISTICS, power_spectrum

    device = resolve_device(device)
    out = Path(out)
    t_start = time.perf_counter()
    with CutoutFile(data) as f:
        n_file = len(f)
        n = min(n, n_file)
        scale = f.pixel_scale
        on = _measured_on(measure_on, "noiseless" in f.keys, data)
        real_images = f.read(on, slice(0, n)).astype(np.float64)
        variance = f.read("variance", slice(0, n))
        real_var = variance.astype(np.float64) if on == "observed" else None
        real_observed = f.read("observed", slice(0, n))
        noise = _noise_sigma(variance)
        real_mask = f.read("mask", slice(0, n)).astype(bool) if "mask" in f.keys else None
        zero_point = f.attrs.get("zero_point")
    timing = {}
    t0 = time.perf_counter()
    stats = {"real": morphology_statistics(real_images, scale, mask=real_mask, variance=real_var)}
    timing["statistics_real_s"] = time.perf_counter() - t0
    log.info("statistics of %d real galaxies: %.0f s", n, timing["statistics_real_s"])
    k, p_real = power_spectrum(real_images, scale)
    spectra = {"real": p_real}
    report = {"data": str(data), "n": n, "measured_on": on, "statistics": list(STATISTICS),
              "reconstruction": {}, "generation": {}, "c2st": {}, "c2st_images": {}, "binned": {}, "targets": {},
              "kinds": {}, "notes": []}
    panels = {"real": real_observed[:n_grid]}
    sets = []  # (label, model, latents, conditions)
    out.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(models):
        model = resolve_model(spec, device)
        name = _model_name(spec, model, i)
        run_dir = Path(model.checkpoint_path or "").parent
        if (run_dir / "train_log.csv").exists():
            from ..plotting import training_curves

            training_curves(run_dir, out / f"training_{name}.png")
        held_out = _holdout(data, n, device, model.conditions)
        rec = _reconstruction_scores(model, held_out, batch_size)
        if rec is not None:  # models with an encoder (AE, VAE) reconstruct observations
            report["reconstruction"][name] = _reconstruction_summary(rec, held_out)
            _reconstruction_figure(model, held_out, n_grid, noise, out / f"reconstruction_{name}.png", name)
        variants = [(f" ({label})", model.with_prior(choice)) for choice, label in model.prior_choices.items()]
        # a conditional model twice: given the held-out galaxies' conditions, and drawing
        # its own from the training set's (the population it samples without --cond)
        modes = [("", "data")]
        if model.cond_dim:
            modes = [(" (held-out conditions)", "data"), (" (drawn conditions)", "model")]
        sets += [(name + suffix + csuffix, variant, None, mode) for suffix, variant in variants or [("", model)]
                 for csuffix, mode in modes]
    if baseline is not None:
        if n_file >= 2 * n:
            t0 = time.perf_counter()
            pm, z, s = parametric_fits(baseline, data, np.arange(n, 2 * n), device=device, seed=seed)
            timing[f"{baseline}_fits_s"] = time.perf_counter() - t0
            log.info("%s baseline: %d fits in %.0f s", baseline, n, timing[f"{baseline}_fits_s"])
            sets.append((f"{baseline} fits (baseline)", pm, (z, s), "data"))
        else:
            report["notes"].append(f"no {baseline} baseline: it fits galaxies {n}..{2 * n} of the file, which has "
                                   f"{n_file}")
    if image_c2st and sets:  # the CNN's floor: one half of the real stamps against the other
        t0 = time.perf_counter()
        perm = np.random.default_rng(seed).permutation(n)
        a, b = perm[:n // 2], perm[n // 2:2 * (n // 2)]
        report["c2st_images_floor"] = c2st_images(real_observed[a], real_observed[b], noise=(noise[a], noise[b]),
                                                  seed=seed, device=device)
        timing["c2st_images_floor_s"] = time.perf_counter() - t0
    for label, model, latents, mode in sets:
        t0 = time.perf_counter()
        g = generated_observations(model, data, n=n, seed=seed, batch_size=batch_size, device=device,
                                   latents=latents, conditions=mode)
        st = morphology_statistics(g[on].astype(np.float64), scale, mask=real_mask,
                                   variance=g["variance"].astype(np.float64) if on == "observed" else None)
        stats[label] = st
        spectra[label] = power_spectrum(g[on].astype(np.float64), scale)[1]
        report["kinds"][label] = model.kind
        report["generation"][label] = compare_statistics(stats["real"], st, seed=seed)
        report["c2st"][label] = c2st_statistics(stats["real"], st, seed=seed)
        if image_c2st:
            report["c2st_images"][label] = c2st_images(real_observed, g["observed"], noise=(noise, noise),
                                                       seed=seed, device=device)
            report["c2st_images"][label]["floor"] = report["c2st_images_floor"]["accuracy"]
        report["binned"][label] = {by: binned_comparison(stats["real"], st, by=by) for by in ("flux", "r50")}
        report["targets"][label] = _targets(report["generation"][label], report["c2st"][label], STATISTICS)
        panels[label] = g["observed"][:n_grid]
        timing[f"{label}_s"] = time.perf_counter() - t0
        summary = report["generation"][label]["summary"]
        log.info("%s: mean W1 %s (floor %s), C2ST %.3f; %.0f s", label, summary["w1_mean"],
                 summary["w1_floor_mean"], report["c2st"][label]["accuracy"], timing[f"{label}_s"])
    figures.sample_grid(panels, noise[:n_grid], out / "samples.png")
    figures.statistic_histograms(stats, STATISTICS, out / "histograms.png")
    figures.statistic_planes(stats, out / "planes.png", zero_point=zero_point)
    figures.power_spectra(k, spectra, out / "power_spectra.png")
    timing["total_s"] = time.perf_counter() - t_start
    report["timing"] = timing
    report["power_spectrum"] = {"k": k.tolist(), **{name: np.nanmedian(p, 0).tolist() for name, p in spectra.items()}}
    _write_statistics(stats, out / "statistics.h5")
    with atomic_output(out / "quality.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=_json_default))
    write_report(report, out)
    return report


def _measured_on(choice: str, has_noiseless: bool, data) -> str:
    """The images ``evaluate_models`` measures: ``"noiseless"`` or ``"observed"``."""
    if choice not in ("auto", "noiseless", "observed"):
        raise GalgenInputError(f"measure_on: 'auto', 'noiseless' or 'observed', got {choice!r}")
    if choice == "noiseless" and not has_noiseless:
        raise GalgenInputError(f"{data}: measure_on='noiseless' needs the simulator's noise-free images "
                               "('noiseless'), which this file does not hold; use 'observed'")
    if choice == "auto":
        return "noiseless" if has_noiseless else "observed"
    return choice


def _write_statistics(stats: dict, path: Path) -> None:
    """Per-galaxy statistics of every set, one HDF5 group per set (``real`` and the generated ones)."""
    import h5py

    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for label, st in stats.items():
                g = f.create_group(label.replace("/", "|"))
                for name, v in st.items():
                    g.create_dataset(name, data=np.asarray(v))


def _json_default(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


@torch.no_grad()
def _reconstruction_figure(model, loader, n_grid, noise, out, name):
    from .figures import reconstruction_grid

    batch = next(iter(loader.iter_batches(n_grid)))
    guess = amortised_guess(model, batch.observed, batch.cond, batch.observation)
    rec = batch.observation.noiseless(model.decode(guess, batch.cond).float())
    res = batch.observation.noise.whiten(batch.observed - rec, rec)
    reconstruction_grid(batch.observed.cpu().numpy(), rec.cpu().numpy(), res.cpu().numpy(), noise[:n_grid], out,
                        title=f"{name}: reconstructions of held-out galaxies")
