import math

import pytest
import yaml

from galgen.errors import GalgenInputError
from galgen.simulate import available_surveys, load_survey


def test_presets_present_and_documented():
    assert {"sdss", "sdss-deep", "hst", "lsst"} <= set(available_surveys())
    for name in ("sdss", "sdss-deep", "hst", "lsst"):
        s = load_survey(name)
        assert s.sources, f"{name} has no literature sources"
        assert s.pixel_scale > 0 and s.gain > 0


def test_preset_values_follow_their_definitions():
    sdss = load_survey("sdss")
    assert sdss.pixel_scale == pytest.approx(0.396)
    assert sdss.psf.model in ("moffat", "kolmogorov") and sdss.psf.fwhm == pytest.approx(1.4)
    # zero point: a source of magnitude zero_point gives exactly 1 ADU
    assert sdss.flux(sdss.zero_point) == pytest.approx(1.0)
    assert sdss.flux(sdss.zero_point - 2.5) == pytest.approx(10.0)
    # sky per pixel = sky surface brightness converted to ADU times pixel area
    assert sdss.sky_level == pytest.approx(10 ** (-0.4 * (sdss.sky_mag - sdss.zero_point)) * 0.396**2)
    assert load_survey("hst").pixel_scale == pytest.approx(0.03)
    assert load_survey("lsst").pixel_scale == pytest.approx(0.2)
    assert load_survey("lsst").psf.fwhm == pytest.approx(0.7)


def test_psf_fwhm_distribution_and_galsim_profile():
    import numpy as np

    sdss = load_survey("sdss")
    rng = np.random.default_rng(0)
    draws = [sdss.psf.draw(rng) for _ in range(2000)]
    fwhm = np.array([d["psf_fwhm"] for d in draws])
    assert np.all((fwhm >= 0.9) & (fwhm <= 2.2))
    assert abs(np.median(fwhm) - 1.4) < 0.03
    psf = sdss.psf.build(1.3, 0.0, 0.0)
    assert psf.calculateFWHM() == pytest.approx(1.3, rel=1e-3)
    assert psf.flux == pytest.approx(1.0)
    airy = load_survey("hst").psf.build(0.07)
    lam_over_d = 814e-9 / 2.4 * 180 / math.pi * 3600  # arcsec
    assert airy.lam_over_diam == pytest.approx(lam_over_d, rel=1e-6)
    assert airy.obscuration == pytest.approx(0.33)


def test_custom_survey_yaml(tmp_path):
    d = load_survey("sdss").to_dict()
    d["pixel_scale"] = 0.25
    path = tmp_path / "mysurvey.yaml"
    path.write_text(yaml.safe_dump(d))
    s = load_survey(path)
    assert s.pixel_scale == 0.25 and s.name == "sdss"


@pytest.mark.parametrize("change, message", [
    ({"pixel_scale": -1}, "pixel_scale"),
    ({"psf": {"model": "gaussianish", "fwhm": 1.0}}, "psf.model"),
    ({"psf": {"model": "moffat", "fwhm": 1.0}}, "beta"),
    ({"colour": "red"}, "unknown survey key"),
])
def test_bad_survey_yaml(tmp_path, change, message):
    d = load_survey("sdss").to_dict()
    d.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(GalgenInputError, match=message) as err:
        load_survey(path)
    assert str(path) in str(err.value)


def test_unknown_survey_name():
    with pytest.raises(GalgenInputError, match="unknown survey 'euclidish'"):
        load_survey("euclidish")
    with pytest.raises(GalgenInputError, match="no such file"):
        load_survey("missing.yaml")


def test_sources_are_strings():
    for name in available_surveys():
        assert all(isinstance(s, str) for s in load_survey(name).sources), name


def test_deep_sdss_is_the_mean_of_forty_exposures_of_the_same_galaxies(tmp_path):
    """``sdss-deep``: the galaxies, PSFs and units of ``sdss`` and 1/40 of its noise variance."""
    import h5py
    import numpy as np

    from galgen.simulate import simulate

    sdss, deep = load_survey("sdss"), load_survey("sdss-deep")
    assert deep.sky_level == pytest.approx(sdss.sky_level) and deep.zero_point == sdss.zero_point
    # mean of N exposures: ((m + sky) / g + (rn / g)^2) / N for every model value m
    for m in (0.0, 50.0, 4000.0):
        single = (m + sdss.sky_level) / sdss.gain + (sdss.read_noise / sdss.gain) ** 2
        coadd = (m + deep.sky_level) / deep.gain + (deep.read_noise / deep.gain) ** 2
        assert coadd == pytest.approx(single / 40, rel=1e-4)
    arrays = {}
    for name in ("sdss", "sdss-deep"):
        path = simulate(tmp_path / f"{name}.h5", survey=name, n=24, stamp=32, seed=7, psf_size=25,
                        morphology="rich", progress=False)
        with h5py.File(path, "r") as f:
            arrays[name] = {k: f[k][...] for k in ("noiseless", "intrinsic", "psf", "observed", "variance")}
    a, b = arrays["sdss"], arrays["sdss-deep"]
    for key in ("noiseless", "intrinsic", "psf"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_allclose(b["variance"], a["variance"] / 40, rtol=1e-4)
    # the drawn noise has the stated variance: chi^2 per pixel ~ 1 in both, with a 6.3x smaller sigma
    for arr in (a, b):
        chi2 = ((arr["observed"] - arr["noiseless"]) ** 2 / arr["variance"]).mean()
        assert 0.95 < chi2 < 1.05
    ratio = np.std(b["observed"] - b["noiseless"]) / np.std(a["observed"] - a["noiseless"])
    assert ratio == pytest.approx(40 ** -0.5, rel=0.05)
