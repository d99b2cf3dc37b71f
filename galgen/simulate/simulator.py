"""The ``simulate`` stage: a population, a survey and GalSim make a cutout file."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np

from .._version import __version__
from ..data.cutouts import CutoutWriter, output_is_current
from ..errors import GalgenInputError
from ..sharding import parse_shard
from .morphology import MORPHOLOGIES, MORPHOLOGY_COLUMNS, has_morphology
from .population import CATALOG_COLUMNS, load_catalog, select_rows
from .render import describe_galaxy, render_galaxy
from .surveys import load_survey

__all__ = ["simulate", "draw_truth"]

log = logging.getLogger("galgen.simulate")

_STRUCT_COLUMNS = ("mag", "bt", "hlr", "hlr_disk", "hlr_bulge", "n_disk", "n_bulge", "knot_frac", "n_knots")


def draw_truth(row: dict, survey, seed: int, index: int, morphology: bool = False) -> dict:
    """Per-galaxy simulation parameters of galaxy ``index`` of a run with ``seed``.

    The galaxy keeps the catalog's structure and is rotated by a random angle; its PSF
    parameters and the seeds of its knots and noise are drawn too. Everything comes
    from a generator seeded by ``(seed, index)`` alone, so a galaxy is the same whatever
    the sharding or the number of workers.

    Parameters
    ----------
    row : dict
        Catalog row (columns of :data:`galgen.simulate.CATALOG_COLUMNS`).
    survey : Survey
        Gives the flux zero point and the PSF distribution.
    seed : int
        Run seed.
    index : int
        Global galaxy index in the run.
    morphology : bool, optional
        Copy the morphology columns (:data:`galgen.simulate.morphology.MORPHOLOGY_COLUMNS`)
        too; they add no random draws, so the other values are the same either way.

    Returns
    -------
    dict
        Truth row: structure, rotated ``beta``, ``g1_disk`` ... ``g2_bulge``, ``flux``
        (ADU), ``psf_fwhm``, ``psf_g1``, ``psf_g2``, ``knot_seed``, ``noise_seed``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    truth = {"index": int(index), "catalog_id": int(row["id"])}
    truth.update({c: row[c] for c in _STRUCT_COLUMNS})
    beta = (float(row["beta"]) + rng.uniform(0.0, 180.0)) % 180.0
    truth["beta"] = beta
    two_beta = math.radians(2.0 * beta)
    for comp in ("disk", "bulge"):
        g = float(row[f"g_{comp}"])
        truth[f"g1_{comp}"] = g * math.cos(two_beta)
        truth[f"g2_{comp}"] = g * math.sin(two_beta)
    truth["flux"] = float(survey.flux(row["mag"]))
    truth.update(survey.psf.draw(rng))
    truth["knot_seed"], truth["noise_seed"] = (int(x) for x in rng.integers(1, 2**31 - 1, size=2))
    if morphology:
        truth.update({c: row[c] for c in MORPHOLOGY_COLUMNS})
    return truth


def _render_chunk(args):
    survey, truths, stamp, oversampling, psf_size, trunc = args
    out = [render_galaxy(t, survey, stamp, oversampling=oversampling, psf_size=psf_size,
                         trunc_disk=trunc[0], trunc_bulge=trunc[1]) for t in truths]
    return {k: np.stack([a[k] for a in out]) for k in out[0]}


def _worker_init():
    # One GalSim OpenMP thread per worker process: the workers already fill the cores, and
    # GalSim's default (all cores in every process) oversubscribes them.
    import galsim

    galsim.set_omp_threads(1)


def _catalog_digest(cat, columns) -> str:
    """Digest of the catalog columns a simulation reads."""
    h = hashlib.sha256()
    for c in (c for c in cat.colnames if c in columns):
        h.update(c.encode())
        h.update(np.ascontiguousarray(np.asarray(cat[c])).tobytes())
    return h.hexdigest()[:16]


def _truth_table(truths, extras, survey, stamp):
    import astropy.units as u
    from astropy.table import Table

    t = Table(rows=[{**tr, **ex} for tr, ex in zip(truths, extras)])
    half = (stamp / 2 - 0.5) * survey.pixel_scale
    t["fits_stamp"] = np.asarray(t["r_extent"]) + 3 * np.asarray(t["psf_fwhm"]) <= half
    t["sky_level"] = np.full(len(t), survey.sky_level)
    t["gain"] = np.full(len(t), survey.gain)
    t["read_noise"] = np.full(len(t), survey.read_noise)
    units = {"mag": u.mag, "hlr": u.arcsec, "hlr_disk": u.arcsec, "hlr_bulge": u.arcsec, "beta": u.deg,
             "flux": u.adu, "psf_fwhm": u.arcsec, "r_extent": u.arcsec, "knot_radius": u.arcsec,
             "sky_level": u.adu, "gain": u.electron / u.adu, "read_noise": u.electron}
    units.update({c: u.Unit(unit) for c, (unit, _) in MORPHOLOGY_COLUMNS.items() if unit and c in t.colnames})
    for c, unit in units.items():
        t[c].unit = unit
    t["fits_stamp"].description = "all intrinsic light within r_extent, plus 3 PSF FWHM, lies in the stamp"
    t["flux"].description = "total flux of the galaxy, 10**(-0.4 (mag - zero_point))"
    t["psf_flux_in_stamp"].description = "fraction of the PSF light inside the stored PSF grid"
    return t


def simulate(out, *, survey="sdss", n: int = 1000, stamp: int = 64, seed: int = 0, shard=None,
             oversampling: int = 1, psf_size: int | None = None, catalog=None, workers: int = 1,
             chunk_size: int = 32, progress: bool | None = None, overwrite: bool = False,
             morphology: str = "bulge-disk") -> Path:
    """Simulate ``n`` galaxies of a survey with GalSim and write a cutout file.

    Resumable: the file is built as ``<out>.partial``; a run killed midway and started
    again with the same arguments continues where it stopped and gives the same file
    as an uninterrupted run. If ``out`` already holds the result of the same arguments,
    nothing is recomputed.

    Parameters
    ----------
    out : str or os.PathLike
        Output cutout file (HDF5).
    survey : str, os.PathLike or Survey, optional
        Preset name (``sdss``, ``sdss-deep``, ``lsst``, ``hst``) or survey YAML file.
    n : int, optional
        Number of galaxies of the whole (unsharded) run.
    stamp : int, optional
        Detector stamp size in pixels (>= 8).
    seed : int, optional
        Seed; the same seed gives identical arrays.
    shard : str or Shard, optional
        ``"k/N"``: write only galaxies ``[k*n//N, (k+1)*n//N)`` (see
        :mod:`galgen.sharding`); merge the shards with :func:`galgen.data.merge_cutouts`.
    oversampling : int, optional
        Intrinsic pixels per detector pixel (>= 1).
    psf_size : int, optional
        PSF grid size in intrinsic pixels (default: ``stamp``).
    catalog : str, os.PathLike or astropy.table.Table, optional
        Population catalog (default: the survey's bundled catalog).
    workers : int, optional
        Processes rendering in parallel (results do not depend on it).
    chunk_size : int, optional
        Galaxies rendered and written per block (the resume granularity).
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).
    overwrite : bool, optional
        Replace an existing ``out`` made with other arguments.
    morphology : {"bulge-disk", "rich"}, optional
        ``"rich"`` draws the catalog's spiral arms, bars, lopsided disks, dust lanes,
        clumpy irregulars and companions (:mod:`galgen.simulate.morphology`; the bundled
        catalogs have them); ``"bulge-disk"`` (the default, what the pretrained models
        learned) draws bulge + disk + knots galaxies, identical to those of galgen
        before these components existed.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    GalgenInputError
        On invalid arguments or an existing output of another job.

    Examples
    --------
    >>> simulate("sdss_small.h5", survey="sdss", n=100, stamp=48, seed=1)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    out = Path(out)
    sv = load_survey(survey)
    for name, value, lo in (("--n", n, 1), ("--stamp", stamp, 8), ("--oversampling", oversampling, 1),
                            ("--workers", workers, 1), ("chunk_size", chunk_size, 1)):
        if not isinstance(value, (int, np.integer)) or value < lo:
            raise GalgenInputError(f"{name}: must be an integer >= {lo}, got {value!r}")
    if psf_size is not None and (not isinstance(psf_size, (int, np.integer)) or psf_size < 3):
        raise GalgenInputError(f"--psf-size: must be an integer >= 3, got {psf_size!r}")
    if morphology not in MORPHOLOGIES:
        raise GalgenInputError(f"--morphology: one of {list(MORPHOLOGIES)}, got {morphology!r}")
    sh = parse_shard(shard)
    cat = load_catalog(catalog if catalog is not None else sv.catalog)
    rich = morphology == "rich"
    if rich and not has_morphology(cat):
        raise GalgenInputError(f"--morphology rich: the catalog {catalog or sv.catalog} has no morphology columns "
                               f"({', '.join(list(MORPHOLOGY_COLUMNS)[:3])}, ...); use --morphology bulge-disk or a "
                               "catalog made by generate_population")
    used = set(CATALOG_COLUMNS) | (set(MORPHOLOGY_COLUMNS) if rich else set())
    model = cat.meta.get("model", {}) or {}
    trunc = (float(model.get("trunc_disk", 3.0)), float(model.get("trunc_bulge", 6.0)))
    if catalog is None:
        cat_name = sv.catalog
    else:
        cat_name = "table" if hasattr(catalog, "colnames") else str(catalog)

    start, stop = sh.bounds(n)
    fingerprint = json.dumps({
        "stage": "simulate", "survey": sv.to_dict(), "n": int(n), "stamp": int(stamp), "seed": int(seed),
        "shard": str(sh), "oversampling": int(oversampling), "psf_size": psf_size,
        "catalog": _catalog_digest(cat, used), "galgen": __version__,
        **({"morphology": morphology} if rich else {}),  # (bulge-disk: the fingerprint of earlier versions)
    }, sort_keys=True, default=str)

    if output_is_current(out, fingerprint, overwrite):
        log.info("%s already holds this simulation; nothing to do", out)
        return out

    rows = select_rows(len(cat), n, seed)[start:stop]
    cols = list(cat.colnames)
    data = {c: np.asarray(cat[c]) for c in cols}
    truths = [draw_truth({c: data[c][r] for c in cols}, sv, seed, i, morphology=rich)
              for i, r in zip(range(start, stop), rows)]
    m = len(truths)
    k = int(oversampling)
    P = int(psf_size or stamp)
    shapes = {"observed": (stamp, stamp), "noiseless": (stamp, stamp), "intrinsic": (stamp * k, stamp * k),
              "psf": (P, P), "variance": (stamp, stamp), "mask": (stamp, stamp)}
    attrs = {"survey": sv.name, "band": sv.band, "pixel_scale": sv.pixel_scale, "oversampling": k,
             "stamp_size": int(stamp), "flux_unit": "adu", "seed": int(seed), "source": "galsim",
             "shard": str(sh), "index_start": start, "index_stop": stop, "n_total": int(n),
             "catalog": cat_name, "zero_point": sv.zero_point, "sky_level": sv.sky_level,
             "gain": sv.gain, "read_noise": sv.read_noise,
             "survey_yaml": json.dumps(sv.to_dict(), sort_keys=True), **({"morphology": morphology} if rich else {})}
    if progress is None:
        progress = sys.stderr.isatty()
    with CutoutWriter(out, n=m, shapes=shapes, attrs=attrs, fingerprint=fingerprint) as w:
        done = w.n_done
        if done:
            log.info("%s: resuming after %d of %d galaxies", out, done, m)
        chunks = [(sv, truths[i:i + chunk_size], stamp, k, P, trunc) for i in range(done, m, chunk_size)]
        bar = tqdm(total=m, initial=done, disable=not progress, unit="gal", desc=f"simulate {sv.name}")
        # spawn, not fork: a forked child of a process holding torch/OpenMP threads can hang
        pool = (cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                       initializer=_worker_init) if workers > 1 else None)
        try:
            results = pool.map(_render_chunk, chunks) if pool else map(_render_chunk, chunks)
            for arrays in results:
                w.write(arrays)
                bar.update(len(arrays["observed"]))
        finally:
            bar.close()
            if pool:
                pool.shutdown(cancel_futures=True)
        extras = [describe_galaxy(t, sv, oversampling=k, psf_size=P, trunc_disk=trunc[0], trunc_bulge=trunc[1])
                  for t in truths]
        w.finish(_truth_table(truths, extras, sv, stamp))
    return out

