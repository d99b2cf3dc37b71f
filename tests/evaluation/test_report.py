"""The quality report of galgen evaluate: the parametric baseline, the pages, several sets in one table."""

import json
import re

import h5py
import numpy as np
import pytest

from galgen.cli import main
from galgen.data import CutoutFile
from galgen.evaluation import STATISTICS, evaluate_models
from galgen.evaluation.page import report_blocks
from galgen.evaluation.quality import parametric_fits


@pytest.fixture(scope="module")
def baseline_report(sdss_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    report = evaluate_models([], sdss_tiny, out, n=32, n_grid=4, seed=1, image_c2st=True)
    return out, report


def test_baseline_report_writes_every_file(baseline_report):
    out, report = baseline_report
    label = "sersic fits (baseline)"
    assert list(report["generation"]) == [label] and report["kinds"][label] == "sersic"
    saved = json.loads((out / "quality.json").read_text())
    assert saved["generation"][label]["summary"]["w1_mean"] == pytest.approx(
        report["generation"][label]["summary"]["w1_mean"])
    for png in ("samples.png", "histograms.png", "planes.png", "power_spectra.png"):
        assert (out / png).stat().st_size > 5000, png
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for f in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):  # every figure the page shows exists
        assert (out / f).exists(), f
    assert page.count("<img") == md.count("![") and "<table>" in page
    for q in STATISTICS:
        assert f"| {q} |" in md
    per = report["generation"][label]["statistics"]
    assert set(per) == set(STATISTICS)
    for q in STATISTICS:  # distances and their floors are defined and bounded
        assert 0 <= per[q]["ks"] <= 1 and 0 <= per[q]["ks_floor"] <= 1 and per[q]["w1_floor"] > 0
    c = report["c2st"][label]
    assert 0 <= c["accuracy"] <= 1 and c["se"] > 0
    assert 0 <= report["c2st_images"][label]["accuracy"] <= 1
    assert report["c2st_images"][label]["floor"] == report["c2st_images_floor"]["accuracy"]
    with h5py.File(out / "statistics.h5") as f:  # every galaxy's statistics, real and generated
        assert set(f) == {"real", label} and f["real/gini"].shape == (32,)
        for key, which in (("real", "median_real"), (label, "median_gen")):
            assert np.nanmedian(f[f"{key}/r50"][:]) == pytest.approx(report["generation"][label]["statistics"]["r50"][which])
    assert {b["by"] for b in report["binned"][label].values()} == {"flux", "r50"}
    t = report["targets"][label]
    assert set(t["w1_within_2x_floor"]) == set(STATISTICS)
    assert t["missed"] == sorted(q for q, ok in t["w1_within_2x_floor"].items() if not ok)


def test_sersic_baseline_redraws_the_fitted_population(baseline_report, sdss_tiny):
    """Fits of galaxies 32..63, re-rendered, have the fluxes and sizes of galaxies 0..31 (same population)."""
    _, report = baseline_report
    per = report["generation"]["sersic fits (baseline)"]["statistics"]
    for q in ("flux", "sigma", "r50"):
        assert per[q]["median_gen"] == pytest.approx(per[q]["median_real"], rel=0.35), q
    # and the fits recover the total fluxes of the bulge+disk galaxies they were fitted to (a single Sersic
    # extrapolated beyond a 12.7" stamp overshoots a little: within 15% in the median, 35% each)
    model, z, log_scale = parametric_fits("sersic", sdss_tiny, np.arange(32, 40))
    with CutoutFile(sdss_tiny) as f:
        truth = np.asarray(f.catalog["flux"][32:40], dtype=np.float64)
    ratio = np.exp(log_scale.numpy()) / truth
    assert model.kind == "sersic" and z.shape[0] == 8
    assert abs(np.median(ratio) - 1) < 0.15 and np.all(np.abs(ratio - 1) < 0.35)


def test_summary_table_puts_every_set_side_by_side(baseline_report):
    _, report = baseline_report
    twin = json.loads(json.dumps(report))
    for key in ("generation", "c2st", "c2st_images", "binned", "targets", "kinds"):
        twin[key]["copy"] = twin[key]["sersic fits (baseline)"]
    tables = [b for b in report_blocks(twin) if b[0] == "table"]
    header = tables[0][1]
    assert any(h.startswith("copy") for h in header) and any(h.startswith("sersic") for h in header)
    assert len(tables[1][2]) == 2  # one targets row per set


def test_evaluate_cli_needs_a_model_or_a_baseline(sdss_tiny, tmp_path, capsys):
    assert main(["evaluate", "--data", str(sdss_tiny), "--out", str(tmp_path / "r"), "--baseline", "none"]) == 2
    assert "--model" in capsys.readouterr().err


def test_conditional_models_are_generated_with_held_out_or_drawn_conditions(sdss_tiny):
    """Galaxy i takes held-out galaxy i's (mag, hlr), or a row of the model's stored training
    conditions; galaxies drawn with the model's own rows differ from those with the held-out
    ones, and the stored rows are what they used."""
    import torch

    from galgen.errors import GalgenInputError
    from galgen.evaluation.quality import generated_observations
    from galgen.models import GAN

    torch.manual_seed(0)
    gan = GAN(32, latent_dim=4, width=4, input_scale=5.0, flux_scale=100.0, conditions=("mag", "hlr"))
    gan.set_condition_stats([17.0, 1.5], [0.8, 0.8])
    gan.set_condition_bank(torch.tensor([[14.0, 0.5]]))  # one row, far from the held-out galaxies
    calls = []
    draw = gan.draw_conditions
    gan.draw_conditions = lambda n, generator=None: calls.append(n) or draw(n, generator)
    held = generated_observations(gan, sdss_tiny, n=8, seed=3, conditions="data")
    assert calls == []  # the held-out galaxies' own conditions
    drawn = generated_observations(gan, sdss_tiny, n=8, seed=3, conditions="model")
    assert calls == [8]  # one batch, one stored row per galaxy
    assert held["intrinsic"].shape == drawn["intrinsic"].shape == (8, 32, 32)
    assert not np.allclose(held["intrinsic"], drawn["intrinsic"])
    with pytest.raises(GalgenInputError, match="conditions"):
        generated_observations(gan, sdss_tiny, n=4, conditions="catalog")


def test_statistics_measured_on_the_noisy_images_subtract_their_noise(sdss_tiny, tmp_path):
    """``measure_on="observed"``: the real galaxies' statistics are those of their noisy stamps
    measured with the file's variance maps, whose noise terms bring the asymmetry closer to
    the noise-free value than the same images measured without them."""
    from galgen.evaluation import morphology_statistics

    report = evaluate_models([], sdss_tiny, tmp_path / "r", n=32, n_grid=4, baseline=None, image_c2st=False,
                             measure_on="observed")
    assert report["measured_on"] == "observed"
    assert "noisy observed images" in (tmp_path / "r" / "report.md").read_text()
    with CutoutFile(sdss_tiny) as f:
        obs, var, clean = (f.read(k, slice(0, 32)).astype(np.float64) for k in ("observed", "variance", "noiseless"))
        scale = f.pixel_scale
    with h5py.File(tmp_path / "r" / "statistics.h5") as h:
        measured = {k: h["real"][k][:] for k in ("asymmetry", "gini")}
    with_noise = morphology_statistics(obs, scale, variance=var)
    np.testing.assert_allclose(measured["asymmetry"], with_noise["asymmetry"], equal_nan=True)
    np.testing.assert_allclose(measured["gini"], with_noise["gini"], equal_nan=True)
    truth = morphology_statistics(clean, scale)["asymmetry"]
    naive = morphology_statistics(obs, scale)["asymmetry"]
    ok = np.isfinite(truth) & np.isfinite(naive) & np.isfinite(measured["asymmetry"])
    assert ok.sum() >= 24
    assert np.median(np.abs(measured["asymmetry"] - truth)[ok]) < 0.5 * np.median(np.abs(naive - truth)[ok])


def test_noise_free_statistics_need_a_file_with_noise_free_images(sdss_tiny, tmp_path):
    import shutil

    from galgen.errors import GalgenInputError

    bare = tmp_path / "real.h5"
    shutil.copy(sdss_tiny, bare)
    with h5py.File(bare, "a") as h:
        for key in ("noiseless", "intrinsic"):
            if key in h:
                del h[key]
    with pytest.raises(GalgenInputError, match=r"real\.h5.*noise-free"):
        evaluate_models([], bare, tmp_path / "r", n=8, baseline=None, measure_on="noiseless")
    with pytest.raises(GalgenInputError, match="measure_on"):
        evaluate_models([], sdss_tiny, tmp_path / "r", n=8, baseline=None, measure_on="clean")


def test_generated_galaxies_come_with_the_variance_of_their_noise(sdss_tiny):
    """The variance returned beside each generated observation is the CCD variance of its
    noise-free image: the drawn noise has chi2/pixel 1 against it."""
    import torch

    from galgen.evaluation.quality import generated_observations
    from galgen.models import GAN

    torch.manual_seed(0)
    gan = GAN(32, latent_dim=4, width=4, input_scale=5.0, flux_scale=100.0)
    g = generated_observations(gan, sdss_tiny, n=16, seed=2)
    with CutoutFile(sdss_tiny) as f:
        cat = f.catalog[:1]
    sky, gain, rn = (float(cat[c][0]) for c in ("sky_level", "gain", "read_noise"))
    np.testing.assert_allclose(g["variance"], (g["noiseless"].clip(0) + sky) / gain + (rn / gain) ** 2, rtol=1e-5)
    chi2 = ((g["observed"] - g["noiseless"]) ** 2 / g["variance"]).mean()
    assert 0.95 < chi2 < 1.05


def test_given_intrinsic_images_are_observed_like_the_held_out_galaxies(sdss_tiny):
    """generated_observations(images=) observes the file's own intrinsic images through the
    held-out PSFs: their noise-free observations agree with GalSim's (the file's
    noiseless) to a small fraction of the flux, and no model is needed; a wrong shape is
    refused naming the argument and the file."""
    from galgen.errors import GalgenInputError
    from galgen.evaluation.quality import generated_observations

    with CutoutFile(sdss_tiny) as f:
        intrinsic, noiseless = f.read("intrinsic", slice(0, 16)), f.read("noiseless", slice(0, 16))
    g = generated_observations(None, sdss_tiny, n=16, seed=2, images=intrinsic)
    np.testing.assert_array_equal(g["intrinsic"], intrinsic.astype(np.float32))
    flux = noiseless.sum(axis=(1, 2))
    err = np.abs(g["noiseless"] - noiseless).sum(axis=(1, 2)) / flux
    other = generated_observations(None, sdss_tiny, n=16, seed=2, images=np.roll(intrinsic, 1, axis=0))
    err_other = np.abs(other["noiseless"] - noiseless).sum(axis=(1, 2)) / flux
    assert np.median(err) < 0.03 < 0.3 < np.median(err_other)  # (0.018; another galaxy's: far off)
    assert not np.allclose(g["observed"], g["noiseless"])
    with pytest.raises(GalgenInputError, match="images: expected .*sdss_tiny"):
        generated_observations(None, sdss_tiny, n=16, images=intrinsic[:, :8])
