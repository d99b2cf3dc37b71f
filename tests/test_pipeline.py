"""``galgen run``: every stage from one YAML file, a manifest, skips, resumes and refusals.

The pipelines here run for real (GalSim simulation, a VAE trained for a few steps,
sampling, Sersic and VAE fits with posteriors, evaluation, the report), on 16 galaxies
of 32x32 pixels.
"""

import json
import shutil

import h5py
import numpy as np
import pytest
import yaml
from astropy.table import Table

import galgen.inference.fit as fit_module
from galgen.cli import main
from galgen.errors import GalgenInputError
from galgen.pipeline import fit_table, load_config, run_pipeline

TRAIN = {"model": {"kind": "vae", "latent_dim": 4, "width": 8, "warmup_steps": 2},
         "train": {"steps": 6, "batch_size": 8, "lr": 2e-3, "val_fraction": 0.25, "log_every": 2, "val_every": 3,
                   "checkpoint_every": 3, "device": "cpu", "prior_epochs": 2, "seed": 0}}
FULL = {"name": "tiny", "device": "cpu",
        "simulate": {"n": 16, "stamp": 32, "seed": 4},
        "train": TRAIN,
        "sample": {"model": "@train", "n": 8, "seed": 1},
        "fit": [{"name": "sersic", "model": "sersic", "batch_size": 4, "max_iter": 8, "samples": 20, "chains": 2,
                 "posterior": "laplace", "posterior_galaxies": 2},
                {"name": "vae", "model": "@train", "batch_size": 8, "max_iter": 10}],
        "evaluate": {"models": ["@train"], "n": 16},
        "report": {"n_grid": 4, "n_panels": 3}}
SMALL = {"name": "small", "device": "cpu", "simulate": {"n": 12, "stamp": 32, "seed": 2},
         "fit": [{"name": "sersic", "model": "sersic", "batch_size": 4, "max_iter": 6}],
         "report": {"n_grid": 4, "n_panels": 2}}


def write(tmp_path, cfg, name="pipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    cfg = write(d, FULL)
    return cfg, d / "run", run_pipeline(cfg, d / "run")


def test_every_stage_runs_and_its_outputs_open(full_run):
    cfg, out, result = full_run
    assert result["stages"] == {k: "ran" for k in ("simulate", "train", "sample", "fit.sersic", "fit.vae",
                                                   "evaluate", "report")}
    with h5py.File(out / "cutouts.h5", "r") as f:
        assert f["observed"].shape == (16, 32, 32)
    with h5py.File(out / "samples.h5", "r") as f:
        assert f["observed"].shape == (8, 32, 32)
    assert (out / "train" / "model.pt").is_file()
    cat = Table.read(out / "fits" / "sersic.fits")
    assert len(cat) == 16 and np.isfinite(cat["chi2_dof"]).all()
    post = Table.read(out / "fits" / "sersic_posterior.fits")
    assert len(post) == 2 and "flux_median" in post.colnames  # posteriors for the first two galaxies only
    assert len(Table.read(out / "fits" / "vae.fits")) == 16
    for png in ("cutouts.png", "samples.png", "fit_sersic.png", "fit_vae.png", "corner_sersic.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    page = (out / "report" / "index.html").read_text()
    assert "fit_vae.png" in page and "corner_sersic.png" in page and "../evaluate/report.html" in page
    assert (out / "evaluate" / "report.html").is_file()
    # the chi-square table is the fit files' own numbers
    rows = {r["name"]: r for r in result["fits"]}
    assert rows["sersic"]["median_chi2_dof"] == pytest.approx(float(np.median(cat["chi2_dof"])), rel=1e-6)
    assert rows["sersic"]["n"] == 16 and 0 <= rows["sersic"]["converged"] <= 1
    # the manifest: config, versions, every stage with checksummed inputs and outputs
    m = manifest(out)
    assert m["config"]["simulate"]["n"] == 16 and {"galgen", "torch", "galsim"} <= set(m["versions"])
    rec = m["stages"]["fit.vae"]
    assert set(rec["inputs"]) == {"data", "model:@train"} and rec["wall_s"] > 0 and rec["device"] == "cpu"
    import hashlib

    for name, o in rec["outputs"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == o["sha256"], name


def test_second_run_does_no_work(full_run, monkeypatch):
    cfg, out, _ = full_run
    before = manifest(out)["stages"]

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran")

    for mod, name in (("galgen.simulate", "simulate"), ("galgen.train", "train"), ("galgen.inference.fit", "fit_file"),
                      ("galgen.sample", "sample_to_file"), ("galgen.evaluation.quality", "evaluate_models")):
        monkeypatch.setattr(f"{mod}.{name}", refuse)
    result = run_pipeline(cfg, out)
    assert set(result["stages"].values()) == {"skipped"}
    assert manifest(out)["stages"] == before


def test_deleted_output_reruns_that_stage_and_what_uses_it(tmp_path):
    cfg, out = write(tmp_path, SMALL), tmp_path / "run"
    run_pipeline(cfg, out)
    old = manifest(out)["stages"]
    (out / "fits" / "sersic.fits").unlink()
    result = run_pipeline(cfg, out)
    new = manifest(out)["stages"]
    assert result["stages"]["simulate"] == "skipped" and result["stages"]["fit.sersic"] == "ran"
    # the report re-runs exactly when the re-made fit file differs from the one it was made from
    changed = new["fit.sersic"]["outputs"]["fits/sersic.h5"] != old["fit.sersic"]["outputs"]["fits/sersic.h5"]
    assert result["stages"]["report"] == ("ran" if changed else "skipped")
    assert (out / "fits" / "sersic.fits").is_file()


def test_changed_stage_config_reruns_it_and_the_stages_after_it(tmp_path):
    cfg, out = write(tmp_path, SMALL), tmp_path / "run"
    run_pipeline(cfg, out)
    changed = json.loads(json.dumps(SMALL))
    changed["fit"][0]["max_iter"] = 7
    result = run_pipeline(write(tmp_path, changed), out)
    assert result["stages"] == {"simulate": "skipped", "fit.sersic": "ran", "report": "ran"}
    changed["simulate"]["seed"] = 3
    result = run_pipeline(write(tmp_path, changed), out)
    assert result["stages"] == {"simulate": "ran", "fit.sersic": "ran", "report": "ran"}
    changed["report"]["n_grid"] = 3
    result = run_pipeline(write(tmp_path, changed), out)
    assert result["stages"] == {"simulate": "skipped", "fit.sersic": "skipped", "report": "ran"}


def test_killed_stage_completes_on_rerun_equal_to_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = write(tmp_path, SMALL)
    reference = run_pipeline(cfg, tmp_path / "ref")
    out = tmp_path / "run"
    real_fit_map, calls = fit_module.fit_map, []

    def killed_after_two_batches(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a job killed by the scheduler
        calls.append(1)
        return real_fit_map(*args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_map", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, out)
    assert not (out / "fits" / "sersic.h5").exists() and (out / "fits" / "sersic.h5.partial").exists()
    assert set(manifest(out)["stages"]) == {"simulate"}  # the killed stage is not recorded as done
    monkeypatch.setattr(fit_module, "fit_map", real_fit_map)
    result = run_pipeline(cfg, out)
    assert result["stages"] == {"simulate": "skipped", "fit.sersic": "ran", "report": "ran"}
    with h5py.File(out / "fits" / "sersic.h5", "r") as a, h5py.File(tmp_path / "ref" / "fits" / "sersic.h5", "r") as b:
        for key in ("index", "z", "log_scale", "chi2", "model", "normalized_residual"):
            assert np.array_equal(a[key][()], b[key][()]), key
    assert [r["median_chi2_dof"] for r in result["fits"]] == [r["median_chi2_dof"] for r in reference["fits"]]


def test_fit_table_against_the_catalog(full_run):
    _, out, _ = full_run
    (row,) = fit_table({"sersic": out / "fits" / "sersic.h5"})
    cat = Table.read(out / "fits" / "sersic.fits")
    r = np.asarray(cat["chi2_dof"])
    assert row["p16_chi2_dof"] == pytest.approx(np.percentile(r, 16), rel=1e-6)
    assert row["frac_chi2_dof_below_1p2"] == pytest.approx(np.mean(r < 1.2))
    with h5py.File(out / "cutouts.h5", "r") as f:
        truth = Table.read(f, path="catalog")
    flux = np.asarray(truth["flux"])[np.asarray(cat["index"])]
    assert row["median_abs_dflux"] == pytest.approx(np.median(np.abs(np.asarray(cat["flux_map"]) / flux - 1)), rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"fitt": []}, "unknown key(s) ['fitt']"),
    ({"fit": [{"name": "a", "model": "sersic", "samplez": 3}]}, "fit[0]: unknown key(s) ['samplez']"),
    ({"fit": [{"name": "a", "model": "sersic", "samples": "many"}]}, "fit[0].samples: expected an integer"),
    ({"fit": [{"name": "a", "model": "@train"}]}, "fit[0].model: '@train' names the train stage"),
    ({"fit": [{"name": "a", "model": "sdss-vae"}]}, "fit[0].model: model 'sdss-vae' was trained for stamp 64, "
                                                    "the data has 32"),
    ({"fit": [{"name": "a", "model": "sersic"}, {"name": "a", "model": "sersic"}]}, "fit[1].name: 'a' is used twice"),
    ({"fit": [{"name": "a", "model": "no-such-model"}]}, "model 'no-such-model': neither"),
    ({"evaluate": {"models": ["sdss-gan"], "n": "all"}}, "evaluate.n: expected an integer"),
    ({"data": "nowhere.h5"}, "data and simulate: give one source"),
    ({"train": {"model": {"kind": "unicorn"}}}, "train.model.kind must be one of"),
    ({"simulate": None, "data": None}, "needs data"),
    ({"simulate": {"n": 12, "stamp": 32, "morphology": "spirals"}}, "simulate.morphology: one of"),
])
def test_bad_configs_are_refused_before_anything_runs(tmp_path, change, message, capsys):
    cfg = write(tmp_path, {**SMALL, **change})
    with pytest.raises(GalgenInputError) as exc:
        load_config(cfg)
    assert message in str(exc.value) and str(cfg) in str(exc.value)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_cli_prints_where_everything_is(full_run, capsys):
    cfg, out, _ = full_run
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    tail = text.strip().splitlines()[-12:]
    assert tail[-1].split()[-1] == str(out / "report" / "index.html")
    for label, path in (("fit panels", out / "report" / "fit_vae.png"), ("corner plot", out / "report" / "corner_sersic.png"),
                        ("FITS catalog", out / "fits" / "sersic.fits"), ("chi2 table", out / "report" / "fits.md")):
        assert any(line.strip().startswith(label) and line.split()[-1] == str(path) for line in text.splitlines()), label
    assert "median chi2/dof" in text and "chi2_per_pixel" in text


def test_demo_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "pipelines" / "sdss_demo.yaml")
    assert [f.model for f in cfg.fit] == ["sdss-vae", "sersic"] and cfg.report is not None and cfg.fit[1].samples > 0


def test_copy_of_a_run_directory_is_reused(full_run, tmp_path):
    """The manifest's paths are relative: a run directory moved elsewhere is still up to date."""
    cfg, out, _ = full_run
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    result = run_pipeline(cfg, moved)
    assert set(result["stages"].values()) == {"skipped"}
