"""Spiral arms, bars, lopsided disks, dust lanes, irregulars and companions: each component's
parameters measured back from the rendered images, flux conservation, and the switch to
the bulge + disk simulator."""

import math

import h5py
import numpy as np
import pytest

from galgen.errors import GalgenInputError
from galgen.simulate import (
    MORPHOLOGY_COLUMNS,
    MorphologyModel,
    draw_truth,
    galaxy_components,
    generate_population,
    load_catalog,
    load_survey,
    morphology_label,
    render_galaxy,
    simulate,
)
from galgen.simulate.morphology import ModulatedDisk
from galgen.simulate.population import CATALOG_COLUMNS, PopulationModel

SCALE = 0.1  # arcsec per pixel of the test images: the components are resolved


def _plain(**override):
    """A face-on pure disk with every morphology component off."""
    t = {"flux": 1e4, "bt": 0.0, "hlr_disk": 3.0, "hlr_bulge": 1.0, "n_disk": 1.0, "n_bulge": 4.0,
         "g1_disk": 0.0, "g2_disk": 0.0, "g1_bulge": 0.0, "g2_bulge": 0.0, "knot_frac": 0.0, "n_knots": 0,
         "beta": 0.0}
    t.update({c: 0.0 for c in MORPHOLOGY_COLUMNS})
    t.update(arm_m=0, n_knots=0, irregular=0, irr_n_knots=0, knot_sigma=0.1)
    t.update(override)
    return t


def _intrinsic(truth, size=160, scale=SCALE):
    smooth, numeric = galaxy_components(truth, knot_seed=7)
    from galgen.simulate.render import draw_integrated

    img = np.zeros((size, size))
    if smooth is not None:
        img += draw_integrated(smooth, size, scale)
    for part in numeric:
        img += part.draw(size, scale)
    return img


def _polar(size, scale=SCALE):
    c = (np.arange(size) - size // 2) * scale
    x, y = np.meshgrid(c, c)  # x along columns, y along rows (the GalSim convention)
    return np.hypot(x, y), np.arctan2(y, x), x, y


@pytest.mark.parametrize("m, pitch", [(2, 12.0), (2, 25.0), (3, 18.0)])
def test_spiral_fourier_mode_has_the_drawn_pitch_angle(m, pitch):
    """The m-th Fourier mode's phase winds as -m ln(r) / tan(p): the pitch angle is measured back."""
    amp, phase = 0.4, 30.0
    img = _intrinsic(_plain(arm_m=m, arm_pitch=pitch, arm_amp=amp, arm_phase=phase))
    r, th, _, _ = _polar(img.shape[0])
    radii = np.linspace(2.0, 6.0, 21)  # beyond the arms' inner ramp, inside the 9 arcsec truncation
    psi, ratio = [], []
    for lo, hi in zip(radii[:-1], radii[1:]):
        ring = (r >= lo) & (r < hi)
        c = (img[ring] * np.exp(-1j * m * th[ring])).sum()
        psi.append(np.angle(c))
        ratio.append(abs(c) / img[ring].sum())
    lnr = np.log(0.5 * (radii[:-1] + radii[1:]))
    slope = np.polyfit(lnr, np.unwrap(psi), 1)[0]
    measured = math.degrees(math.atan(-m / slope))
    assert measured == pytest.approx(pitch, abs=0.5)
    # |c_m| / c_0 = A / 2 where the inner ramp has switched the arms fully on
    assert np.median(ratio) == pytest.approx(amp / 2, rel=0.05)
    # the modulation moves light without changing the flux (no renormalisation needed)
    plain = _intrinsic(_plain())
    assert img.sum() == pytest.approx(plain.sum(), rel=1e-5)
    disk = ModulatedDisk(galaxy_components(_plain())[0], np.eye(2), 3.0,
                         _plain(arm_m=m, arm_pitch=pitch, arm_amp=amp), 0.0)
    mod = disk.modulation(*_polar(320, 0.05)[2:])
    p = disk.disk.drawImage(nx=320, ny=320, scale=0.05, method="no_pixel", use_true_center=False).array
    assert (p * mod).sum() / p.sum() == pytest.approx(1.0, abs=2e-3)


def test_no_arms_no_fourier_mode():
    """The same measurement on a plain disk finds no m=2 mode (the test can fail)."""
    img = _intrinsic(_plain())
    r, th, _, _ = _polar(img.shape[0])
    ring = (r > 2) & (r < 6)
    assert abs((img[ring] * np.exp(-2j * th[ring])).sum()) / img[ring].sum() < 1e-3


@pytest.mark.parametrize("q, length, angle", [(0.3, 2.0, 0.0), (0.4, 2.5, 35.0)])
def test_bar_axis_ratio_length_and_angle(q, length, angle):
    """The bar (with-bar image minus the disk's share) has the catalog's axis ratio, length and angle."""
    frac, beta = 0.2, 20.0
    with_bar = _intrinsic(_plain(bar_frac=frac, bar_hlr=length, bar_q=q, bar_angle=angle, beta=beta))
    without = _intrinsic(_plain(beta=beta))
    bar = with_bar - (1 - frac) * without
    assert bar.sum() == pytest.approx(frac * 1e4, rel=1e-3)
    _, _, x, y = _polar(bar.shape[0])
    w = bar / bar.sum()
    cov = np.array([[(w * x * x).sum(), (w * x * y).sum()], [(w * x * y).sum(), (w * y * y).sum()]])
    evals, evecs = np.linalg.eigh(cov)
    assert math.sqrt(evals[0] / evals[1]) == pytest.approx(q, rel=0.02)
    # a Sersic n=0.5 is a Gaussian: half-light semi-major axis = sqrt(2 ln 2) sigma_major
    assert math.sqrt(2 * math.log(2) * evals[1]) == pytest.approx(length, rel=0.02)
    major = math.degrees(math.atan2(evecs[1, 1], evecs[0, 1])) % 180
    assert min(abs(major - (beta + angle) % 180), 180 - abs(major - (beta + angle) % 180)) < 0.5


def test_bar_is_projected_with_the_disk():
    """An inclined disk squeezes its bar along the disk's minor axis."""
    g = 0.5  # axis ratio (1-g)/(1+g) = 1/3 along y
    # disk major axis along y (beta 90), bar at 90 deg from it in the disk plane: along x
    kw = dict(bar_frac=0.2, bar_hlr=2.0, bar_q=0.3, bar_angle=90.0, g1_disk=-g, beta=90.0)
    bar = _intrinsic(_plain(**kw)) - 0.8 * _intrinsic(_plain(g1_disk=-g, beta=90.0))
    _, _, x, y = _polar(bar.shape[0])
    w = bar / bar.sum()
    # the disk's shear shrinks the sky x axis by sqrt((1-g)/(1+g)) and stretches y by its inverse
    s = math.sqrt((1 - g) / (1 + g))
    sig_major = 2.0 / math.sqrt(2 * math.log(2))
    assert math.sqrt((w * x * x).sum()) == pytest.approx(sig_major * s, rel=0.03)
    assert math.sqrt((w * y * y).sum()) == pytest.approx(0.3 * sig_major / s, rel=0.03)


def test_lopsided_disk_moves_light_to_its_side():
    a1, phase = 0.3, 60.0
    img = _intrinsic(_plain(lop_a1=a1, lop_phase=phase))
    r, th, x, y = _polar(img.shape[0])
    assert img.sum() == pytest.approx(_intrinsic(_plain()).sum(), rel=1e-5)
    ring = (r > 3.5) & (r < 6)  # where the m=1 weight min(r / hlr, 1) is 1
    c1 = (img[ring] * np.exp(-1j * th[ring])).sum()
    assert -math.degrees(np.angle(c1)) == pytest.approx(phase, abs=0.5)  # I ~ 1 + a cos(theta - phi)
    assert abs(c1) / img[ring].sum() == pytest.approx(a1 / 2, rel=0.03)


def test_dust_lane_dims_the_midplane_and_keeps_the_catalog_flux():
    g = 0.7  # near edge-on, major axis along x
    kw = dict(g1_disk=g, dust_tau=1.5, dust_width=0.3)
    dusty, clean = _intrinsic(_plain(**kw)), _intrinsic(_plain(g1_disk=g))
    assert dusty.sum() == pytest.approx(clean.sum(), rel=1e-5)
    c = dusty.shape[0] // 2
    # along the minor axis the lane carves a dip at the midplane: attenuation exp(-tau) there
    prof_d, prof_c = dusty[:, c], clean[:, c]
    (disk,) = galaxy_components(_plain(**kw))[1]
    scale_factor = dusty.sum() / (clean * disk.modulation(*_polar(dusty.shape[0])[2:])).sum()
    assert 1.05 < scale_factor < 2  # the lane absorbed light, the disk is rescaled to the catalog flux
    assert prof_d[c] / prof_c[c] == pytest.approx(math.exp(-1.5) * scale_factor, rel=0.05)
    assert prof_d[c] < prof_d[c + 3]  # the midplane is darker than just above it


def test_companion_lies_where_the_catalog_says():
    sep, angle, beta, ratio = 4.0, 40.0, 25.0, 0.5
    t = _plain(comp_flux_ratio=ratio, comp_sep=sep, comp_angle=angle, comp_hlr=0.8, comp_n=1.5, comp_g=0.2,
               comp_beta=10.0, beta=beta, hlr_disk=1.0)
    comp = _intrinsic(t) - _intrinsic(_plain(beta=beta, hlr_disk=1.0))
    assert comp.sum() == pytest.approx(ratio * 1e4, rel=1e-3)
    _, _, x, y = _polar(comp.shape[0])
    w = comp / comp.sum()
    a = math.radians(beta + angle)
    assert (w * x).sum() == pytest.approx(sep * math.cos(a), abs=0.01)
    assert (w * y).sum() == pytest.approx(sep * math.sin(a), abs=0.01)


def test_irregular_uses_its_own_knots():
    t = _plain(irregular=1, irr_knot_frac=0.5, irr_n_knots=6, knot_sigma=0.3, knot_frac=0.1, n_knots=40,
               hlr_disk=1.0)
    _, numeric = galaxy_components(t, knot_seed=3)
    (knots,) = numeric
    assert len(knots.positions) == 6 and knots.sigma == 0.3 and knots.flux == pytest.approx(0.5e4)
    img = _intrinsic(t)
    assert img.sum() == pytest.approx(1e4, rel=2e-3)


def _rich_row():
    sv = load_survey("sdss")
    cat = load_catalog(sv.catalog)
    labels = [morphology_label({c: cat[c][i] for c in cat.colnames}) for i in range(400)]
    return sv, cat, labels


def test_every_component_conserves_flux_through_render_galaxy():
    """Intrinsic and noiseless images of rich galaxies hold the catalog flux (primary + companion)."""
    sv, cat, labels = _rich_row()
    for want in ("barred spiral", "irregular", "spiral + companion"):
        i = labels.index(want)
        row = {c: cat[c][i] for c in cat.colnames}
        truth = draw_truth(row, sv, 5, i, morphology=True)
        a = render_galaxy(truth, sv, 96, psf_size=33)
        total = truth["flux"] * (1 + float(truth["comp_flux_ratio"]))
        assert a["intrinsic"].sum() == pytest.approx(total, rel=5e-3), want
        assert a["noiseless"].sum() == pytest.approx(total, rel=1e-2), want


def test_rich_intrinsic_convolved_with_psf_reproduces_noiseless():
    """The interpolated-image path of the numerical components agrees with the intrinsic image."""
    from scipy.signal import fftconvolve

    sv, cat, labels = _rich_row()
    i = labels.index("barred spiral")
    truth = draw_truth({c: cat[c][i] for c in cat.colnames}, sv, 5, i, morphology=True)
    truth.update(dust_tau=1.0, dust_width=0.3, lop_a1=0.2)
    k, S = 3, 48
    a = render_galaxy(truth, sv, S, oversampling=k, psf_size=75)
    conv = fftconvolve(a["intrinsic"].astype(np.float64), a["psf"].astype(np.float64), mode="same")
    model = conv.reshape(S, k, S, k).sum(axis=(1, 3))
    assert np.abs(model - a["noiseless"]).max() <= 1e-2 * a["noiseless"].max()


def test_population_fractions_follow_the_model():
    model = MorphologyModel()
    t = generate_population(20000, 11, PopulationModel(mag_range=(14.0, 17.77)), morphology=model)
    bt = np.asarray(t["bt"])
    disk = bt < model.disk_bt
    irr = np.asarray(t["irregular"]) == 1
    regular = disk & ~irr
    n = regular.sum()
    for col, frac in (("bar_frac", model.bar_fraction), ("arm_m", model.spiral_fraction)):
        got = (np.asarray(t[col]) > 0)[regular].mean()
        assert abs(got - frac) < 4 * math.sqrt(frac * (1 - frac) / n), col
        assert not (np.asarray(t[col]) > 0)[~regular].any(), col
    assert abs(irr[disk].mean() - model.irregular_fraction) < 4 * math.sqrt(0.09 / disk.sum())
    arms = np.asarray(t["arm_m"])[np.asarray(t["arm_m"]) > 0]
    assert np.allclose(np.bincount(arms, minlength=5)[2:] / len(arms), model.arm_m_probs, atol=0.03)
    pitch = np.asarray(t["arm_pitch"])[np.asarray(t["arm_m"]) > 0]
    assert pitch.min() >= 5 and pitch.max() <= 40 and abs(np.median(pitch) - 17) < 1
    g = np.asarray(t["g_disk"])
    assert np.array_equal(np.asarray(t["dust_tau"]) > 0, regular & (g > model.dust_g_min))
    comp = np.asarray(t["comp_flux_ratio"]) > 0
    assert abs(comp.mean() - model.companion_fraction) < 4 * math.sqrt(0.05 * 0.95 / len(t))
    # the bulge + disk columns do not depend on the morphology columns
    plain = generate_population(20000, 11, PopulationModel(mag_range=(14.0, 17.77)), morphology=False)
    assert not any(c in plain.colnames for c in MORPHOLOGY_COLUMNS)
    for c in CATALOG_COLUMNS:
        assert np.array_equal(np.asarray(plain[c]), np.asarray(t[c])), c


def test_bulge_disk_switch_reproduces_the_files_of_a_catalog_without_morphology(tmp_path):
    """``morphology="bulge-disk"`` on the new catalog = the simulator before it (catalog without the columns)."""
    cat = load_catalog("sdss_population.ecsv")
    old = cat.copy()
    old.remove_columns(list(MORPHOLOGY_COLUMNS))
    a = simulate(tmp_path / "a.h5", n=6, stamp=32, seed=4, catalog=cat, psf_size=17)
    b = simulate(tmp_path / "b.h5", n=6, stamp=32, seed=4, catalog=old, psf_size=17)
    r = simulate(tmp_path / "r.h5", n=6, stamp=32, seed=4, catalog=cat, psf_size=17, morphology="rich")
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(r) as fr:
        assert dict(fa.attrs).keys() == dict(fb.attrs).keys()
        for k in set(fa.attrs) - {"created"}:
            assert np.array_equal(np.asarray(fa.attrs[k]), np.asarray(fb.attrs[k])), k
        for k in ("observed", "intrinsic", "noiseless", "psf", "variance"):
            assert np.array_equal(fa[k][()], fb[k][()]), k
        assert fa.attrs["fingerprint"] != fr.attrs["fingerprint"]
        assert not np.array_equal(fa["intrinsic"][()], fr["intrinsic"][()])
        assert np.array_equal(fa["psf"][()], fr["psf"][()])  # same PSFs and seeds: only the galaxies differ


def test_rich_needs_the_columns(tmp_path):
    cat = load_catalog("sdss_population.ecsv")
    old = cat.copy()
    old.remove_columns(list(MORPHOLOGY_COLUMNS))
    with pytest.raises(GalgenInputError, match="morphology"):
        simulate(tmp_path / "x.h5", n=2, stamp=32, catalog=old, morphology="rich")
    with pytest.raises(GalgenInputError, match="--morphology"):
        simulate(tmp_path / "x.h5", n=2, stamp=32, morphology="spirals")
    bad = cat.copy()
    bad.remove_column("bar_q")
    with pytest.raises(GalgenInputError, match="bar_q"):
        load_catalog(bad)
    bad = cat.copy()
    bad["arm_amp"][0] = 1.5
    with pytest.raises(GalgenInputError, match="arm_amp"):
        load_catalog(bad)
