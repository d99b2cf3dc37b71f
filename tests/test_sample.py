"""Using trained models: galgen sample, anomaly and evaluate, end to end on a tiny run."""

import json

import numpy as np
import pytest
import torch
import yaml
from astropy.table import Table

from galgen.cli import main
from galgen.data import CutoutFile
from galgen.errors import GalgenInputError
from galgen.evaluation import evaluate_models, reconstruction_chi2
from galgen.sample import parse_conditions, resolve_model, sample_to_file
from galgen.train import train


@pytest.fixture(scope="module")
def vae_run(sdss_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    cfg = {"model": {"kind": "vae", "latent_dim": 4, "width": 8, "warmup_steps": 5},
           "train": {"steps": 12, "batch_size": 16, "lr": 2e-3, "val_fraction": 0.125, "log_every": 4,
                     "val_every": 6, "checkpoint_every": 6, "device": "cpu", "prior_epochs": 3}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(d / "cfg.yaml"), "--data", str(sdss_tiny), "--out", str(d / "run"),
                 "--no-progress"]) == 0
    return d / "run"


def test_sample_writes_observed_and_intrinsic_cutouts(vae_run, tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert main(["sample", "--model", str(vae_run), "--n", "20", "--seed", "3", "--batch-size", "8",
                 "--out", str(out), "--device", "cpu"]) == 0
    with CutoutFile(out) as f:
        assert len(f) == 20 and f.attrs["survey"] == "sdss" and f.pixel_scale == pytest.approx(0.396)
        assert set(f.keys) >= {"observed", "noiseless", "intrinsic", "psf", "variance", "mask"}
        intrinsic, noiseless, psf = f.read("intrinsic"), f.read("noiseless"), f.read("psf")
        cat = f.catalog
    assert np.allclose(psf.sum((1, 2)), 1, atol=1e-4)
    assert np.all(intrinsic >= 0)
    # flux is conserved by the observation (up to light beyond the stamp)
    assert np.all(noiseless.sum((1, 2)) <= intrinsic.sum((1, 2)) * 1.001)
    assert np.allclose(cat["flux"], intrinsic.sum((1, 2)), rtol=1e-4)
    assert len(set(np.round(cat["psf_fwhm"], 6))) > 1  # per-galaxy PSFs drawn from the survey
    # the same job is reused, another seed gives other galaxies
    again = sample_to_file(vae_run, out, n=20, seed=3, device="cpu", batch_size=8)
    assert again == out
    other = sample_to_file(vae_run, tmp_path / "o.h5", n=20, seed=4, device="cpu", batch_size=8, prior="normal")
    with CutoutFile(other) as f:
        assert not np.allclose(f.read("intrinsic"), intrinsic)


def test_sample_bad_input(vae_run, tmp_path, capsys):
    assert main(["sample", "--model", str(vae_run), "--survey", "lsst", "--out", str(tmp_path / "x.h5")]) == 2
    assert "0.2" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.h5")]) == 2
    assert "neither a file" in capsys.readouterr().err
    assert main(["sample", "--model", str(vae_run), "--cond", "mag=17", "--out", str(tmp_path / "x.h5")]) == 2
    assert "not conditioned" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
    assert parse_conditions("hlr=1.5,mag=18", ("mag", "hlr")).tolist() == [18.0, 1.5]
    for bad in ("mag=18", "mag=x,hlr=1", "mag=18,hlr=1,z=2"):
        with pytest.raises(GalgenInputError, match="--cond"):
            parse_conditions(bad, ("mag", "hlr"))


def test_anomaly_scores_and_evaluate(vae_run, sdss_tiny, tmp_path):
    out = tmp_path / "scores.ecsv"
    assert main(["anomaly", "--model", str(vae_run), "--data", str(sdss_tiny), "--out", str(out),
                 "--device", "cpu"]) == 0
    t = Table.read(out)
    assert len(t) == 64 and np.all(np.isfinite(t["anomaly"])) and np.all(t["anomaly"] > 0)
    assert np.allclose(t["chi2"] / t["n_good"], t["anomaly"], rtol=1e-5)
    model = resolve_model(vae_run)
    rec = reconstruction_chi2(model, sdss_tiny, n=64)
    assert np.allclose(np.sort(rec["chi2_pixel"]), np.sort(t["anomaly"]), rtol=1e-4)
    # the simulator's own noiseless images explain the data to chi2/pixel ~ 1
    assert 0.9 < rec["truth_median"] < 1.1
    report = evaluate_models([vae_run], sdss_tiny, tmp_path / "q", n=32, n_grid=4, baseline=None,
                             image_c2st=False)
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert saved["n"] == 32 and len(saved["reconstruction"]) == 1
    assert {k.split(" ", 1)[1] for k in saved["generation"]} == {"(flow prior)", "(N(0,I))"}
    for g in saved["generation"].values():
        assert 0 <= g["statistics"]["flux"]["ks"] <= 1
    assert (tmp_path / "q" / "samples.png").stat().st_size > 1000
    assert (tmp_path / "q" / "histograms.png").stat().st_size > 1000
    assert report["reconstruction"] == saved["reconstruction"]
    assert (tmp_path / "q" / "training_vae-0.png").stat().st_size > 1000
    with pytest.raises(GalgenInputError, match="exists"):
        main_out = tmp_path / "scores.ecsv"
        from galgen.sample import anomaly_scores
        anomaly_scores(vae_run, sdss_tiny, main_out, device="cpu")
    torch.set_num_threads(torch.get_num_threads())


def test_interrupted_sampling_resumes_to_the_same_file(vae_run, tmp_path, monkeypatch):
    straight = sample_to_file(vae_run, tmp_path / "a.h5", n=20, seed=5, device="cpu", batch_size=8)
    model = resolve_model(vae_run)
    calls = {"n": 0}
    original = type(model).decode

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(type(model), "decode", failing)
    with pytest.raises(KeyboardInterrupt):
        sample_to_file(vae_run, tmp_path / "b.h5", n=20, seed=5, device="cpu", batch_size=8)
    assert (tmp_path / "b.h5.partial").exists() and not (tmp_path / "b.h5").exists()
    monkeypatch.setattr(type(model), "decode", original)
    resumed = sample_to_file(vae_run, tmp_path / "b.h5", n=20, seed=5, device="cpu", batch_size=8)
    with CutoutFile(straight) as a, CutoutFile(resumed) as b:
        for key in ("observed", "intrinsic", "psf"):
            assert np.array_equal(a.read(key), b.read(key)), key
        assert np.array_equal(a.catalog["flux"], b.catalog["flux"])
