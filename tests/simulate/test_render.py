"""The renderer against GalSim's own drawing and against the centring convention."""

import galsim
import numpy as np
import pytest

from galgen.simulate import draw_truth, load_catalog, load_survey, render_galaxy
from galgen.simulate.render import Knots, draw_integrated


def _reference(profile, size, scale, offset=0.0):
    """GalSim's exact pixel integration: real-space convolution with the pixel."""
    conv = galsim.Convolve(profile, galsim.Pixel(scale), real_space=True)
    return conv.drawImage(nx=size, ny=size, scale=scale, method="no_pixel", use_true_center=False,
                          offset=(offset, offset)).array


@pytest.mark.parametrize("n, hlr, g1, size, offset", [
    (1.0, 1.2, 0.3, 48, 0.0),
    (4.0, 0.6, 0.1, 48, 0.0),   # cuspy de Vaucouleurs bulge, hlr of 1.5 pixels
    (4.0, 1.5, -0.2, 33, 0.0),  # odd stamp
    (2.5, 0.9, 0.2, 48, 0.5),   # centre between pixels (even oversampling)
    (6.0, 0.8, 0.0, 40, 1.0),
])
def test_draw_integrated_matches_galsim(n, hlr, g1, size, offset):
    prof = galsim.Sersic(n, half_light_radius=hlr, trunc=6 * hlr, flux_untruncated=False, flux=500.0)
    prof = prof.shear(g1=g1, g2=0.05)
    ours = draw_integrated(prof, size, 0.396, offset=offset)
    ref = _reference(prof, size, 0.396, offset)
    assert np.abs(ours - ref).max() <= 5e-4 * ref.max()
    assert ours.sum() == pytest.approx(ref.sum(), rel=2e-4)


def test_draw_integrated_matches_galsim_fft_default():
    """Also against drawImage's FFT pixel integration of a disk, with tight GSParams.

    (With default GSParams GalSim's FFT itself is off by 3e-3 of the peak at the centre.)
    """
    tight = galsim.GSParams(folding_threshold=1e-3, maxk_threshold=1e-4)
    prof = galsim.Exponential(half_light_radius=1.0, flux=100.0, gsparams=tight).shear(g1=0.2, g2=-0.1)
    ours = draw_integrated(prof, 48, 0.3)
    ref = prof.drawImage(nx=48, ny=48, scale=0.3, use_true_center=False).array
    assert np.abs(ours - ref).max() <= 5e-4 * ref.max()


def test_knots_match_galsim():
    rk = galsim.RandomKnots(40, half_light_radius=1.5, flux=1.0, rng=galsim.BaseDeviate(5))
    shear = galsim.Shear(g1=0.3, g2=-0.2)
    knots = Knots(rk.points @ shear.getMatrix().T, 800.0, 0.1, shear.getMatrix())
    for scale, size, offset in [(0.396, 48, 0.0), (0.132, 96, 1.0), (0.03, 64, 0.0)]:
        ours = knots.draw(size, scale, offset)
        ref = knots.galsim().drawImage(nx=size, ny=size, scale=scale, use_true_center=False,
                                       offset=(offset, offset)).array
        assert np.abs(ours - ref).max() <= 3e-3 * ref.max()
        assert ours.sum() == pytest.approx(ref.sum(), rel=1e-3)


def _truth(i, survey="sdss", seed=3, **override):
    sv = load_survey(survey)
    cat = load_catalog(sv.catalog)
    row = {c: cat[c][i] for c in cat.colnames}
    truth = draw_truth(row, sv, seed, i)
    truth.update(override)
    return sv, truth


def test_oversampled_intrinsic_sums_to_detector_intrinsic():
    """Block-summing the k=3 intrinsic image gives the k=1 one: the centring convention."""
    sv, truth = _truth(5, n_knots=0, knot_frac=0.0)
    a1 = render_galaxy(truth, sv, 40, oversampling=1)
    a3 = render_galaxy(truth, sv, 40, oversampling=3)
    assert a3["intrinsic"].shape == (120, 120)
    binned = a3["intrinsic"].reshape(40, 3, 40, 3).sum(axis=(1, 3))
    assert np.abs(binned - a1["intrinsic"]).max() <= 2e-3 * a1["intrinsic"].max()
    assert np.unravel_index(a1["intrinsic"].argmax(), (40, 40)) == (20, 20)
    for a in (a1, a3):
        p = a["psf"]
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.unravel_index(p.argmax(), p.shape) == (p.shape[0] // 2, p.shape[1] // 2)


def test_intrinsic_convolved_with_psf_reproduces_noiseless():
    """Fine intrinsic (k=3) * fine PSF, summed onto detector pixels, equals GalSim's observation."""
    from scipy.signal import fftconvolve

    sv, truth = _truth(9)
    k, S = 3, 48
    a = render_galaxy(truth, sv, S, oversampling=k, psf_size=75)
    conv = fftconvolve(a["intrinsic"].astype(np.float64), a["psf"].astype(np.float64), mode="same")
    # 'same' keeps the centre of an odd kernel at its P//2 index: no shift
    model = conv.reshape(S, k, S, k).sum(axis=(1, 3))
    ref = a["noiseless"]
    assert np.abs(model - ref).max() <= 1e-2 * ref.max()


def test_render_shapes_dtypes_and_determinism():
    sv, truth = _truth(2)
    a = render_galaxy(truth, sv, 32, oversampling=2, psf_size=21)
    b = render_galaxy(truth, sv, 32, oversampling=2, psf_size=21)
    assert a["observed"].shape == (32, 32) and a["intrinsic"].shape == (64, 64) and a["psf"].shape == (21, 21)
    assert a["observed"].dtype == np.float32 and a["mask"].dtype == np.uint8
    for key in a:
        assert np.array_equal(a[key], b[key])
    assert np.all(a["variance"] > 0)
