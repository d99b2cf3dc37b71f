"""The tutorials of docs/tutorials/ run, at reduced size (GALGEN_QUICK=1), and write what they say.

Each tutorial runs as a user would run it: a fresh process in an empty working
directory. The tests then open its outputs and check numbers that can fail (noise
chi-square, flux conservation, fit quality), not only that files exist.
"""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_tutorial(name, cwd, **env):
    """Run docs/tutorials/<name> in ``cwd`` in QUICK mode; return its stdout."""
    path = TUTORIALS / name
    cmd = ["bash", str(path)] if path.suffix == ".sh" else [sys.executable, str(path)]
    full_env = {**os.environ, "GALGEN_QUICK": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **env}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def is_png(path):
    path = Path(path)
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_every_tutorial_is_tested_and_in_the_docs():
    scripts = sorted(p.name for p in TUTORIALS.iterdir() if p.suffix in (".py", ".sh"))
    assert scripts == ["01_simulate.py", "02_train.py", "03_sample.py", "04_fit.py", "05_ingest_fit.py",
                       "06_galsim_interop.py", "07_cluster.sh"]
    page = (ROOT / "docs" / "tutorials.rst").read_text()
    assert re.findall(r"literalinclude:: tutorials/(\S+)", page) == scripts
    this = Path(__file__).read_text()
    for name in scripts:
        assert this.count(f'run_tutorial("{name}"') >= 1, name
        text = (TUTORIALS / name).read_text()
        assert "GALGEN_QUICK" in text, f"{name}: no QUICK mode"
    assert "tutorials" in (ROOT / "docs" / "index.rst").read_text()


def test_01_simulate(tmp_path):
    stdout = run_tutorial("01_simulate.py", tmp_path)
    out = tmp_path / "tutorial_out" / "01_simulate"
    with h5py.File(out / "sdss_train.h5") as f:
        assert f.attrs["format"] == "galgen-cutouts" and f.attrs["complete"]
        assert f["observed"].shape == (48, 64, 64) and f["intrinsic"].shape == (48, 64, 64)
        assert f["psf"].shape == (48, 33, 33)
        obs, model, var = f["observed"][:], f["noiseless"][:], f["variance"][:]
        np.testing.assert_allclose(f["psf"][:].sum((1, 2)), 1, atol=1e-4)
    cat = Table.read(out / "sdss_train.h5", path="catalog")
    assert len(cat) == 48 and {"mag", "hlr", "flux", "psf_fwhm"} <= set(cat.colnames)
    chi2 = np.mean((obs.astype(float) - model) ** 2 / var)
    assert 0.95 < chi2 < 1.05                       # the stored variance describes the noise
    summary = (out / "summary.txt").read_text()
    assert float(re.search(r"chi2_per_pixel\s+(\S+)", summary).group(1)) == pytest.approx(chi2, rel=1e-3)
    assert is_png(out / "cutouts.png")
    assert "chi2 per pixel of the noise" in stdout


def test_02_train(tmp_path):
    stdout = run_tutorial("02_train.py", tmp_path)
    out = tmp_path / "tutorial_out" / "02_train"
    import torch

    from galgen.train import load_model
    from galgen.train.logs import read_log

    for name in ("vae", "gan"):
        run = out / name
        assert (run / "model.pt").is_file() and (run / "config.yaml").is_file()
        model = load_model(run)
        assert model.kind == name
        with torch.no_grad():
            images = model.sample(3, generator=torch.Generator().manual_seed(0))
        assert images.shape == (3, 32, 32) and torch.isfinite(images).all() and (images >= 0).all()
        assert is_png(out / f"{name}_curves.png")
    train_log = read_log(out / "vae" / "train_log.csv")
    assert float(train_log[-1]["loss"]) < 0.6 * float(train_log[0]["loss"])   # the VAE learns
    gan_val = read_log(out / "gan" / "val_log.csv")
    assert all(0 <= float(gan_val[-1][k]) <= 1 for k in ("ks_flux", "ks_sigma", "ks_e"))
    assert is_png(out / "vae_samples.png")
    assert "GAN: 20 steps" in stdout


def test_03_sample(tmp_path):
    stdout = run_tutorial("03_sample.py", tmp_path)
    out = tmp_path / "tutorial_out" / "03_sample"
    from galgen.data import CutoutFile

    with CutoutFile(out / "vae_sdss.h5") as f:
        assert len(f) == 16 and f.pixel_scale == pytest.approx(0.396) and f.stamp_size == 64
        intrinsic, noiseless, psf = f.read("intrinsic"), f.read("noiseless"), f.read("psf")
        sdss = f.catalog
    with CutoutFile(out / "vae_good_seeing.h5") as f:
        good_intrinsic, good = f.read("intrinsic"), f.catalog
    assert intrinsic.shape == (16, 64, 64) and np.all(intrinsic >= 0)
    np.testing.assert_allclose(psf.sum((1, 2)), 1, atol=1e-4)
    assert np.all(noiseless.sum((1, 2)) <= intrinsic.sum((1, 2)) * 1.001)   # light is conserved or lost off the stamp
    np.testing.assert_array_equal(intrinsic, good_intrinsic)                 # same seed, same galaxies
    assert np.median(good["psf_fwhm"]) < 0.9 < np.median(sdss["psf_fwhm"])
    # typical SDSS galaxies: median flux within a factor 2 of the training set's (27,600 ADU)
    assert 1.4e4 < np.median(sdss["flux"]) < 5.5e4
    assert not (out / "vae_lsst.h5").exists() and not (out / "vae_hst.h5").exists()
    assert 'lsst has 0.2"/pixel' in stdout
    for png in ("vae_sdss.png", "vae_good_seeing.png", "intrinsic.png"):
        assert is_png(out / png), png


def test_04_fit(tmp_path):
    stdout = run_tutorial("04_fit.py", tmp_path)
    out = tmp_path / "tutorial_out" / "04_fit"
    from galgen.data import FitFile

    truth = Table.read(out / "galaxies.h5", path="catalog")
    assert len(truth) == 16
    for name in ("vae", "sersic"):
        with FitFile(out / f"{name}.h5") as f:
            assert len(f) == 16 and not f.has_samples
            assert f.read("normalized_residual").shape == (16, 64, 64)
            assert f.read("intrinsic").shape == (16, 64, 64)
        cat = Table.read(out / f"{name}.fits")
        assert len(cat) == 16 and list(cat["index"]) == list(range(16))
        assert 0.8 < np.median(cat["chi2_dof"]) < 1.5, name
        assert np.all(cat["status"] == 0), name
        ratio = np.asarray(cat["flux_map"]) / np.asarray(truth["flux"])
        assert 0.9 < np.median(ratio) < 1.1, name
        assert is_png(out / f"{name}_fits.png")
    post = Table.read(out / "sersic_post.fits")
    assert len(post) == 2 and list(post["index"]) == [0, 1]
    assert np.all(post["flux_lo68"] < post["flux_median"]) and np.all(post["flux_median"] < post["flux_hi68"])
    assert np.all(post["hlr_lo95"] <= post["hlr_lo68"]) and np.all(post["hlr_hi68"] <= post["hlr_hi95"])
    with FitFile(out / "sersic_post.h5") as f:
        assert f.has_samples and f.read("posterior_std").shape == (2, 64, 64)
        assert np.all(f.read("posterior_std") >= 0)
    assert is_png(out / "corner.png")
    assert "Sersic posterior: Pareto k" in stdout


def test_05_ingest_fit(tmp_path):
    stdout = run_tutorial("05_ingest_fit.py", tmp_path)
    out = tmp_path / "tutorial_out" / "05_ingest_fit"
    files = sorted((out / "cutouts").glob("gal_*.fits"))
    assert len(files) == 12
    with fits.open(files[3]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "PSF", "VARIANCE", "MASK"]
        assert hdul[0].header["PIXSCALE"] == pytest.approx(0.396) and hdul["MASK"].data.sum() == 5
    with h5py.File(out / "observations.h5") as f:
        assert f.attrs["source"] == "ingest" and f["observed"].shape == (12, 48, 48)
        assert f["psf"].shape == (12, 25, 25) and int(f["mask"][3].sum()) == 5
    cat = Table.read(out / "observations.h5", path="catalog")
    fit = Table.read(out / "sersic.fits")
    assert len(fit) == 12 and np.all(fit["status"] == 0)
    # Sersic fits of Sersic galaxies drawn by GalSim: the model is right, chi2/dof ~ 1 for each
    assert np.all((fit["chi2_dof"] > 0.8) & (fit["chi2_dof"] < 1.5))
    assert 0.95 < np.median(fit["chi2_dof"]) < 1.05
    assert 0.9 < np.median(np.exp(fit["log_scale"]) / cat["TRUEFLUX"]) < 1.1
    assert 0.9 < np.median(fit["param_hlr"] / cat["TRUEHLR"]) < 1.1
    assert is_png(out / "sersic_fits.png")
    assert "chi2/dof: median" in stdout


def test_06_galsim_interop(tmp_path):
    stdout = run_tutorial("06_galsim_interop.py", tmp_path)
    out = tmp_path / "tutorial_out" / "06_galsim_interop"
    r = json.loads((out / "results.json").read_text())
    assert abs(r["flux_ratio"] - 1) < 0.01 and abs(r["scene_flux_ratio"] - 1) < 0.01
    assert r["roundtrip_max_diff_over_peak"] < 2e-3
    assert r["observation_max_diff_over_peak_psf127"] < 1e-3 < r["observation_max_diff_over_peak_psf33"] < 2e-2
    assert 0.9 < r["observation_chi2_dof"] < 1.1 and r["grad_norm"] > 0
    assert all(v < 1e-4 for v in r["sersic_max_rel_diff"].values())
    # independently: the saved VAE galaxy as a GalSim profile, sheared, convolved, drawn elsewhere
    import galsim

    from galgen.physics import to_interpolated_image

    image = fits.getdata(out / "vae_galaxy.fits").astype(np.float64)
    assert image.shape == (64, 64) and image.sum() > 0
    prof = galsim.Convolve(to_interpolated_image(image, 0.396).shear(g1=0.1, g2=0.05), galsim.Moffat(3.0, fwhm=0.9))
    drawn = prof.drawImage(nx=200, ny=200, scale=0.15).array
    assert drawn.sum() == pytest.approx(image.sum(), rel=0.01)
    assert fits.getdata(out / "scene.fits").shape == (400, 400)
    assert is_png(out / "interop.png")
    assert "render_sersic vs galsim.Sersic (n=4.0)" in stdout


def test_07_cluster_locally(tmp_path):
    stdout = run_tutorial("07_cluster.sh", tmp_path, GALGEN=f"{sys.executable} -m galgen", PYTHON=sys.executable)
    out = tmp_path / "tutorial_out" / "07_cluster"
    from galgen.data import CutoutFile, FitFile

    assert sorted(p.name for p in (out / "shards").glob("*.h5")) == ["survey_0of2.h5", "survey_1of2.h5"]
    with CutoutFile(out / "survey.h5") as f:
        assert len(f) == 32
        truth = f.catalog
    assert list(truth["index"]) == list(range(32))
    with FitFile(out / "fits" / "sersic.h5") as f:
        assert len(f) == 32 and list(f.read("index")) == list(range(32))
    cat = Table.read(out / "fits" / "sersic.fits")
    assert len(cat) == 32 and list(cat["index"]) == list(range(32))       # every row, once, in order
    assert 0.8 < np.median(cat["chi2_dof"]) < 1.5
    assert "merged catalog: 32 rows of 32 galaxies" in stdout


def test_07_cluster_submits_to_slurm(tmp_path):
    """With sbatch on the PATH (a stand-in that records its arguments), the script submits the templates."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text('#!/bin/bash\necho "$*" >> "$SBATCH_LOG"\necho 1$(wc -l < "$SBATCH_LOG")\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "sbatch.log"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_LOG": str(log), "GALGEN_QUICK": "0",
           "GALGEN": "false"}   # nothing may run locally
    stdout = run_tutorial("07_cluster.sh", tmp_path, **env)
    calls = log.read_text().splitlines()
    assert len(calls) == 4
    assert "--array=0-3" in calls[0] and calls[0].endswith("pipelines/slurm/simulate_array.sbatch")
    assert "--dependency=afterok:11" in calls[1] and "galgen merge shards/survey_*of4.h5" in calls[1]
    assert "--dependency=afterok:12" in calls[2] and calls[2].endswith("pipelines/slurm/fit_array.sbatch")
    assert "--dependency=afterok:13" in calls[3] and "NSHARDS=4" in calls[3]
    for call in (calls[0], calls[2], calls[3]):
        assert Path(call.split()[-1]).is_file()
    assert "submitted" in stdout
