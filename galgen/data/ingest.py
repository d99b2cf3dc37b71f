"""Ingest FITS cutouts into the galgen HDF5 cutout format.

Each input FITS file holds one galaxy:

* the image: HDU ``image_hdu`` (name or index), by default the first HDU with 2-d data;
* the PSF: HDU ``psf_hdu`` of the same file, or one shared PSF file (``psf=``);
* the noise: HDU ``variance_hdu`` (adu^2) if present, else ``weight_hdu`` (inverse
  variance, 0 = no data); one of them is required;
* optionally a mask: HDU ``mask_hdu``, non-zero = bad pixel.

Decisions (documented in the docs' schema page):

* **Pixel scale**: ``pixel_scale`` argument, else the image WCS
  (``astropy.wcs.utils.proj_plane_pixel_scales``), else header ``PIXSCALE``; all files
  must agree to 1e-3.
* **Non-finite pixels** (image or variance) and non-positive variance: with
  ``nonfinite="mask"`` (default) they are masked, set to 0 in the image, and a warning
  names the file and the count; ``nonfinite="raise"`` refuses the file. A cutout with no
  good pixel left is refused.
* **PSF**: square, finite, centred (flux-weighted centroid within 1 pixel of
  ``(P//2, P//2)``), summing to 1 within ``psf_tolerance`` unless ``normalize_psf``;
  stored normalised. galgen's convention is a PSF *without* pixel response at the
  intrinsic scale; ingested data have oversampling 1, and a survey's delivered PSF
  usually *includes* the pixel response: know which yours is.
* **Sizes**: all images square and the same size, or centre-cropped with ``stamp``
  (the centre pixel ``(H//2, W//2)`` becomes ``(S//2, S//2)``).

Everything is validated before the output is created; the file is written as
``<out>.partial`` and renamed when complete, so a failure leaves no output.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

from ..errors import GalgenInputError
from .cutouts import CutoutWriter, output_is_current

__all__ = ["ingest_fits", "read_fits_cutout"]


def _open_fits(path):
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise GalgenInputError(f"{path}: no such file")
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("silentfix")
        _ = [h.header for h in hdul]
    except Exception as exc:  # astropy raises OSError/ValueError/VerifyError for non-FITS input
        raise GalgenInputError(f"{path}: not a readable FITS file ({exc})") from None
    return hdul


def _find_hdu(hdul, key, path, what, required=True):
    if key is None:
        for h in hdul:
            if h.data is not None and np.ndim(h.data) == 2:
                return h
        raise GalgenInputError(f"{path}: no HDU with 2-d image data (looking for the {what})")
    try:
        h = hdul[int(key)] if str(key).lstrip("-").isdigit() else hdul[str(key)]
    except (KeyError, IndexError):
        if not required:
            return None
        names = [h.name for h in hdul]
        raise GalgenInputError(f"{path}: no {what} HDU {key!r} (HDUs: {names})") from None
    if h.data is None or np.ndim(h.data) != 2:
        raise GalgenInputError(f"{path}: HDU {key!r} ({what}) holds no 2-d image")
    return h


def _pixel_scale(header, path):
    import warnings as _w

    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import proj_plane_pixel_scales

    with _w.catch_warnings():
        _w.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header)
            if wcs.has_celestial:
                scales = proj_plane_pixel_scales(wcs.celestial) * 3600.0  # deg -> arcsec
                if np.all(np.isfinite(scales)) and np.all(scales > 0):
                    return float(np.sqrt(scales[0] * scales[1]))
        except Exception:
            pass
    if "PIXSCALE" in header:
        return float(header["PIXSCALE"])
    return None


def _crop(arr, stamp, path, what):
    h, w = arr.shape
    if stamp is None:
        return arr
    if h < stamp or w < stamp:
        raise GalgenInputError(f"{path}: {what} is {h}x{w}, smaller than --stamp {stamp}")
    y0, x0 = h // 2 - stamp // 2, w // 2 - stamp // 2
    return arr[y0:y0 + stamp, x0:x0 + stamp]


def _check_psf(psf, path, where, tolerance, normalize):
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] != psf.shape[1]:
        raise GalgenInputError(f"{path}: PSF ({where}) must be square 2-d, got shape {psf.shape}")
    if not np.all(np.isfinite(psf)):
        raise GalgenInputError(f"{path}: PSF ({where}) contains NaN or inf")
    total = psf.sum()
    if not total > 0:
        raise GalgenInputError(f"{path}: PSF ({where}) has non-positive total {total:.4g}")
    if abs(total - 1) > tolerance and not normalize:
        raise GalgenInputError(f"{path}: PSF ({where}) sums to {total:.6g}, not 1 (within {tolerance}); "
                               "pass --normalize-psf to normalise it")
    p = psf.shape[0]
    yy, xx = np.indices(psf.shape)
    cy, cx = (psf * yy).sum() / total, (psf * xx).sum() / total
    if abs(cy - p // 2) > 1 or abs(cx - p // 2) > 1:
        raise GalgenInputError(f"{path}: PSF ({where}) is not centred: centroid ({cy:.2f}, {cx:.2f}), "
                               f"expected ({p // 2}, {p // 2}) within 1 pixel")
    return (psf / total).astype(np.float32)


def read_fits_cutout(path, *, image_hdu=None, psf_hdu="PSF", variance_hdu="VARIANCE", weight_hdu="IVAR",
                     mask_hdu="MASK", shared_psf=None, stamp=None, nonfinite="mask", normalize_psf=False,
                     psf_tolerance=0.01, header_keys=()):
    """Read and validate one FITS cutout.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file.
    image_hdu, psf_hdu, variance_hdu, weight_hdu, mask_hdu : str or int
        HDU names or indices (see :func:`ingest_fits`).
    shared_psf : numpy.ndarray, optional
        Validated PSF used when the file has none.
    stamp : int, optional
        Centre-crop size.
    nonfinite : {'mask', 'raise'}
        Policy for NaN/inf pixels.
    normalize_psf : bool
        Normalise a PSF that does not sum to 1.
    psf_tolerance : float
        Allowed ``|sum(psf) - 1|``.
    header_keys : sequence of str
        Image header keywords to return.

    Returns
    -------
    dict
        ``observed``, ``variance`` (float32), ``mask`` (uint8), ``psf`` (float32), ``pixel_scale``
        (float or None), ``bunit``, ``hdu`` (image HDU name), ``header`` (dict of ``header_keys``).
    """
    path = Path(path)
    if nonfinite not in ("mask", "raise"):
        raise GalgenInputError(f"--nonfinite: expected 'mask' or 'raise', got {nonfinite!r}")
    with _open_fits(path) as hdul:
        img_h = _find_hdu(hdul, image_hdu, path, "image")
        image = np.asarray(img_h.data, dtype=np.float64)
        if image.shape[0] != image.shape[1] and stamp is None:
            raise GalgenInputError(f"{path}: image is {image.shape[0]}x{image.shape[1]}, not square "
                                   "(pass --stamp to crop)")
        var_h = _find_hdu(hdul, variance_hdu, path, "variance", required=False)
        if var_h is not None:
            variance = np.asarray(var_h.data, dtype=np.float64)
        else:
            w_h = _find_hdu(hdul, weight_hdu, path, "weight", required=False)
            if w_h is None:
                names = [h.name for h in hdul]
                raise GalgenInputError(f"{path}: neither a variance HDU {variance_hdu!r} nor a weight HDU "
                                       f"{weight_hdu!r} (HDUs: {names})")
            weight = np.asarray(w_h.data, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                variance = np.where(weight > 0, 1.0 / weight, np.inf)
        if variance.shape != image.shape:
            raise GalgenInputError(f"{path}: variance shape {variance.shape} differs from image {image.shape}")
        m_h = _find_hdu(hdul, mask_hdu, path, "mask", required=False)
        mask = np.zeros(image.shape, bool) if m_h is None else np.asarray(m_h.data) != 0
        if mask.shape != image.shape:
            raise GalgenInputError(f"{path}: mask shape {mask.shape} differs from image {image.shape}")
        if shared_psf is None:
            p_h = _find_hdu(hdul, psf_hdu, path, "PSF", required=False)
            if p_h is None:
                names = [h.name for h in hdul]
                raise GalgenInputError(f"{path}: no PSF HDU {psf_hdu!r} (HDUs: {names}) and no shared --psf file")
            psf = _check_psf(p_h.data, path, f"HDU {psf_hdu!r}", psf_tolerance, normalize_psf)
        else:
            psf = shared_psf
        header = img_h.header
        scale = _pixel_scale(header, path)
        info = {k: header.get(k) for k in header_keys}
        bunit = header.get("BUNIT")
        hdu_name = img_h.name or "PRIMARY"
    image, variance, mask = (_crop(a, stamp, path, what) for a, what in
                             ((image, "image"), (variance, "variance"), (mask, "mask")))
    bad = ~np.isfinite(image) | ~np.isfinite(variance) | ~(variance > 0)
    bad &= ~mask
    if bad.any():
        if nonfinite == "raise":
            raise GalgenInputError(f"{path}: {int(bad.sum())} pixel(s) with NaN/inf image or non-positive/"
                                   "non-finite variance (use --nonfinite mask to mask them)")
        warnings.warn(f"{path}: masked {int(bad.sum())} pixel(s) with NaN/inf image or non-positive/"
                      "non-finite variance", stacklevel=3)
    mask = mask | bad | ~np.isfinite(image) | ~np.isfinite(variance) | ~(variance > 0)
    if mask.all():
        raise GalgenInputError(f"{path}: every pixel is masked (no usable data)")
    image = np.where(mask, 0.0, image)
    variance = np.where(mask, 0.0, variance)
    return {"observed": image.astype(np.float32), "variance": variance.astype(np.float32),
            "mask": mask.astype(np.uint8), "psf": psf, "pixel_scale": scale, "bunit": bunit,
            "hdu": hdu_name, "header": info}


def ingest_fits(paths, out, *, pixel_scale=None, survey="unknown", psf=None, image_hdu=None, psf_hdu="PSF",
                variance_hdu="VARIANCE", weight_hdu="IVAR", mask_hdu="MASK", stamp=None, nonfinite="mask",
                normalize_psf=False, psf_tolerance=0.01, header_keys=(), overwrite=False, progress=None):
    """Convert FITS cutouts (one galaxy per file) into a galgen cutout file.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        FITS files, in catalog order.
    out : str or os.PathLike
        Output HDF5 file.
    pixel_scale : float, optional
        Arcsec/pixel; default from the WCS or ``PIXSCALE`` of each image header.
    survey : str, optional
        Survey name stored in the file.
    psf : str or os.PathLike, optional
        FITS file whose first 2-d image is a PSF shared by all galaxies.
    image_hdu : str or int, optional
        Image HDU; default the first HDU with 2-d data.
    psf_hdu, variance_hdu, weight_hdu, mask_hdu : str or int, optional
        HDU names (``PSF``, ``VARIANCE``, ``IVAR``, ``MASK`` by default).
    stamp : int, optional
        Centre-crop every cutout to ``stamp x stamp``.
    nonfinite : {'mask', 'raise'}, optional
        NaN/inf pixels: masked with a warning (default) or refused.
    normalize_psf : bool, optional
        Normalise PSFs that do not sum to 1 instead of refusing them.
    psf_tolerance : float, optional
        Allowed ``|sum(psf) - 1|``.
    header_keys : sequence of str, optional
        Image header keywords copied to catalog columns (missing values become NaN for
        numbers and '' for text).
    overwrite : bool, optional
        Replace an existing ``out`` made with other arguments.
    progress : bool, optional
        Progress bar (default: when stderr is a terminal).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    GalgenInputError
        A missing or unreadable file, a missing HDU, wrong shapes, a bad PSF, no pixel
        scale, inconsistent pixel scales, an all-masked cutout; the message names the file.

    Examples
    --------
    >>> ingest_fits(sorted(glob.glob("cutouts/*.fits")), "obs.h5", survey="sdss")  # doctest: +SKIP
    """
    from astropy.table import Table
    from tqdm.auto import tqdm

    out = Path(out)
    paths = [Path(p) for p in paths]
    if not paths:
        raise GalgenInputError("ingest: no input files given")
    if stamp is not None and (int(stamp) < 1):
        raise GalgenInputError(f"--stamp: must be >= 1, got {stamp!r}")
    fingerprint = json.dumps({
        "stage": "ingest", "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                                     if p.exists() else [str(p)] for p in paths],
        "psf": None if psf is None else str(Path(psf).resolve()), "pixel_scale": pixel_scale, "survey": survey,
        "hdus": [image_hdu, psf_hdu, variance_hdu, weight_hdu, mask_hdu], "stamp": stamp, "nonfinite": nonfinite,
        "normalize_psf": normalize_psf, "psf_tolerance": psf_tolerance, "header_keys": list(header_keys),
    }, sort_keys=True, default=str)
    if output_is_current(out, fingerprint, overwrite):
        return out

    shared = None
    if psf is not None:
        with _open_fits(psf) as hdul:
            shared = _check_psf(_find_hdu(hdul, None, Path(psf), "PSF").data, Path(psf), "shared PSF",
                                psf_tolerance, normalize_psf)
    if progress is None:
        progress = sys.stderr.isatty()
    cutouts = []
    for p in tqdm(paths, disable=not progress, desc="ingest", unit="file"):
        cutouts.append(read_fits_cutout(p, image_hdu=image_hdu, psf_hdu=psf_hdu, variance_hdu=variance_hdu,
                                        weight_hdu=weight_hdu, mask_hdu=mask_hdu, shared_psf=shared, stamp=stamp,
                                        nonfinite=nonfinite, normalize_psf=normalize_psf,
                                        psf_tolerance=psf_tolerance, header_keys=header_keys))
    first = cutouts[0]
    for p, c in zip(paths, cutouts):
        if c["observed"].shape != first["observed"].shape:
            raise GalgenInputError(f"{p}: cutout is {c['observed'].shape}, but {paths[0]} is "
                                   f"{first['observed'].shape} (pass --stamp to crop all to one size)")
        if c["psf"].shape != first["psf"].shape:
            raise GalgenInputError(f"{p}: PSF is {c['psf'].shape}, but {paths[0]}'s is {first['psf'].shape}")
    if pixel_scale is None:
        scales = [c["pixel_scale"] for c in cutouts]
        for p, s in zip(paths, scales):
            if s is None:
                raise GalgenInputError(f"{p}: no pixel scale (no celestial WCS, no PIXSCALE keyword); "
                                       "pass --pixel-scale")
            if abs(s - scales[0]) > 1e-3 * scales[0]:
                raise GalgenInputError(f"{p}: pixel scale {s:.6g} arcsec differs from {paths[0]}'s {scales[0]:.6g}")
        pixel_scale = scales[0]
    if not pixel_scale > 0:
        raise GalgenInputError(f"--pixel-scale: must be > 0, got {pixel_scale!r}")
    units = {c["bunit"] for c in cutouts}
    flux_unit = units.pop() if len(units) == 1 and None not in units else "adu"

    n, size = len(cutouts), first["observed"].shape[0]
    cat = Table()
    cat["index"] = np.arange(n)
    cat["source_file"] = [str(p) for p in paths]
    cat["hdu"] = [c["hdu"] for c in cutouts]
    for k in header_keys:
        values = [c["header"].get(k) for c in cutouts]
        if all(isinstance(v, (int, float, np.number)) or v is None for v in values):
            cat[k] = np.array([np.nan if v is None else float(v) for v in values])
        else:
            cat[k] = ["" if v is None else str(v) for v in values]
    cat["n_masked"] = [int(c["mask"].sum()) for c in cutouts]
    shapes = {"observed": (size, size), "psf": first["psf"].shape, "variance": (size, size), "mask": (size, size)}
    attrs = {"survey": str(survey), "pixel_scale": float(pixel_scale), "oversampling": 1, "stamp_size": size,
             "flux_unit": flux_unit, "seed": -1, "source": "ingest", "shard": "0/1"}
    with CutoutWriter(out, n=n, shapes=shapes, attrs=attrs, fingerprint=fingerprint) as w:
        w.write({k: np.stack([c[k] for c in cutouts]) for k in shapes})
        w.finish(cat)
    return out
