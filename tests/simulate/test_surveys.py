import math

import pytest
import yaml

from galgen.errors import GalgenInputError
from galgen.simulate import available_surveys, load_survey


def test_presets_present_and_documented():
    assert {"sdss", "hst", "lsst"} <= set(available_surveys())
    for name in ("sdss", "hst", "lsst"):
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
