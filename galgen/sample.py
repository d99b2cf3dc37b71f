"""Stage functions that use a trained model: draw new galaxies, score observed ones.

``galgen sample`` draws intrinsic galaxies from a model and observes them with a survey
preset's per-galaxy PSFs and CCD noise, writing the cutout format (so samples can be
summarised, previewed and compared with real data by the same tools).
``galgen anomaly`` writes each galaxy's reduced chi-square under an AE or VAE
reconstruction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .errors import GalgenInputError
from .runtime import derive_seed, resolve_device, resolve_model

__all__ = ["resolve_model", "parse_conditions", "sample_to_file", "anomaly_scores"]


def parse_conditions(text, conditions) -> torch.Tensor | None:
    """Parse ``"mag=17.5,hlr=1.2"`` into a vector in the model's condition order.

    Parameters
    ----------
    text : str or dict or None
        Conditions as text or a mapping.
    conditions : sequence of str
        The model's condition names.

    Returns
    -------
    torch.Tensor or None
        ``(C,)`` values; None for an unconditional model, or for a conditional one given
        no text (the model then draws its conditions from its training set's:
        :meth:`galgen.models.GenerativeModel.draw_conditions`).

    Examples
    --------
    >>> parse_conditions("hlr=1.2, mag=17.5", ("mag", "hlr"))
    tensor([17.5000,  1.2000])
    """
    conditions = tuple(conditions)
    if not conditions:
        if text:
            raise GalgenInputError("--cond: this model is not conditioned on catalog quantities")
        return None
    if text is None:
        return None
    if isinstance(text, str):
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, val = part.partition("=")
            try:
                values[key.strip()] = float(val)
            except ValueError:
                raise GalgenInputError(f"--cond: {part!r} is not name=number") from None
            if not sep:
                raise GalgenInputError(f"--cond: {part!r} is not name=number")
    else:
        values = {k: float(v) for k, v in dict(text).items()}
    unknown = sorted(set(values) - set(conditions))
    missing = [c for c in conditions if c not in values]
    if unknown or missing:
        raise GalgenInputError(f"--cond: the model is conditioned on {list(conditions)}; "
                               f"missing {missing}, unknown {unknown}")
    return torch.tensor([values[c] for c in conditions], dtype=torch.float32)


def sample_to_file(model, out, *, n: int = 1000, survey=None, seed: int = 0, prior=None, cond=None,
                   device="auto", batch_size: int = 256, psf_size: int | None = None,
                   overwrite: bool = False) -> Path:
    """Draw galaxies from a model, observe them with a survey's PSFs and noise, write a cutout file.

    Parameters
    ----------
    model : str, os.PathLike or GenerativeModel
        See :func:`galgen.runtime.resolve_model`.
    out : str or os.PathLike
        Output cutout file (``intrinsic``, ``noiseless``, ``observed``, ``psf``,
        ``variance``, ``mask`` and a catalog).
    n : int, optional
        Number of galaxies.
    survey : str, optional
        Preset or survey YAML (default: the survey of the model's training data). Its
        pixel scale must be the model's.
    seed : int, optional
        Seed of the latent draws, PSFs and noise.
    prior : str, optional
        One of the model's ``prior_choices`` (a VAE's ``"flow"``, ``"mixture"`` or ``"normal"``;
        default the model's own: the flow when fitted).
    cond : str or dict, optional
        Conditions of a conditional model (``"mag=17.5,hlr=1.2"``); without them a
        conditional model draws each galaxy's from its training set's, recorded in the
        catalog as ``cond_<name>``.
    device : str, optional
        ``auto``, ``cuda``, ``cpu``, ...
    batch_size : int, optional
        Galaxies per batch.
    psf_size : int, optional
        PSF grid size in intrinsic pixels (default about 33 detector pixels).
    overwrite : bool, optional
        Replace an output made by another job.

    Returns
    -------
    pathlib.Path
        The file (reused as is when it holds this very job).
    """
    from astropy.table import Table

    from .data.cutouts import CutoutWriter, output_is_current
    from .models.base import sample_latents
    from .physics import CCDNoise, Observation, psf_from_galsim
    from .simulate.surveys import load_survey

    if n < 1:
        raise GalgenInputError(f"--n: must be >= 1, got {n}")
    dev = resolve_device(device)
    model = resolve_model(model, dev, prior=prior)
    prov = getattr(model, "provenance", {}) or {}
    cfg = model.config
    k, stamp = int(cfg["oversampling"]), int(cfg["stamp"])
    survey = survey or prov.get("survey") or "sdss"
    sv = load_survey(survey)
    scale = float(prov.get("pixel_scale", sv.pixel_scale))
    if not math.isclose(sv.pixel_scale, scale, rel_tol=1e-6):
        raise GalgenInputError(f"--survey: {sv.name} has {sv.pixel_scale}\"/pixel but the model draws galaxies "
                               f"for {scale}\"/pixel (its training data); choose a survey with that scale")
    cond_vec = parse_conditions(cond, model.conditions)
    P = psf_size or (33 * k + (1 - (33 * k) % 2))
    fingerprint = json.dumps({"model": model.checkpoint_path or repr(cfg), "n": n, "survey": sv.name,
                              "seed": seed, "prior": prior, "cond": None if cond_vec is None else cond_vec.tolist(),
                              "psf_size": P, "batch_size": batch_size}, sort_keys=True)
    out = Path(out)
    if output_is_current(out, fingerprint, overwrite):
        return out
    attrs = dict(survey=sv.name, pixel_scale=scale, oversampling=k, stamp_size=stamp, flux_unit="adu", seed=seed,
                 source=f"galgen-sample:{cfg['kind']}", shard="0/1")
    shapes = {"observed": (stamp, stamp), "noiseless": (stamp, stamp), "intrinsic": (stamp * k, stamp * k),
              "psf": (P, P), "variance": (stamp, stamp), "mask": (stamp, stamp)}
    rows = []
    noise = CCDNoise(sv.sky_level, sv.gain, sv.read_noise)
    with CutoutWriter(out, n=n, shapes=shapes, attrs=attrs, fingerprint=fingerprint) as w:
        # Every batch has its own seeds, so an interrupted run continues where it stopped
        # and ends identical to an uninterrupted one.
        done = w.n_done
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            rng = np.random.default_rng([seed, start])
            gen = torch.Generator(device=dev).manual_seed(derive_seed(seed, start))
            params = [sv.psf.draw(rng) for _ in range(m)]
            # a conditional model given no conditions draws the population's, from its
            # training set's (own seed per batch: a resumed run records the same rows)
            drawn = None
            if model.cond_dim and cond_vec is None:
                drawn = model.draw_conditions(m, torch.Generator(device=dev).manual_seed(derive_seed(seed, start, 1)))
            if start >= done:
                psf = torch.stack([psf_from_galsim(sv.psf.build(**p), P, scale / k) for p in params]).to(dev)
                c = drawn if cond_vec is None else cond_vec.to(dev).expand(m, -1)
                with torch.no_grad():
                    intrinsic = model.decode(sample_latents(model.prior(c), m, generator=gen), c).float()
                obs = Observation(psf, pixel_scale=scale, oversampling=k, stamp=stamp, noise=noise)
                noiseless, observed = obs.observe(intrinsic, generator=gen)
                w.write({"observed": observed.cpu().numpy(), "noiseless": noiseless.cpu().numpy(),
                         "intrinsic": intrinsic.cpu().numpy(), "psf": psf.cpu().numpy(),
                         "variance": noise.variance(noiseless).cpu().numpy(),
                         "mask": np.zeros((m, stamp, stamp), np.uint8)})
            for i, p in enumerate(params):
                rows.append({"index": start + i, **p, "sky_level": sv.sky_level})
            if drawn is not None:
                for i, row in enumerate(drawn.cpu().tolist()):
                    rows[start + i].update({f"cond_{c}": v for c, v in zip(model.conditions, row)})
        cat = Table(rows=rows)
        cat["flux"] = np.concatenate([w.read("intrinsic", slice(i, i + batch_size)).sum((1, 2))
                                      for i in range(0, n, batch_size)])
        if cond_vec is not None:
            for j, c in enumerate(model.conditions):
                cat[f"cond_{c}"] = np.full(n, float(cond_vec[j]))
        return w.finish(cat)


def anomaly_scores(model, data, out, *, device="auto", batch_size: int = 256, overwrite: bool = False) -> Path:
    """Reduced chi-square of every galaxy's reconstruction by an AE or VAE, as a catalog.

    Parameters
    ----------
    model : str, os.PathLike or GenerativeModel
        An auto-encoder or VAE (see :func:`resolve_model`).
    data : str or os.PathLike
        Cutout file.
    out : str or os.PathLike
        Catalog file; the format follows the extension (``.fits``, ``.ecsv``, ...).
    device : str, optional
    batch_size : int, optional
    overwrite : bool, optional
        Replace an existing ``out``.

    Returns
    -------
    pathlib.Path

    Notes
    -----
    Columns: ``index`` (row in ``data``), ``anomaly`` (chi-square per good pixel; about 1
    for galaxies the model explains down to the noise), ``chi2``, ``n_good``.
    """
    from astropy.table import Table

    from .data.atomic import atomic_output
    from .data.loading import ObservationLoader
    from .models.base import good_pixels

    out = Path(out)
    if out.exists() and not overwrite:
        raise GalgenInputError(f"{out}: output exists; pass --overwrite to replace it")
    dev = resolve_device(device)
    model = resolve_model(model, dev)
    loader = ObservationLoader(data, conditions=model.conditions, device=dev)
    loader.check_grid(model.config["stamp"], model.config["oversampling"])
    n = len(loader)
    scores, chi2s, goods = [], [], []
    for batch in loader.iter_batches(batch_size):
        s = model.anomaly_score(batch.observed, batch.observation, batch.cond)
        g = good_pixels(batch.observed, batch.observation).expand_as(s)
        scores.append(s.cpu())
        goods.append(g.cpu())
        chi2s.append((s * g).cpu())
    table = Table({"index": np.arange(n), "anomaly": torch.cat(scores).numpy(),
                   "chi2": torch.cat(chi2s).numpy(), "n_good": torch.cat(goods).numpy().astype(np.int64)})
    table.meta["model"] = str(model.checkpoint_path or model.kind)
    table.meta["data"] = str(data)
    with atomic_output(out) as tmp:
        table.write(tmp, format="fits" if out.suffix.lower() in (".fits", ".fit") else None, overwrite=True)
    return out
