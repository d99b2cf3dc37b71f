"""Galaxy populations: literature-based bulge+disk catalogs and drawing from them.

:func:`generate_population` makes a catalog of intrinsic galaxy properties
(magnitude, bulge-to-total ratio, sizes, Sersic index, ellipticities, star-forming
knots) from the distributions of :class:`PopulationModel`, each named with its source.
``catalogs/make_populations.py`` uses it to write the bundled ECSV catalogs;
:func:`load_catalog` reads and validates one; :func:`select_rows` picks the rows a
simulation of ``n`` galaxies uses.

Every component is a truncated Sersic profile (GalSim ``Sersic(trunc=...,
flux_untruncated=False)``), so that a galaxy has a finite extent and "fits the stamp"
has a precise meaning; the half-light radii in the catalog are those of the truncated
profiles, and ``hlr`` is the half-light radius of the circular composite (shears are
area-preserving, so it is also the geometric-mean radius of the sheared galaxy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import GalgenInputError
from .morphology import MORPHOLOGY_COLUMNS, MORPHOLOGY_REFERENCES, MorphologyModel, draw_morphology

__all__ = [
    "PopulationModel",
    "CATALOG_COLUMNS",
    "generate_population",
    "composite_hlr",
    "load_catalog",
    "select_rows",
]

#: Required catalog columns: unit and meaning.
CATALOG_COLUMNS = {
    "id": ("", "row identifier"),
    "mag": ("mag", "apparent AB magnitude in the catalog band"),
    "bt": ("", "bulge-to-total flux ratio"),
    "hlr": ("arcsec", "half-light radius of the (circular) composite galaxy"),
    "hlr_disk": ("arcsec", "half-light radius of the truncated disk"),
    "hlr_bulge": ("arcsec", "half-light radius of the truncated bulge"),
    "n_disk": ("", "Sersic index of the disk"),
    "n_bulge": ("", "Sersic index of the bulge"),
    "g_disk": ("", "intrinsic ellipticity |g| = (1-q)/(1+q) of the disk"),
    "g_bulge": ("", "intrinsic ellipticity |g| = (1-q)/(1+q) of the bulge"),
    "beta": ("deg", "position angle of the major axes, from +x towards +y"),
    "knot_frac": ("", "fraction of the disk flux in star-forming knots"),
    "n_knots": ("", "number of knots (galsim.RandomKnots points)"),
}

REFERENCES = (
    "Number counts: dN/dm ~ 10**(alpha m), alpha ~ 0.47 in r (Yasuda et al. 2001, AJ 122, 1104).",
    "Sizes: log-normal R50 at fixed magnitude with sigma_lnR ~ 0.45 (Shen et al. 2003, MNRAS 343, 978); "
    "apparent size-magnitude slope -0.13 dex/mag, median 1.8 arcsec at r = 17 (approximate SDSS main sample); "
    "bulge-dominated galaxies smaller at fixed magnitude (Shen et al. 2003).",
    "Bulge-to-total: bimodal B/T of SDSS bulge+disk decompositions (Simard et al. 2011, ApJS 196, 11; "
    "Meert et al. 2015, MNRAS 446, 3943), bulge-dominated fraction rising with brightness.",
    "Bulge Sersic index around 4 (de Vaucouleurs), disk n = 1; Re,bulge/Re,disk ~ 0.45 "
    "(Simard et al. 2011; Meert et al. 2015).",
    "Intrinsic ellipticities: disk and bulge distributions of Miller et al. 2013, MNRAS 429, 2858 (CFHTLenS).",
    "Star-forming knots: galsim.RandomKnots (Zhang et al. 2018 / GalSim) in disk-dominated galaxies.",
    "Truncation: disks at 3 hlr (~5 scale lengths, cf. SDSS 'exp' models truncated at 4 scale lengths, "
    "Stoughton et al. 2002), bulges at 6 hlr.",
)


@dataclass(frozen=True)
class PopulationModel:
    """Parameters of the population distributions (see ``REFERENCES`` for sources).

    Parameters
    ----------
    mag_range : tuple of float
        Apparent magnitude range.
    count_slope : float
        ``alpha`` of ``dN/dm ~ 10**(alpha m)``.
    size_at_17 : float
        Median composite half-light radius (arcsec) of disk galaxies at magnitude 17.
    size_slope : float
        d log10(R50) / d mag.
    size_bt_slope : float
        d log10(R50) / d(B/T) at fixed magnitude.
    size_scatter : float
        Standard deviation of ln(R50).
    size_range : tuple of float
        Clip range of R50 in arcsec.
    bulge_size_ratio : float
        Median hlr_bulge / hlr_disk; ``bulge_size_ratio_scatter`` is its dex scatter.
    n_bulge_mean, n_bulge_sigma, n_bulge_range : float, float, tuple
        Normal distribution of the bulge Sersic index, clipped.
    knot_probability : float
        Probability that a galaxy with B/T < 0.5 has star-forming knots.
    knot_frac_range, n_knots_range : tuple
        Uniform ranges of the knot flux fraction and number of knots.
    trunc_disk, trunc_bulge : float
        Truncation radius of each component in units of its half-light radius.
    """

    mag_range: tuple = (14.0, 17.77)
    count_slope: float = 0.47
    size_at_17: float = 1.8
    size_slope: float = -0.13
    size_bt_slope: float = -0.15
    size_scatter: float = 0.45
    size_range: tuple = (0.1, 15.0)
    bulge_size_ratio: float = 0.45
    bulge_size_ratio_scatter: float = 0.25
    n_bulge_mean: float = 4.0
    n_bulge_sigma: float = 0.8
    n_bulge_range: tuple = (1.5, 6.0)
    knot_probability: float = 0.5
    knot_frac_range: tuple = (0.05, 0.3)
    n_knots_range: tuple = (10, 60)
    trunc_disk: float = 3.0
    trunc_bulge: float = 6.0


# -- distributions ---------------------------------------------------------------------
def _draw_magnitudes(rng, n, m1, m2, alpha):
    a = alpha * np.log(10.0)
    u = rng.uniform(size=n)
    return np.log(u * (np.exp(a * m2) - np.exp(a * m1)) + np.exp(a * m1)) / a


def _inverse_cdf_sampler(pdf, lo, hi, rng, n, grid=4096):
    x = np.linspace(lo, hi, grid)
    p = np.clip(pdf(x), 0, None)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(x))])
    cdf /= cdf[-1]
    return np.interp(rng.uniform(size=n), cdf, x)


def _miller_disk_pdf(e, emax=0.8042, a=0.2539, e0=0.0256):
    """Disk ellipticity distribution of Miller et al. 2013, eq. (B2)."""
    return e * (1 - np.exp((e - emax) / a)) / ((1 + e) * np.sqrt(e**2 + e0**2))


def _miller_bulge_pdf(e, b=2.368, c=6.691):
    """Bulge ellipticity distribution of Miller et al. 2013, eq. (B3)."""
    return e * np.exp(-b * e - c * e**2)


def _draw_bt(rng, mag):
    """Bimodal B/T: disk-dominated, intermediate and bulge-dominated classes."""
    n = len(mag)
    p_bulge = np.clip(0.30 - 0.05 * (mag - 17.0), 0.10, 0.55)
    p_inter = np.full(n, 0.30)
    u = rng.uniform(size=n)
    bt = np.where(
        u < p_bulge, rng.beta(6.0, 1.8, size=n),
        np.where(u < p_bulge + p_inter, rng.beta(2.0, 2.5, size=n), rng.beta(1.1, 8.0, size=n)),
    )
    return np.clip(bt, 0.0, 0.98)


# -- truncated Sersic geometry ---------------------------------------------------------
def _sersic_b(n):
    from scipy.special import gammaincinv

    return gammaincinv(2.0 * n, 0.5)


def _bisect(f, lo, hi, iters=80):
    lo, hi = np.array(lo, float), np.array(hi, float)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        pos = f(mid) > 0
        hi = np.where(pos, mid, hi)
        lo = np.where(pos, lo, mid)
    return 0.5 * (lo + hi)


def _truncated_scale(n, c):
    """Ratio u = R/r0 of a truncated Sersic's half-light radius R to its untruncated one r0.

    The truncation radius is ``c * R``. Solves ``P(2n, b u^(1/n)) = P(2n, b (c u)^(1/n)) / 2``.
    """
    from scipy.special import gammainc

    n = np.asarray(n, float)
    b = _sersic_b(n)

    def f(u):
        return gammainc(2 * n, b * u ** (1 / n)) - 0.5 * gammainc(2 * n, b * (c * u) ** (1 / n))

    return _bisect(f, np.full(n.shape, 1e-6), np.ones(n.shape))


def _enclosed_fn(R, n, c):
    """Return r -> fraction of a truncated Sersic's flux within r (R: its half-light radius)."""
    from scipy.special import gammainc

    n = np.asarray(n, float)
    b = _sersic_b(n)
    r0 = R / _truncated_scale(n, c)
    t = c * R
    total = gammainc(2 * n, b * (t / r0) ** (1 / n))
    return lambda r: gammainc(2 * n, b * (np.minimum(r, t) / r0) ** (1 / n)) / total


def composite_hlr(bt, hlr_disk, hlr_bulge, n_bulge, n_disk=1.0, trunc_disk=3.0, trunc_bulge=6.0):
    """Half-light radius of a circular bulge + disk of truncated Sersic components.

    Parameters
    ----------
    bt : array_like
        Bulge-to-total flux ratio.
    hlr_disk, hlr_bulge : array_like
        Half-light radii (truncated profiles), any length unit.
    n_bulge, n_disk : array_like
        Sersic indices.
    trunc_disk, trunc_bulge : float
        Truncation radii in units of each component's half-light radius.

    Returns
    -------
    numpy.ndarray
        Radius enclosing half the total flux, in the unit of the inputs.

    Examples
    --------
    >>> float(composite_hlr(0.0, 2.0, 1.0, 4.0))  # a pure disk
    2.0
    """
    bt, hd, hb, nb, nd = np.broadcast_arrays(*(np.asarray(x, float) for x in
                                                (bt, hlr_disk, hlr_bulge, n_bulge, n_disk)))

    bulge = _enclosed_fn(hb, nb, trunc_bulge)
    disk = _enclosed_fn(hd, nd, trunc_disk)

    def f(r):
        return bt * bulge(r) + (1 - bt) * disk(r) - 0.5

    hi = np.maximum(trunc_disk * hd, trunc_bulge * hb)
    return _bisect(f, np.zeros_like(hi), hi)


def generate_population(n: int, seed: int, model: PopulationModel = PopulationModel(), band: str = "r",
                        morphology=None):
    """Draw a catalog of ``n`` galaxies from the population model.

    The morphology columns (spiral arms, bars, lopsidedness, dust lanes, irregulars,
    companions: :data:`galgen.simulate.morphology.MORPHOLOGY_COLUMNS`) are drawn from a
    random stream of their own, so the bulge + disk columns are the same with and
    without them.

    Parameters
    ----------
    n : int
        Number of rows.
    seed : int
        Seed of the random generator; the same seed gives the same table.
    model : PopulationModel, optional
        Distribution parameters.
    band : str, optional
        Name of the magnitude band, stored in the table metadata.
    morphology : MorphologyModel or False, optional
        Distributions of the morphology columns (default: :class:`MorphologyModel`);
        ``False`` leaves them out.

    Returns
    -------
    astropy.table.Table
        Columns :data:`CATALOG_COLUMNS` with units; ``meta`` holds the model, the seed
        and the literature references.
    """
    import astropy.units as u
    from astropy.table import Table

    rng = np.random.default_rng(seed)
    m = model
    mag = _draw_magnitudes(rng, n, *m.mag_range, m.count_slope)
    bt = _draw_bt(rng, mag)
    log_r = np.log10(m.size_at_17) + m.size_slope * (mag - 17.0) + m.size_bt_slope * bt
    r50 = np.clip(10**log_r * np.exp(m.size_scatter * rng.standard_normal(n)), *m.size_range)
    ratio = np.clip(m.bulge_size_ratio * 10 ** (m.bulge_size_ratio_scatter * rng.standard_normal(n)), 0.1, 1.5)
    n_bulge = np.clip(m.n_bulge_mean + m.n_bulge_sigma * rng.standard_normal(n), *m.n_bulge_range)
    # Quantised to 0.05: GalSim builds (and caches) a lookup table per Sersic index.
    n_bulge = np.round(n_bulge * 20.0) / 20.0
    g_disk = _inverse_cdf_sampler(_miller_disk_pdf, 0.0, 0.8042, rng, n)
    g_bulge = _inverse_cdf_sampler(_miller_bulge_pdf, 0.0, 0.8, rng, n)
    beta = rng.uniform(0.0, 180.0, size=n)
    has_knots = (bt < 0.5) & (rng.uniform(size=n) < m.knot_probability)
    knot_frac = np.where(has_knots, rng.uniform(*m.knot_frac_range, size=n), 0.0)
    n_knots = np.where(has_knots, rng.integers(m.n_knots_range[0], m.n_knots_range[1] + 1, size=n), 0)
    # Composite hlr is linear in a common scale of both components: solve for unit disk.
    h1 = composite_hlr(bt, 1.0, ratio, n_bulge, 1.0, m.trunc_disk, m.trunc_bulge)
    hlr_disk = r50 / h1
    hlr_bulge = ratio * hlr_disk

    t = Table()
    t["id"] = np.arange(n, dtype=np.int64)
    t["mag"] = np.round(mag, 4) * u.mag
    t["bt"] = np.round(bt, 4)
    t["hlr_disk"] = np.round(hlr_disk, 4) * u.arcsec
    t["hlr_bulge"] = np.round(hlr_bulge, 4) * u.arcsec
    t["n_disk"] = np.ones(n)
    t["n_bulge"] = np.round(n_bulge, 2)
    # recompute with rounded inputs so the table is self-consistent
    t["hlr"] = np.round(composite_hlr(t["bt"], t["hlr_disk"].value, t["hlr_bulge"].value, t["n_bulge"],
                                      1.0, m.trunc_disk, m.trunc_bulge), 4) * u.arcsec
    t["g_disk"] = np.round(g_disk, 4)
    t["g_bulge"] = np.round(g_bulge, 4)
    t["beta"] = np.round(beta, 2) * u.deg
    t["knot_frac"] = np.round(knot_frac, 4)
    t["n_knots"] = n_knots.astype(np.int32)
    for name, (_, desc) in CATALOG_COLUMNS.items():
        t[name].description = desc
    references = list(REFERENCES)
    if morphology is not False:
        morphology = morphology or MorphologyModel()
        cols = draw_morphology(np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D4F5250])),
                               t["bt"], t["hlr"].value, t["hlr_disk"].value, t["g_disk"], morphology)
        for name, (unit, desc) in MORPHOLOGY_COLUMNS.items():
            v = cols[name]
            t[name] = (np.round(v, 4) if v.dtype.kind == "f" else v) * (u.Unit(unit) if unit else 1)
            t[name].description = desc
        references += list(MORPHOLOGY_REFERENCES)
        t.meta["morphology"] = morphology.to_dict()
    t.meta.update({
        "generator": "galgen.simulate.population.generate_population",
        "seed": int(seed),
        "band": band,
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model).items()},
        "references": references,
    })
    return t


# -- reading and drawing --------------------------------------------------------------
def load_catalog(catalog):
    """Read and validate a population catalog.

    Parameters
    ----------
    catalog : str, os.PathLike or astropy.table.Table
        A table, a path to a table file astropy can read (ECSV, FITS, ...), or the name
        of a catalog bundled in :mod:`galgen.catalogs` (e.g. ``"sdss_population.ecsv"``).

    Returns
    -------
    astropy.table.Table

    Raises
    ------
    GalgenInputError
        If the file is missing or unreadable, or columns are missing or out of range.
    """
    from astropy.table import Table

    if isinstance(catalog, Table):
        t, origin = catalog, "catalog table"
    else:
        path = Path(catalog)
        if not path.exists():
            bundled = resources.files("galgen.catalogs").joinpath(str(catalog))
            if bundled.is_file():
                path = Path(str(bundled))
            else:
                raise GalgenInputError(f"--catalog: no such file or bundled catalog {str(catalog)!r}")
        origin = str(path)
        try:
            t = Table.read(path)
        except Exception as exc:  # astropy raises many types for unreadable files
            raise GalgenInputError(f"{path}: cannot read as a table ({exc})") from None
    missing = [c for c in CATALOG_COLUMNS if c not in t.colnames]
    if missing:
        raise GalgenInputError(f"{origin}: missing column(s) {missing}")
    if len(t) == 0:
        raise GalgenInputError(f"{origin}: the catalog is empty")
    checks = {
        "bt": (0.0, 1.0), "g_disk": (0.0, 0.95), "g_bulge": (0.0, 0.95), "knot_frac": (0.0, 1.0),
        "n_bulge": (0.3, 6.2), "n_disk": (0.3, 6.2),
    }
    for col, (lo, hi) in checks.items():
        v = np.asarray(t[col], float)
        if not np.all(np.isfinite(v)) or v.min() < lo or v.max() > hi:
            raise GalgenInputError(f"{origin}: column '{col}' must lie in [{lo}, {hi}] and be finite")
    for col in ("hlr", "hlr_disk", "hlr_bulge"):
        v = np.asarray(t[col], float)
        if not np.all(np.isfinite(v)) or v.min() <= 0:
            raise GalgenInputError(f"{origin}: column '{col}' must be positive and finite")
    present = [c for c in MORPHOLOGY_COLUMNS if c in t.colnames]
    if present and len(present) < len(MORPHOLOGY_COLUMNS):
        missing = [c for c in MORPHOLOGY_COLUMNS if c not in t.colnames]
        raise GalgenInputError(f"{origin}: has morphology columns but lacks {missing} (give all or none)")
    if present:
        for col, (lo, hi) in {"arm_amp": (0.0, 0.95), "lop_a1": (0.0, 0.95), "bar_frac": (0.0, 0.9),
                              "irr_knot_frac": (0.0, 0.9), "dust_tau": (0.0, 10.0), "comp_flux_ratio": (0.0, 10.0),
                              "comp_g": (0.0, 0.95), "bar_q": (0.0, 1.0)}.items():
            v = np.asarray(t[col], float)
            if not np.all(np.isfinite(v)) or v.min() < lo or v.max() > hi:
                raise GalgenInputError(f"{origin}: column '{col}' must lie in [{lo}, {hi}] and be finite")
        if np.any((np.asarray(t["arm_m"]) > 0) & ~(np.asarray(t["arm_pitch"], float) > 0)):
            raise GalgenInputError(f"{origin}: column 'arm_pitch' must be > 0 where arm_m > 0")
        if np.any((np.asarray(t["bar_frac"], float) > 0) & ~(np.asarray(t["bar_q"], float) > 0)):
            raise GalgenInputError(f"{origin}: column 'bar_q' must be > 0 where bar_frac > 0")
        comp = np.asarray(t["comp_flux_ratio"], float) > 0
        if np.any(comp & ~((np.asarray(t["comp_hlr"], float) > 0) & (np.asarray(t["comp_n"], float) >= 0.3))):
            raise GalgenInputError(f"{origin}: columns 'comp_hlr' > 0 and 'comp_n' >= 0.3 where comp_flux_ratio > 0")
    return t


def select_rows(n_catalog: int, n: int, seed: int) -> np.ndarray:
    """Catalog rows used by a simulation of ``n`` galaxies.

    Rows are a seeded permutation of the catalog when ``n <= n_catalog`` and a seeded
    draw with replacement otherwise (each galaxy is still unique: the simulation
    rotates it and redraws its knots). The choice depends only on ``(n_catalog, n,
    seed)``, never on sharding.

    Parameters
    ----------
    n_catalog : int
        Catalog length.
    n : int
        Number of galaxies simulated.
    seed : int
        Simulation seed.

    Returns
    -------
    numpy.ndarray of int
        ``n`` row indices.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7]))
    if n <= n_catalog:
        return rng.permutation(n_catalog)[:n]
    return rng.integers(0, n_catalog, size=n)
