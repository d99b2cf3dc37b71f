"""The simulate stage: determinism, sharding, resume, and the physics of its outputs."""

import h5py
import numpy as np
import pytest
from astropy.table import Table

import galgen.simulate.simulator as simulator
from galgen.data import CutoutFile, merge_cutouts, read_cutouts
from galgen.errors import GalgenInputError
from galgen.evaluation import hsm_moments
from galgen.simulate import simulate


def _assert_same_files(a, b):
    arr_a, cat_a, _ = read_cutouts(a)
    arr_b, cat_b, _ = read_cutouts(b)
    assert sorted(arr_a) == sorted(arr_b)
    for k in arr_a:
        assert np.array_equal(arr_a[k], arr_b[k]), k
    assert cat_a.colnames == cat_b.colnames
    for c in cat_a.colnames:
        assert np.array_equal(np.asarray(cat_a[c]), np.asarray(cat_b[c])), c


def test_same_seed_same_arrays(sdss_small, tmp_path):
    again = simulate(tmp_path / "again.h5", survey="sdss", n=60, stamp=48, seed=7)
    _assert_same_files(sdss_small, again)
    other = simulate(tmp_path / "other.h5", survey="sdss", n=60, stamp=48, seed=8)
    with CutoutFile(sdss_small) as f, CutoutFile(other) as g:
        assert not np.array_equal(f.read("observed"), g.read("observed"))


def test_union_of_shards_equals_full_run(sdss_small, tmp_path):
    shards = [simulate(tmp_path / f"s{k}.h5", survey="sdss", n=60, stamp=48, seed=7, shard=f"{k}/3")
              for k in (2, 0, 1)]
    with CutoutFile(shards[0]) as f:
        assert f.attrs["shard"] == "2/3" and len(f) == 20
        assert list(f.catalog["index"]) == list(range(40, 60))
    merged = merge_cutouts(shards, tmp_path / "merged.h5")
    _assert_same_files(sdss_small, merged)
    with CutoutFile(merged) as f, CutoutFile(sdss_small) as g:
        a, b = f.attrs, g.attrs
        a.pop("created"), b.pop("created")
        assert a == b  # the merged file is the unsharded run's file, fingerprint included


def test_merge_refuses_bad_shard_sets(tmp_path):
    a = simulate(tmp_path / "a0.h5", n=8, stamp=16, seed=1, shard="0/2")
    b = simulate(tmp_path / "a1.h5", n=8, stamp=16, seed=1, shard="1/2")
    c = simulate(tmp_path / "c1.h5", n=8, stamp=16, seed=2, shard="1/2")
    with pytest.raises(GalgenInputError, match=r"shard\(s\) \[1\] of 2 missing"):
        merge_cutouts([a], tmp_path / "m.h5")
    with pytest.raises(GalgenInputError, match="given twice"):
        merge_cutouts([a, a, b], tmp_path / "m.h5")
    with pytest.raises(GalgenInputError, match="different jobs"):
        merge_cutouts([a, c], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()
    merge_cutouts([b, a], tmp_path / "m.h5")
    with pytest.raises(GalgenInputError, match="output exists"):
        merge_cutouts([a, b], tmp_path / "m.h5")


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    full = simulate(tmp_path / "full.h5", n=20, stamp=24, seed=5, chunk_size=4)
    real = simulator._render_chunk
    calls = {"n": 0}

    def dying(args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("job killed")
        return real(args)

    monkeypatch.setattr(simulator, "_render_chunk", dying)
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        simulate(out, n=20, stamp=24, seed=5, chunk_size=4)
    assert not out.exists(), "an interrupted run must not leave a file under the final name"
    partial = tmp_path / "resumed.h5.partial"
    with h5py.File(partial, "r") as f:
        assert f.attrs["n_done"] == 8 and not f.attrs["complete"]
    monkeypatch.setattr(simulator, "_render_chunk", real)
    calls["n"] = 0
    rendered = []
    monkeypatch.setattr(simulator, "_render_chunk", lambda args: rendered.append(len(args[1])) or real(args))
    simulate(out, n=20, stamp=24, seed=5, chunk_size=4)
    assert sum(rendered) == 12, "the resumed run renders only what was missing"
    assert not partial.exists()
    _assert_same_files(full, out)


def test_existing_output(tmp_path):
    out = simulate(tmp_path / "x.h5", n=4, stamp=16, seed=1)
    mtime = out.stat().st_mtime_ns
    simulate(out, n=4, stamp=16, seed=1)  # same job: nothing to do
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(GalgenInputError, match="output exists"):
        simulate(out, n=4, stamp=16, seed=2)
    simulate(out, n=4, stamp=16, seed=2, overwrite=True)
    assert CutoutFile(out).attrs["seed"] == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "--n"), ({"stamp": 4}, "--stamp"), ({"oversampling": 0}, "--oversampling"),
    ({"shard": "3/2"}, "--shard"), ({"survey": "nosuch"}, "unknown survey"), ({"psf_size": 1}, "--psf-size"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(GalgenInputError, match=message):
        simulate(tmp_path / "bad.h5", **{"n": 4, "stamp": 16, **kwargs})
    assert not (tmp_path / "bad.h5").exists()


def test_noiseless_flux_equals_catalog_flux(sdss_fit):
    arrays, cat, attrs = read_cutouts(sdss_fit, keys=["noiseless", "intrinsic"])
    fits = np.asarray(cat["fits_stamp"], bool)
    assert fits.sum() >= 30, "too few galaxies fit the stamp for a meaningful test"
    flux = np.asarray(cat["flux"], float)
    # the flux column follows the survey zero point
    assert np.allclose(flux, 10 ** (-0.4 * (np.asarray(cat["mag"]) - attrs["zero_point"])))
    ratio = arrays["noiseless"].sum(axis=(1, 2)) / flux
    assert np.all(np.abs(ratio[fits] - 1) < 0.01), ratio[fits]
    ratio_i = arrays["intrinsic"].sum(axis=(1, 2)) / flux
    assert np.all(np.abs(ratio_i[fits] - 1) < 0.01)
    assert np.all(ratio < 1.01)  # a stamp never holds more than the galaxy


def test_noise_matches_stored_variance(sdss_fit):
    arrays, cat, _ = read_cutouts(sdss_fit, keys=["observed", "noiseless", "variance"])
    z = (arrays["observed"].astype(np.float64) - arrays["noiseless"]) / np.sqrt(arrays["variance"])
    npix = z.size
    chi2 = (z**2).sum()
    # chi2 of npix independent unit normals: mean npix, sd sqrt(2 npix)
    assert abs(chi2 - npix) < 3 * np.sqrt(2 * npix)
    assert abs(z.mean()) < 3 / np.sqrt(npix)
    # the variance includes the galaxy's own Poisson noise: check it in the brightest pixels
    bright = arrays["noiseless"] > 3 * cat["sky_level"][0]
    assert bright.sum() > 200
    assert (z[bright] ** 2).mean() == pytest.approx(1.0, abs=3 * np.sqrt(2 / bright.sum()))


def test_hsm_sizes_track_catalog_hlr(sdss_fit):
    """Adaptive-moment sizes of disk-dominated intrinsic images follow the catalog hlr.

    For an exponential disk sigma_HSM / hlr is a fixed number (measured here on a
    finely sampled GalSim exponential); catalog sizes should reproduce it.
    """
    import galsim
    from scipy.stats import spearmanr

    arrays, cat, attrs = read_cutouts(sdss_fit, keys=["intrinsic"])
    disk = galsim.Sersic(1.0, half_light_radius=1.0, trunc=3.0, flux_untruncated=False)
    ref = galsim.hsm.FindAdaptiveMom(disk.drawImage(nx=256, ny=256, scale=0.03)).moments_sigma * 0.03
    hlr = np.asarray(cat["hlr"], float)
    sel = (np.asarray(cat["bt"]) < 0.15) & (hlr > 2 * attrs["pixel_scale"])
    assert sel.sum() >= 15
    mom = hsm_moments(arrays["intrinsic"][sel], attrs["pixel_scale"])
    ok = mom["ok"]
    assert ok.mean() > 0.9
    ratio = mom["sigma"][ok] / hlr[sel][ok]
    assert np.median(ratio) == pytest.approx(ref, rel=0.06)
    assert spearmanr(mom["sigma"][ok], hlr[sel][ok]).statistic > 0.9


def test_catalog_readable_with_astropy(sdss_small):
    t = Table.read(sdss_small, path="catalog")
    assert len(t) == 60
    assert t["hlr"].unit == "arcsec" and t["flux"].unit == "adu"
    assert list(t["index"]) == list(range(60))
    for col in ("psf_fwhm", "psf_g1", "psf_g2", "sky_level", "gain", "read_noise", "fits_stamp", "g1_disk"):
        assert col in t.colnames


def test_workers_do_not_change_results(tmp_path):
    a = simulate(tmp_path / "w1.h5", n=12, stamp=24, seed=9, workers=1, chunk_size=3)
    b = simulate(tmp_path / "w2.h5", n=12, stamp=24, seed=9, workers=2, chunk_size=3)
    _assert_same_files(a, b)


@pytest.mark.parametrize("survey", ["hst", "lsst"])
def test_other_presets(tmp_path, survey):
    out = simulate(tmp_path / f"{survey}.h5", survey=survey, n=6, stamp=32, seed=1, oversampling=2)
    arrays, cat, attrs = read_cutouts(out)
    assert attrs["survey"] == survey and attrs["oversampling"] == 2
    assert arrays["intrinsic"].shape == (6, 64, 64)
    assert np.all(np.isfinite(arrays["observed"]))
    assert np.allclose(arrays["psf"].sum(axis=(1, 2)), 1.0, atol=1e-5)
