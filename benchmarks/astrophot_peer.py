"""AstroPhot peer for ``bench_fit.py``: Sersic fits of the same GalSim galaxies with AstroPhot.

What an AstroPhot (0.18) user writes: per galaxy a :class:`astrophot.TargetImage` (data, pixel scale,
variance ``sigma**2``, and a normalised GalSim Moffat :class:`astrophot.PSFImage`), a
``"sersic galaxy model"`` (free: center, q, PA, n, Re, Ie) with AstroPhot's automatic
``initialize()``, fitted in float64 either

* ``method="LM"``: :class:`astrophot.fit.LM`, one galaxy after another until ``budget`` seconds, or
* ``method="BatchLM"``: :class:`astrophot.fit.BatchLM`, all galaxies in one vectorised call (one
  Sersic model whose parameters carry a batch dimension, over a :class:`astrophot.TargetImageBatch`).

AstroPhot conventions used (read from its 0.18 source): with ``pixelscale`` the CD matrix is
``diag(scale, scale)``, so tangent-plane +x/+y are the array's column/row axes (as in GalSim);
``Re`` is the semi-major-axis half-light radius in arcsec (radius ``sqrt(x'^2 + (y'/q)^2)``);
the major axis lies at ``PA + pi/2`` counter-clockwise from +x (``PA`` counts from +y towards
-x, "East of North" for East = -x). AstroPhot integrates the profile over each pixel
(Simpson's rule plus quadrature on the brightest pixels) before the convolution, so the PSF image
is drawn *without* GalSim's pixel response (``method="no_pixel"``) by default.
"""

from __future__ import annotations

import time

import numpy as np


def _target(img, fwhm, sigma, scale, beta, name, psf_size=33, psf_method="no_pixel"):
    """One galaxy's AstroPhot target image with its Moffat PSF.

    Parameters
    ----------
    img : numpy.ndarray
        (S, S) image in flux per pixel.
    fwhm, sigma, scale, beta : float
        PSF FWHM (arcsec), noise standard deviation, pixel scale (arcsec), Moffat beta.
    name : str
        Unique image name (a :class:`astrophot.TargetImageBatch` needs distinct names).
    psf_size : int
        Odd side length of the PSF image in pixels.
    psf_method : str
        GalSim ``drawImage`` method for the PSF: ``"no_pixel"`` (AstroPhot integrates over pixels
        itself) or ``"auto"`` (GalSim's default, pixel response included).

    Returns
    -------
    astrophot.TargetImage
    """
    import astrophot as ap
    import galsim

    psf = galsim.Moffat(beta=beta, fwhm=fwhm).drawImage(nx=psf_size, ny=psf_size, scale=scale,
                                                        method=psf_method).array.astype(np.float64)
    return ap.TargetImage(name=name, data=np.asarray(img, np.float64), pixelscale=scale,
                          variance=np.full(img.shape, float(sigma) ** 2), psf=ap.PSFImage(data=psf / psf.sum()))


def _sersic(target):
    """An automatically initialised AstroPhot Sersic model of ``target``."""
    import astrophot as ap

    model = ap.Model(model_type="sersic galaxy model", target=target, name="sersic")
    model.initialize()
    return model


def _physical(model):
    """GalSim-convention (hlr [arcsec, circularised], n, g1, g2) from a (possibly batched) model.

    Parameters
    ----------
    model : astrophot.Model
        Fitted Sersic model; parameter values may carry a leading batch dimension.

    Returns
    -------
    tuple of numpy.ndarray
        hlr = Re sqrt(q) (GalSim's ``Sersic(half_light_radius=hlr).shear(g)`` preserves area),
        n, and the reduced shear g1, g2 with |g| = (1 - q)/(1 + q) along the major axis angle
        phi = PA + pi/2 (counter-clockwise from +x).
    """
    v = {k: np.atleast_1d(model[k].value.detach().cpu().numpy()) for k in ("q", "PA", "n", "Re")}
    g, phi = (1 - v["q"]) / (1 + v["q"]), v["PA"] + np.pi / 2
    return v["Re"] * np.sqrt(v["q"]), v["n"], g * np.cos(2 * phi), g * np.sin(2 * phi)


def bench_astrophot(t, data, sigma, scale, beta, budget=120.0, method="LM", psf_method="no_pixel") -> dict:
    """Time and score AstroPhot Sersic fits of ``bench_fit.make_galaxies`` observations.

    Parameters
    ----------
    t : dict of numpy.ndarray
        Truth: "n", "hlr" (arcsec), "g1", "g2", and the per-galaxy PSF "fwhm" (arcsec).
    data : numpy.ndarray
        (N, S, S) noisy images.
    sigma : float
        Gaussian noise standard deviation per pixel.
    scale : float
        Pixel scale (arcsec).
    beta : float
        Moffat PSF beta.
    budget : float
        Seconds for the one-by-one ``"LM"`` loop (``"BatchLM"`` fits all galaxies in one call).
    method : {"LM", "BatchLM"}
        AstroPhot fitter.
    psf_method : str
        GalSim ``drawImage`` method for the PSF images (see :func:`_target`).

    Returns
    -------
    dict
        ``galaxies_per_s``, ``galaxies_timed``, ``wall_s``, ``failures``, the medians
        ``hlr_rel_err_median``, ``n_abs_err_median``, ``g_abs_err_median``, ``chi2_dof_median``
        (chi2 / (S*S - 7)) and ``iterations_median``; or ``{"unavailable": reason}``.
    """
    try:
        import astrophot as ap
    except ImportError as e:
        return {"unavailable": f"astrophot not importable: {e}"}
    if method not in ("LM", "BatchLM"):
        return {"unavailable": f"unknown method {method!r}"}
    if method == "BatchLM" and not hasattr(ap.fit, "BatchLM"):
        return {"unavailable": f"astrophot {ap.__version__} has no fit.BatchLM"}
    ap.config.logger.setLevel("ERROR")
    data = np.asarray(data, np.float64)
    n_gal, S = data.shape[0], data.shape[1]
    dof = S * S - 7
    targets = lambda idx: [_target(data[i], t["fwhm"][i], sigma, scale, beta, f"gal{i}", psf_method=psf_method)
                           for i in idx]

    if method == "LM":
        def fit_one(i):
            model = _sersic(targets([i])[0])
            res = ap.fit.LM(model, verbose=0).fit()
            chi2 = float(np.sum((data[i] - model().data.detach().cpu().numpy()) ** 2)) / sigma**2 / dof
            return (*(float(a[0]) for a in _physical(model)), chi2, len(res.loss_history) - 1)

        fit_one(0)  # untimed warm-up
        rows, failures, t0 = [], 0, time.perf_counter()
        for i in range(n_gal):
            try:
                rows.append(fit_one(i))
            except Exception:  # noqa: BLE001 - a failed fit is counted, not fatal
                rows.append((np.nan,) * 6)
                failures += 1
            if time.perf_counter() - t0 > budget:
                break
        wall = time.perf_counter() - t0
        hlr, n, g1, g2, chi2, iters = np.array(rows).T
    else:
        def fit_batch(idx, **kw):
            tg = targets(idx)
            x0 = [_sersic(tgt).get_values() for tgt in tg]  # AstroPhot's initialisation, per image
            model = _sersic(tg[0])  # template; its parameters get a batch dimension
            model.set_values(ap.backend.stack(x0))
            batch = ap.TargetImageBatch(tg)
            res = ap.fit.BatchLM(model, batch, batch.window, verbose=0, **kw).fit(update_uncertainty=False)
            m = ap.backend.to_numpy(res.forward(res.current_state)).reshape(len(idx), S, S)
            chi2 = np.sum((data[idx] - m) ** 2, axis=(1, 2)) / sigma**2 / dof
            return (*_physical(model), chi2, np.full(len(idx), len(res.loss_history) - 1))

        fit_batch([0, 1], max_iter=3)  # untimed warm-up
        t0 = time.perf_counter()
        try:
            hlr, n, g1, g2, chi2, iters = fit_batch(list(range(n_gal)))
        except Exception as e:  # noqa: BLE001
            return {"method": method, "unavailable": f"BatchLM failed: {type(e).__name__}: {e}"}
        wall = time.perf_counter() - t0
        failures = int(np.sum(~np.isfinite(chi2)))

    k = len(hlr)
    med = lambda a: float(np.nanmedian(a))
    return {"method": method, "galaxies_per_s": k / wall, "galaxies_timed": k, "wall_s": wall,
            "failures": failures, "hlr_rel_err_median": med(np.abs(hlr / t["hlr"][:k] - 1)),
            "n_abs_err_median": med(np.abs(n - t["n"][:k])),
            "g_abs_err_median": med(np.hypot(g1 - t["g1"][:k], g2 - t["g2"][:k])),
            "chi2_dof_median": med(chi2), "iterations_median": med(iters), "psf_method": psf_method}
