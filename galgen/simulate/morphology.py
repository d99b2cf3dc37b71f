"""Morphology beyond bulge + disk: spiral arms, bars, lopsided disks, dust lanes, clumpy
irregulars and companions.

:func:`draw_morphology` adds these components' parameters to a population catalog
(columns :data:`MORPHOLOGY_COLUMNS`, each zero where a galaxy lacks the component), from
the distributions of :class:`MorphologyModel`, each named with its published source
(:data:`MORPHOLOGY_REFERENCES`). :func:`galaxy_components` turns a truth row into what
:func:`galgen.simulate.render_galaxy` draws: analytic GalSim profiles (bulge, bar,
companion) and numerical components (the disk modulated by its arms, lopsidedness and
dust, :class:`ModulatedDisk`; star-forming knots, :class:`~galgen.simulate.render.Knots`).

Geometry. Every disk component is defined in the plane of the disk, in polar coordinates
``(r, theta)`` about the galaxy centre with ``theta`` from the disk's major axis, and is
projected on the sky by the disk's shear (its inclination) like the disk itself:

* spiral arms multiply the disk by ``1 + A w(r) cos(m (theta - phi0 - ln(r / r0) / tan p))``,
  ``m`` arms of pitch angle ``p`` (logarithmic spirals ``r = r0 exp(tan p (theta - phi0))``),
  switched on outside the bulge by ``w(r) = 1 - exp(-(r / r_in)^2)``;
* lopsidedness multiplies it by ``1 + A1 min(r / hlr_disk, 1) cos(theta - phi1)``;
* both modulations integrate to zero over ``theta`` at every radius, so they move light
  without changing the disk's flux;
* a bar is a flattened Sersic (``n = 0.5``, near a Ferrers bar's flat profile) in the
  disk plane at angle ``bar_angle`` from the disk's major axis, its flux taken from the
  disk's;
* a dust lane (edge-on disks) attenuates the projected disk by
  ``exp(-tau exp(-(v - v0)^2 / 2 w^2) exp(-|u| / hlr_disk))``, ``(u, v)`` sky coordinates
  along the projected major and minor axes; the attenuated disk is rescaled to the
  catalog flux (a catalog magnitude is the observed, attenuated one);
* a companion is a second Sersic galaxy at ``comp_sep`` arcsec from the centre, its
  position angle ``comp_angle`` measured from the primary's major axis (so the pair turns
  with the galaxy), with ``comp_flux_ratio`` times the primary's flux.

The switch: a catalog without these columns, or a simulation with
``morphology="bulge-disk"``, draws today's bulge + disk + knots galaxies bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["MorphologyModel", "MORPHOLOGY_COLUMNS", "MORPHOLOGY_REFERENCES", "MORPHOLOGIES",
           "draw_morphology", "has_morphology", "morphology_label", "ModulatedDisk", "galaxy_components"]

#: Values of ``simulate(morphology=...)`` / ``galgen simulate --morphology``.
MORPHOLOGIES = ("rich", "bulge-disk")

#: Morphology catalog columns: unit and meaning (0 where the galaxy lacks the component).
MORPHOLOGY_COLUMNS = {
    "arm_m": ("", "number of spiral arms (0: none)"),
    "arm_pitch": ("deg", "pitch angle of the logarithmic spiral arms"),
    "arm_amp": ("", "arm modulation amplitude A of the disk surface brightness, 1 + A cos(...)"),
    "arm_phase": ("deg", "phase phi0 of the arms in the disk plane, from the disk's major axis"),
    "bar_frac": ("", "fraction of the disk flux in the bar (0: no bar)"),
    "bar_hlr": ("arcsec", "half-light semi-major axis of the bar"),
    "bar_q": ("", "axis ratio of the bar in the disk plane"),
    "bar_angle": ("deg", "angle of the bar from the disk's major axis, in the disk plane"),
    "lop_a1": ("", "m=1 (lopsided) modulation amplitude of the disk (0: symmetric)"),
    "lop_phase": ("deg", "direction of the lopsided side in the disk plane"),
    "dust_tau": ("", "central optical depth of the dust lane (0: none)"),
    "dust_width": ("", "Gaussian width of the dust lane, in units of the projected minor-axis hlr"),
    "dust_offset": ("", "offset of the lane from the major axis, in units of the projected minor-axis hlr"),
    "knot_sigma": ("arcsec", "Gaussian sigma of a star-forming knot"),
    "irregular": ("", "1 for clumpy irregulars (bright, large knots and a lopsided disk)"),
    "irr_knot_frac": ("", "fraction of the disk flux in knots of an irregular (replaces knot_frac)"),
    "irr_n_knots": ("", "number of knots of an irregular (replaces n_knots)"),
    "comp_flux_ratio": ("", "companion flux / primary flux (0: no companion)"),
    "comp_sep": ("arcsec", "distance of the companion's centre from the primary's"),
    "comp_angle": ("deg", "position angle of the companion from the primary's major axis"),
    "comp_hlr": ("arcsec", "half-light radius of the companion"),
    "comp_n": ("", "Sersic index of the companion"),
    "comp_g": ("", "intrinsic ellipticity |g| of the companion"),
    "comp_beta": ("deg", "position angle of the companion's major axis, from the primary's"),
}

MORPHOLOGY_REFERENCES = (
    "Spiral fraction ~2/3 of disk galaxies with visible features, arm numbers m = 2 most common, then 3 "
    "and 4 (Galaxy Zoo 2: Willett et al. 2013, MNRAS 435, 2835; Hart et al. 2016, MNRAS 461, 3663).",
    "Pitch angles 5-40 deg, median ~17 deg, broader for later types (Davis et al. 2014, ApJ 789, 124; "
    "Hart et al. 2017, MNRAS 472, 2263).",
    "Arm-interarm contrast 1.5-3 in old stars (Elmegreen et al. 2011, ApJ 737, 32; Kendall et al. 2011): "
    "modulation amplitude A = (c - 1) / (c + 1) = 0.2-0.5.",
    "Bar fraction 29% of disk galaxies (Galaxy Zoo 2: Masters et al. 2011, MNRAS 411, 2026); bar-to-total "
    "~0.1, bar length ~1-1.5 disk scale lengths, ellipticity 0.5-0.8, flat (Ferrers-like) profiles "
    "(Gadotti 2011, MNRAS 415, 3308).",
    "Lopsidedness: mean m=1 amplitude A1 ~ 0.1, ~30% of disks above 0.2, stronger in late types "
    "(Zaritsky & Rix 1997, ApJ 477, 118; Bournaud et al. 2005, A&A 438, 507).",
    "Dust lanes: ubiquitous in edge-on disks (Dalcanton et al. 2004, ApJ 608, 189), central optical depth "
    "~1 (Xilouris et al. 1999, A&A 344, 868).",
    "Clumpy galaxies: ~10% of star-forming galaxies at z < 0.5 (Guo et al. 2015, ApJ 800, 39; Shibuya et al. "
    "2016, ApJ 821, 72); clump light and lopsidedness set so that irregulars have the concentration and "
    "asymmetry of nearby irregulars (Conselice 2003, ApJS 147, 1; docs/population.md).",
    "Companions and mergers: 1-3% of SDSS galaxies are visibly merging (Galaxy Zoo: Darg et al. 2010, MNRAS "
    "401, 1043), close-pair fraction of a few per cent (Patton & Atfield 2008, ApJ 685, 235).",
)


@dataclass(frozen=True)
class MorphologyModel:
    """Parameters of the morphology distributions (sources: :data:`MORPHOLOGY_REFERENCES`).

    Disk galaxies are those with B/T < ``disk_bt``; spirals, bars, lopsidedness, dust
    lanes and irregulars are drawn among them; companions among all galaxies.

    Parameters
    ----------
    disk_bt : float
        B/T below which a galaxy is a disk galaxy.
    spiral_fraction : float
        Probability that a (non-irregular) disk galaxy has spiral arms.
    arm_m_probs : tuple of float
        Probabilities of 2, 3 and 4 arms.
    pitch_mean, pitch_sigma, pitch_range : float, float, tuple
        Normal distribution of the pitch angle (deg), clipped.
    arm_amp_range : tuple of float
        Uniform range of the arm amplitude ``A``.
    bar_fraction : float
        Probability that a (non-irregular) disk galaxy has a bar.
    bar_frac_range, bar_length_range, bar_q_range : tuple of float
        Uniform ranges of the bar's share of the disk flux, its half-light semi-major
        axis in units of ``hlr_disk``, and its axis ratio.
    lopsided_mean, lopsided_mean_early, lopsided_max : float
        Exponential distribution of the m=1 amplitude of disks: its mean for late-type
        disks (B/T < ``early_bt``), for early-type disks, and its clip.
    early_bt : float
        B/T from which a disk galaxy counts as early-type (S0-Sb) for lopsidedness.
    dust_g_min : float
        Disk ellipticity above which (near edge-on) a disk has a dust lane.
    dust_tau_range, dust_width_range, dust_offset_max : tuple, tuple, float
        Uniform ranges of the lane's optical depth, width and offset.
    irregular_fraction : float
        Probability that a disk galaxy is a clumpy irregular.
    irregular_knot_frac_range, irregular_n_knots_range, irregular_knot_sigma_range : tuple
        Knots of irregulars: flux fraction, number and Gaussian sigma (arcsec).
    irregular_a1_range : tuple of float
        Lopsidedness of irregulars.
    companion_fraction : float
        Probability that a galaxy has a companion in its stamp.
    comp_flux_ratio_range : tuple of float
        Log-uniform range of the companion's flux ratio.
    comp_sep_range : tuple of float
        Uniform range of the separation in units of the primary's ``hlr`` (clipped to
        ``comp_sep_max`` arcsec).
    comp_sep_max : float
        Largest separation, arcsec (the companion stays near a ~25 arcsec SDSS stamp).
    knot_sigma : float
        Knot sigma (arcsec) of galaxies that are not irregular (that of bulge+disk sets).
    """

    disk_bt: float = 0.5
    spiral_fraction: float = 0.65
    arm_m_probs: tuple = (0.6, 0.25, 0.15)
    pitch_mean: float = 17.0
    pitch_sigma: float = 7.0
    pitch_range: tuple = (5.0, 40.0)
    arm_amp_range: tuple = (0.2, 0.5)
    bar_fraction: float = 0.29
    bar_frac_range: tuple = (0.05, 0.2)
    bar_length_range: tuple = (0.6, 0.9)
    bar_q_range: tuple = (0.2, 0.45)
    lopsided_mean: float = 0.1
    lopsided_mean_early: float = 0.08
    lopsided_max: float = 0.4
    early_bt: float = 0.2
    dust_g_min: float = 0.6
    dust_tau_range: tuple = (0.5, 2.0)
    dust_width_range: tuple = (0.15, 0.4)
    dust_offset_max: float = 0.2
    irregular_fraction: float = 0.1
    irregular_knot_frac_range: tuple = (0.1, 0.25)
    irregular_n_knots_range: tuple = (6, 15)
    irregular_knot_sigma_range: tuple = (0.15, 0.3)
    irregular_a1_range: tuple = (0.05, 0.2)
    companion_fraction: float = 0.05
    comp_flux_ratio_range: tuple = (0.1, 1.0)
    comp_sep_range: tuple = (1.5, 4.0)
    comp_sep_max: float = 9.0
    knot_sigma: float = 0.1

    def to_dict(self) -> dict:
        """The parameters as a JSON-serialisable dict (tuples as lists).

        Returns
        -------
        dict
        """
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def draw_morphology(rng: np.random.Generator, bt, hlr, hlr_disk, g_disk, model: MorphologyModel = MorphologyModel()):
    """Draw the morphology columns of a population.

    Parameters
    ----------
    rng : numpy.random.Generator
        A generator of its own (so that adding these columns leaves the other columns'
        draws unchanged).
    bt, hlr, hlr_disk, g_disk : array_like
        ``(n,)`` B/T, composite half-light radius (arcsec), disk half-light radius
        (arcsec) and disk ellipticity of each galaxy.
    model : MorphologyModel, optional

    Returns
    -------
    dict of str to numpy.ndarray
        The columns of :data:`MORPHOLOGY_COLUMNS`.
    """
    m = model
    bt, hlr, hlr_disk, g_disk = (np.asarray(a, float) for a in (bt, hlr, hlr_disk, g_disk))
    n = len(bt)
    u = lambda lo_hi: rng.uniform(lo_hi[0], lo_hi[1], size=n)  # noqa: E731
    disk = bt < m.disk_bt
    irregular = disk & (rng.uniform(size=n) < m.irregular_fraction)
    regular_disk = disk & ~irregular
    spiral = regular_disk & (rng.uniform(size=n) < m.spiral_fraction)
    arm_m = np.where(spiral, rng.choice([2, 3, 4], size=n, p=np.asarray(m.arm_m_probs) / sum(m.arm_m_probs)), 0)
    pitch = np.clip(m.pitch_mean + m.pitch_sigma * rng.standard_normal(n), *m.pitch_range)
    arm_amp, arm_phase = u(m.arm_amp_range), rng.uniform(0, 360, size=n)
    bar = regular_disk & (rng.uniform(size=n) < m.bar_fraction)
    bar_frac, bar_len, bar_q, bar_angle = u(m.bar_frac_range), u(m.bar_length_range), u(m.bar_q_range), \
        rng.uniform(0, 180, size=n)
    a1 = np.minimum(rng.exponential(1.0, size=n) * np.where(bt < m.early_bt, m.lopsided_mean, m.lopsided_mean_early),
                    m.lopsided_max)
    a1 = np.where(irregular, u(m.irregular_a1_range), np.where(disk, a1, 0.0))
    lop_phase = rng.uniform(0, 360, size=n)
    dust = regular_disk & (g_disk > m.dust_g_min)
    dust_tau, dust_width = u(m.dust_tau_range), u(m.dust_width_range)
    dust_offset = rng.uniform(-m.dust_offset_max, m.dust_offset_max, size=n)
    kf_irr, sig_irr = u(m.irregular_knot_frac_range), u(m.irregular_knot_sigma_range)
    nk_irr = rng.integers(m.irregular_n_knots_range[0], m.irregular_n_knots_range[1] + 1, size=n)
    comp = rng.uniform(size=n) < m.companion_fraction
    lo, hi = np.log(m.comp_flux_ratio_range)
    ratio = np.exp(rng.uniform(lo, hi, size=n))
    sep = np.minimum(u(m.comp_sep_range) * np.maximum(hlr, 1.0), m.comp_sep_max)
    comp_angle, comp_beta = rng.uniform(0, 360, size=n), rng.uniform(0, 180, size=n)
    # Companion sizes follow the size-luminosity relation (R ~ L^0.3, Shen et al. 2003).
    comp_hlr = np.clip(hlr * ratio**0.3 * np.exp(0.3 * rng.standard_normal(n)), 0.3, 6.0)
    comp_n = np.round(np.clip(rng.choice([1.0, 4.0], size=n, p=[0.6, 0.4]) + 0.3 * rng.standard_normal(n),
                              0.7, 5.0) * 20) / 20
    comp_g = rng.uniform(0.0, 0.6, size=n)
    z = np.zeros(n)
    return {
        "arm_m": arm_m.astype(np.int32), "arm_pitch": np.where(spiral, pitch, z),
        "arm_amp": np.where(spiral, arm_amp, z), "arm_phase": np.where(spiral, arm_phase, z),
        "bar_frac": np.where(bar, bar_frac, z), "bar_hlr": np.where(bar, bar_len * hlr_disk, z),
        "bar_q": np.where(bar, bar_q, z), "bar_angle": np.where(bar, bar_angle, z),
        "lop_a1": a1, "lop_phase": np.where(a1 > 0, lop_phase, z),
        "dust_tau": np.where(dust, dust_tau, z), "dust_width": np.where(dust, dust_width, z),
        "dust_offset": np.where(dust, dust_offset, z),
        "knot_sigma": np.where(irregular, sig_irr, m.knot_sigma),
        "irregular": irregular.astype(np.int32),
        "comp_flux_ratio": np.where(comp, ratio, z), "comp_sep": np.where(comp, sep, z),
        "comp_angle": np.where(comp, comp_angle, z), "comp_hlr": np.where(comp, comp_hlr, z),
        "comp_n": np.where(comp, comp_n, z), "comp_g": np.where(comp, comp_g, z),
        "comp_beta": np.where(comp, comp_beta, z),
        "irr_knot_frac": np.where(irregular, kf_irr, z), "irr_n_knots": np.where(irregular, nk_irr, 0).astype(np.int32),
    }


def has_morphology(row) -> bool:
    """Whether a catalog or truth row carries the morphology columns.

    Parameters
    ----------
    row : dict or astropy.table.Table

    Returns
    -------
    bool
    """
    names = row.colnames if hasattr(row, "colnames") else row
    return all(c in names for c in MORPHOLOGY_COLUMNS)


def morphology_label(row) -> str:
    """A short label of a galaxy's morphology (for tables and plots).

    Parameters
    ----------
    row : dict
        Truth or catalog row with ``bt`` and the morphology columns.

    Returns
    -------
    str
        ``"irregular"``, ``"barred spiral"``, ``"spiral"``, ``"barred disk"``, ``"disk"``
        or ``"bulge"``, with ``" + companion"`` where there is one.
    """
    if not has_morphology(row):
        label = "disk" if float(row["bt"]) < 0.5 else "bulge"
    elif int(row["irregular"]):
        label = "irregular"
    else:
        bar = float(row["bar_frac"]) > 0
        if int(row["arm_m"]) > 0:
            label = "barred spiral" if bar else "spiral"
        elif float(row["bt"]) < 0.5:
            label = "barred disk" if bar else "disk"
        else:
            label = "bulge"
    if has_morphology(row) and float(row["comp_flux_ratio"]) > 0:
        label += " + companion"
    return label


class ModulatedDisk:
    """A disk whose light is moved by spiral arms and lopsidedness and dimmed by a dust lane.

    The unmodulated disk is the analytic GalSim profile (truncated Sersic, sheared);
    the modulations are evaluated at the points where it is sampled, in the disk plane
    (see the module docstring), and the result is rescaled to the disk's flux.

    Parameters
    ----------
    disk : galsim.GSObject
        The disk as it would be drawn without modulation (sheared, with its flux).
    shear_matrix : numpy.ndarray
        2x2 matrix of the disk's shear (disk plane -> sky).
    hlr_disk : float
        Disk half-light radius (arcsec), the unit of the modulations' radii.
    params : dict
        ``arm_m``, ``arm_pitch``, ``arm_amp``, ``arm_phase``, ``lop_a1``, ``lop_phase``,
        ``dust_tau``, ``dust_width``, ``dust_offset`` (the truth row).
    r_in : float
        Radius (arcsec) inside which the arms fade (the bulge's).
    """

    def __init__(self, disk, shear_matrix, hlr_disk: float, params: dict, r_in: float):
        self.disk = disk
        self.flux = float(disk.flux)
        self.a = np.asarray(shear_matrix, float)
        self.ainv = np.linalg.inv(self.a)
        self.hlr = float(hlr_disk)
        self.p = {k: float(params[k]) for k in ("arm_m", "arm_pitch", "arm_amp", "arm_phase", "lop_a1",
                                                 "lop_phase", "dust_tau", "dust_width", "dust_offset")}
        self.beta = float(params.get("beta", 0.0))  # angles are measured from the major axis
        self.r_in = max(float(r_in), 0.2 * self.hlr)

    def modulation(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The factor multiplying the disk's surface brightness at sky positions (arcsec).

        Parameters
        ----------
        x, y : numpy.ndarray
            Sky offsets from the galaxy centre, arcsec.

        Returns
        -------
        numpy.ndarray
            Non-negative factors, same shape.
        """
        p = self.p
        xd = self.ainv[0, 0] * x + self.ainv[0, 1] * y  # disk-plane coordinates
        yd = self.ainv[1, 0] * x + self.ainv[1, 1] * y
        r = np.hypot(xd, yd)
        theta = np.arctan2(yd, xd)
        out = np.ones_like(r)
        if p["arm_m"] > 0 and p["arm_amp"] > 0:
            m = p["arm_m"]
            lnr = np.log(np.maximum(r, 1e-6) / self.hlr)
            wind = lnr / math.tan(math.radians(p["arm_pitch"]))
            phase = m * (theta - math.radians(self.beta + p["arm_phase"]) - wind)
            out *= 1.0 + p["arm_amp"] * (1.0 - np.exp(-(r / self.r_in) ** 2)) * np.cos(phase)
        if p["lop_a1"] > 0:
            side = np.cos(theta - math.radians(self.beta + p["lop_phase"]))
            out *= 1.0 + p["lop_a1"] * np.minimum(r / self.hlr, 1.0) * side
        if p["dust_tau"] > 0:
            # The projected major axis is the direction the shear stretches most.
            w, v = np.linalg.eigh(self.a @ self.a.T)
            major, minor_len = v[:, 1], self.hlr * math.sqrt(w[0])
            uu = major[0] * x + major[1] * y
            vv = -major[1] * x + major[0] * y
            lane = np.exp(-0.5 * ((vv - p["dust_offset"] * minor_len) / (p["dust_width"] * minor_len)) ** 2)
            out *= np.exp(-p["dust_tau"] * lane * np.exp(-np.abs(uu) / self.hlr))
        return out

    def _samples(self, n: int, scale: float, centre: float):
        """Modulated surface brightness x pixel area on an ``n x n`` grid whose galaxy centre is at index ``centre``."""
        import galsim

        img = galsim.ImageD(n, n, scale=scale)
        off = centre - n // 2
        self.disk.drawImage(image=img, method="no_pixel", use_true_center=False, offset=(off, off))
        c = (np.arange(n) - centre) * scale
        mod = self.modulation(c[None, :], c[:, None])
        plain = img.array
        out = plain * mod
        total = out.sum()
        return out * (plain.sum() / total if total > 0 else 1.0)

    def draw(self, size: int, scale: float, offset: float = 0.0, subsample: int = 6) -> np.ndarray:
        """Pixel-integrated image (midpoint rule over ``subsample^2`` points per pixel).

        Parameters
        ----------
        size : int
            Grid size in pixels.
        scale : float
            Pixel scale in arcsec.
        offset : float, optional
            Shift of the galaxy centre from pixel ``(size//2, size//2)`` in pixels.
        subsample : int, optional

        Returns
        -------
        numpy.ndarray
            ``(size, size)`` float64 image.
        """
        q = int(subsample)
        fine = self._samples(size * q, scale / q, (size // 2 + offset + 0.5) * q - 0.5)
        return fine.reshape(size, q, size, q).sum(axis=(1, 3))

    def galsim(self, scale: float, size: int):
        """The modulated disk as a GalSim profile (an interpolated image), for convolution.

        Parameters
        ----------
        scale : float
            Sampling step in arcsec (a fraction of the detector pixel).
        size : int
            Grid size in samples (covering the disk).

        Returns
        -------
        galsim.InterpolatedImage
        """
        import galsim

        n = int(size) + int(size) % 2
        arr = self._samples(n, scale, n // 2)
        img = galsim.ImageD(arr / scale**2, scale=scale)
        # No maxk search (a third of a rich galaxy's rendering): the PSF it is convolved
        # with bounds the convolution's maxk, so the output is the same.
        return galsim.InterpolatedImage(img, use_true_center=False, flux=self.flux, normalization="flux",
                                        calculate_maxk=False)


def galaxy_components(truth: dict, trunc_disk: float = 3.0, trunc_bulge: float = 6.0, knot_seed=None,
                      morphology: bool = True):
    """The components of one galaxy: analytic GalSim profiles and numerical ones.

    Parameters
    ----------
    truth : dict
        Truth row (see :func:`galgen.simulate.render.galaxy_profile`), with the
        :data:`MORPHOLOGY_COLUMNS` where ``morphology`` is used.
    trunc_disk, trunc_bulge : float, optional
        Truncation radius of the disk and bulge in units of their half-light radii.
    knot_seed : int, optional
        Seed of the knot positions.
    morphology : bool, optional
        Draw the morphology columns' components (when the row has them); ``False``
        gives the bulge + disk + knots galaxy.

    Returns
    -------
    smooth : galsim.GSObject or None
        Sum of the analytic parts (bulge, unmodulated disk, bar, companion).
    numeric : list
        :class:`ModulatedDisk` and :class:`~galgen.simulate.render.Knots` objects
        (each with ``draw(size, scale, offset)`` and a GalSim form).
    """
    import galsim

    from .render import KNOT_SIGMA, Knots

    rich = morphology and has_morphology(truth)
    flux = float(truth["flux"])
    bt = float(truth["bt"])
    parts, numeric = [], []
    if bt > 0:
        bulge = galsim.Sersic(float(truth["n_bulge"]), half_light_radius=float(truth["hlr_bulge"]),
                              trunc=trunc_bulge * float(truth["hlr_bulge"]), flux_untruncated=False,
                              flux=bt * flux)
        parts.append(bulge.shear(g1=float(truth["g1_bulge"]), g2=float(truth["g2_bulge"])))
    disk_flux = (1.0 - bt) * flux
    irregular = rich and int(truth["irregular"]) > 0
    n_knots = int(truth["irr_n_knots"]) if irregular else int(truth["n_knots"])
    kf = (float(truth["irr_knot_frac"]) if irregular else float(truth["knot_frac"])) if n_knots > 0 else 0.0
    bar_frac = float(truth["bar_frac"]) if rich else 0.0
    disk_shear = galsim.Shear(g1=float(truth["g1_disk"]), g2=float(truth["g2_disk"]))
    a = disk_shear.getMatrix()
    if bar_frac > 0 and bt < 1:
        q = float(truth["bar_q"])
        bar = galsim.Sersic(0.5, half_light_radius=float(truth["bar_hlr"]) * math.sqrt(q),
                            flux=bar_frac * disk_flux)
        bar = bar.shear(q=q, beta=(float(truth.get("beta", 0.0)) + float(truth["bar_angle"])) * galsim.degrees)
        parts.append(bar.transform(a[0, 0], a[0, 1], a[1, 0], a[1, 1]))
    if bt < 1 and kf + bar_frac < 1:
        disk = galsim.Sersic(float(truth["n_disk"]), half_light_radius=float(truth["hlr_disk"]),
                             trunc=trunc_disk * float(truth["hlr_disk"]), flux_untruncated=False,
                             flux=(1 - kf - bar_frac) * disk_flux).shear(disk_shear)
        modulated = rich and (float(truth["arm_m"]) > 0 or float(truth["lop_a1"]) > 0
                              or float(truth["dust_tau"]) > 0)
        if modulated:
            r_in = float(truth["hlr_bulge"]) if bt > 0 else 0.0
            numeric.append(ModulatedDisk(disk, a, float(truth["hlr_disk"]), truth, r_in))
        else:
            parts.append(disk)
    if kf > 0 and disk_flux > 0:
        rk = galsim.RandomKnots(n_knots, half_light_radius=float(truth["hlr_disk"]),
                                flux=1.0, rng=galsim.BaseDeviate(int(knot_seed or 0)))
        sigma = float(truth["knot_sigma"]) if rich else KNOT_SIGMA
        numeric.append(Knots(rk.points @ a.T, kf * disk_flux, sigma, a))
    if rich and float(truth["comp_flux_ratio"]) > 0:
        beta = float(truth.get("beta", 0.0))
        ang = math.radians(beta + float(truth["comp_angle"]))
        sep = float(truth["comp_sep"])
        comp = galsim.Sersic(float(truth["comp_n"]), half_light_radius=float(truth["comp_hlr"]),
                             trunc=4.0 * float(truth["comp_hlr"]), flux_untruncated=False,
                             flux=float(truth["comp_flux_ratio"]) * flux)
        comp = comp.shear(g=float(truth["comp_g"]), beta=(beta + float(truth["comp_beta"])) * galsim.degrees)
        parts.append(comp.shift(sep * math.cos(ang), sep * math.sin(ang)))
    smooth = galsim.Add(parts) if len(parts) > 1 else (parts[0] if parts else None)
    return smooth, numeric
