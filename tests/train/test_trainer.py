"""The training loop: learning, exact resume, NaN stop, bad configs, bf16, torchrun data parallelism."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from galgen.errors import GalgenInputError, TrainingDiverged
from galgen.models import AutoEncoder
from galgen.train import Trainer, load_checkpoint, load_model, load_run_config, train
from galgen.train.logs import read_log

BASE = {
    "model": {"kind": "ae", "latent_dim": 8, "width": 8},
    "train": {"steps": 6, "batch_size": 8, "lr": 2e-3, "val_fraction": 0.125, "log_every": 1, "val_every": 3,
              "checkpoint_every": 3, "device": "cpu", "seed": 3},
}


def write_config(tmp_path, name="cfg.yaml", **train):
    cfg = {"model": dict(BASE["model"]), "train": {**BASE["train"], **train}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_loss_decreases_and_outputs(sdss_tiny, tmp_path):
    cfg = write_config(tmp_path, steps=40, val_every=20, checkpoint_every=20)
    out = tmp_path / "run"
    summary = train(cfg, sdss_tiny, out)
    log = read_log(out / "train_log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 41))
    first = sum(float(r["loss"]) for r in log[:5]) / 5
    last = sum(float(r["loss"]) for r in log[-5:]) / 5
    assert last < 0.5 * first
    val = read_log(out / "val_log.csv")
    assert [int(r["step"]) for r in val] == [20, 40]
    assert float(val[1]["loss"]) < float(val[0]["loss"])
    for name in ("last.pt", "best.pt", "model.pt", "config.yaml"):
        assert (out / name).exists()
    model = load_model(out)
    assert isinstance(model, AutoEncoder) and model.provenance["n_train"] == 56
    assert model.provenance["data"] == str(Path(sdss_tiny).resolve())
    assert summary["step"] == 40 and summary["model"] == out / "model.pt"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["stamp"] == 32 and resolved["model"]["input_scale"] > 0


def test_resume_is_exact(sdss_tiny, tmp_path):
    cfg = write_config(tmp_path)
    train(cfg, sdss_tiny, tmp_path / "straight")
    train(cfg, sdss_tiny, tmp_path / "resumed", overrides={"steps": 3})
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 3
    with pytest.raises(GalgenInputError, match="--resume"):
        train(cfg, sdss_tiny, tmp_path / "resumed")
    train(cfg, sdss_tiny, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 6
    assert states_equal(a["model"], b["model"])
    assert [r["loss"] for r in read_log(tmp_path / "straight" / "train_log.csv")] == \
        [r["loss"] for r in read_log(tmp_path / "resumed" / "train_log.csv")]
    wall = [float(r["wall_s"]) for r in read_log(tmp_path / "resumed" / "train_log.csv")]
    assert wall == sorted(wall) and wall[0] > 0  # the run's training time, summed over the resume
    # a resume with another trajectory is refused
    with pytest.raises(GalgenInputError, match="lr"):
        train(write_config(tmp_path, "other.yaml", lr=1e-2), sdss_tiny, tmp_path / "resumed", resume=True)


def test_cosine_schedule_logs_decays_and_resumes_exactly(sdss_tiny, tmp_path):
    sched = dict(lr_schedule="cosine", lr_warmup=2, lr_min=1e-4)
    cfg = write_config(tmp_path, **sched)
    train(cfg, sdss_tiny, tmp_path / "straight")
    lrs = [float(r["lr"]) for r in read_log(tmp_path / "straight" / "train_log.csv")]
    # warm-up 1e-3, 2e-3, then a half cosine from 2e-3 to 1e-4 over the remaining 4 steps
    want = [1e-3, 2e-3] + [1e-4 + (2e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    assert lrs == pytest.approx(want, rel=1e-5)
    # a run killed after its step-3 checkpoint ...
    original = Trainer.train_step

    def killed(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", killed)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, sdss_tiny, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 3
    # ... resumes on the same schedule only: the cosine depends on lr_min and on steps
    with pytest.raises(GalgenInputError, match="steps"):
        train(cfg, sdss_tiny, tmp_path / "resumed", resume=True, overrides={"steps": 8})
    with pytest.raises(GalgenInputError, match="lr_"):
        train(write_config(tmp_path, "b.yaml", **{**sched, "lr_min": 0.0}), sdss_tiny, tmp_path / "resumed",
              resume=True)
    train(cfg, sdss_tiny, tmp_path / "resumed", resume=True)
    assert states_equal(load_checkpoint(tmp_path / "straight" / "last.pt")["model"],
                        load_checkpoint(tmp_path / "resumed" / "last.pt")["model"])


def test_schedule_bad_values(sdss_tiny, tmp_path):
    for bad, match in (({"lr_schedule": "step"}, "lr_schedule"), ({"lr_warmup": 6}, "lr_warmup"),
                       ({"lr_min": 1.0}, "lr_min")):
        with pytest.raises(GalgenInputError, match=match):
            train(write_config(tmp_path, **bad), sdss_tiny, tmp_path / "run")


def test_init_fine_tunes_from_another_run(sdss_tiny, tmp_path):
    cfg = write_config(tmp_path, steps=3, val_every=3)
    train(cfg, sdss_tiny, tmp_path / "first")
    first = load_model(tmp_path / "first")
    # zero steps of learning (lr_min = lr = tiny) keeps the initial weights almost exactly
    train(cfg, sdss_tiny, tmp_path / "tuned", overrides={"init": str(tmp_path / "first"), "steps": 1, "lr": 1e-12,
                                                          "val_every": 1, "checkpoint_every": 1})
    tuned = load_model(tmp_path / "tuned")
    for k, v in first.state_dict().items():
        assert torch.allclose(v, tuned.state_dict()[k], atol=1e-8), k
    assert tuned.provenance["init"].endswith("model.pt")
    train(cfg, sdss_tiny, tmp_path / "tuned", resume=True,  # a resumed fine-tuning keeps naming its start
          overrides={"init": str(tmp_path / "first"), "steps": 2, "lr": 1e-12, "val_every": 1, "checkpoint_every": 1})
    assert load_model(tmp_path / "tuned").provenance["init"] == tuned.provenance["init"]
    # a fresh run of the same seed differs: the weights did come from the first run
    train(cfg, sdss_tiny, tmp_path / "fresh", overrides={"steps": 1, "lr": 1e-12, "val_every": 1,
                                                         "checkpoint_every": 1})
    fresh = load_model(tmp_path / "fresh")
    assert not states_equal(fresh.state_dict(), first.state_dict())
    other = tmp_path / "wide.yaml"
    other.write_text(yaml.safe_dump({"model": {**BASE["model"], "width": 16}, "train": BASE["train"]}))
    with pytest.raises(GalgenInputError, match=r"another architecture.*width"):
        train(other, sdss_tiny, tmp_path / "wide", overrides={"init": str(tmp_path / "first")})


def test_nan_stops_and_keeps_last_good_checkpoint(sdss_tiny, tmp_path, monkeypatch):
    original = AutoEncoder.training_step

    def poisoned(self, batch, optimizers, step, sync):
        metrics = original(self, batch, optimizers, step, sync)
        if step == 4:
            metrics["loss"] = torch.tensor(float("nan"))
        return metrics

    monkeypatch.setattr(AutoEncoder, "training_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 4.*last.pt"):
        train(write_config(tmp_path), sdss_tiny, out)
    assert load_checkpoint(out / "last.pt")["step"] == 3
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("cfg, match", [
    ({"model": {"kind": "vae2"}}, "model.kind"),
    ({"model": {"kind": "ae"}, "train": {"stepz": 3}}, "unknown key"),
    ({"model": {"kind": "ae"}, "train": {"steps": "many"}}, "train.steps: expected an integer"),
    ({"model": {"kind": "ae"}, "train": {"steps": 0}}, "steps: must be >= 1"),
    ({"model": {"kind": "ae"}, "train": {"precision": "fp8"}}, "precision"),
    ({"model": {"kind": "ae", "stamp": 64}, "train": {"device": "cpu"}}, "model.stamp: 64 does not match"),
    ({"model": {"kind": "ae", "latent_size": 4}, "train": {"device": "cpu"}}, "bad ae model option"),
    ({"model": {"kind": "ae"}, "train": {"batch_size": 512, "device": "cpu"}}, "larger than the"),
    ({"model": {"kind": "ae"}, "train": {"device": "cuda:7"}}, "device"),
])
def test_bad_configs(sdss_tiny, tmp_path, cfg, match):
    if "cuda" in str(cfg) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(GalgenInputError, match=match):
        train(path, sdss_tiny, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_and_unsafe_inputs(sdss_tiny, tmp_path):
    with pytest.raises(GalgenInputError, match="no such configuration"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(GalgenInputError, match="nothing to resume"):
        train(write_config(tmp_path), sdss_tiny, tmp_path / "fresh", resume=True)
    (tmp_path / "bad.yaml").write_text("model: !!python/object:os.system {}\n")
    with pytest.raises(GalgenInputError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


def test_bf16_autocast_step_runs_on_cpu(sdss_tiny, tmp_path):
    out = tmp_path / "run"
    train(write_config(tmp_path, steps=2, precision="bf16", val_every=2, checkpoint_every=2), sdss_tiny, out)
    log = read_log(out / "train_log.csv")
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in log)


def test_torchrun_two_processes_match_one(sdss_tiny, tmp_path):
    """Two gloo processes, each on half of every batch, take the same steps as one on the full batch."""
    # SGD: the update is linear in the gradient, so the comparison is to float precision (Adam's
    # first steps are ~lr*sign(g) and amplify round-off in gradients that are zero in exact
    # arithmetic, e.g. the bias before a GroupNorm).
    cfg = write_config(tmp_path, steps=3, val_every=3, checkpoint_every=3, lr=1e-7, optimizer={"name": "sgd"})
    train(cfg, sdss_tiny, tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "galgen", "train", "--config", str(cfg), "--data", str(sdss_tiny), "--out", str(tmp_path / "two"),
           "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[:4000]
    a = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    assert a.keys() == b.keys()
    torch.manual_seed(3)  # the trainer's initial weights
    init = AutoEncoder.from_config(load_checkpoint(tmp_path / "one" / "last.pt")["config"]["model"]).state_dict()
    for k in a:
        if not a[k].numel():
            continue
        step = (a[k] - init[k]).abs().max()
        assert float((a[k] - b[k]).abs().max()) <= 1e-3 * float(step) + 1e-7, k
    assert max(float((a[k] - init[k]).abs().max()) for k in a if a[k].numel()) > 1e-4  # training moved the weights


def test_conditional_training_stores_condition_statistics(sdss_tiny, tmp_path):
    from astropy.table import Table

    from galgen.sample import sample_to_file
    from galgen.train import split_indices

    cfg = {"model": {"kind": "vae", "latent_dim": 4, "width": 8, "conditions": ["mag", "hlr"]},
           "train": {**BASE["train"], "steps": 4, "val_every": 4, "checkpoint_every": 4, "prior_epochs": 2}}
    path = tmp_path / "cond.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    train(path, sdss_tiny, out)
    model = load_model(out)
    cat = Table.read(sdss_tiny, path="catalog")
    tr, _ = split_indices(len(cat), 0.125, seed=3)
    expect = torch.tensor([cat["mag"][tr].mean(), cat["hlr"][tr].mean()], dtype=torch.float32)
    assert model.conditions == ("mag", "hlr")
    assert torch.allclose(model.cond_mean, expect, rtol=1e-5)
    s = sample_to_file(out, tmp_path / "s.h5", n=4, cond="mag=16.5,hlr=1.5", device="cpu")
    assert Table.read(s, path="catalog")["cond_mag"][0] == 16.5
    # the trainer stored the training galaxies' conditions: sampling without --cond draws
    # rows of them (recorded in the catalog), the same rows again on a rerun
    train_rows = {(round(float(m), 4), round(float(h), 4)) for m, h in zip(cat["mag"][tr], cat["hlr"][tr])}
    bank = {(round(float(m), 4), round(float(h), 4)) for m, h in model.cond_bank.tolist()}
    assert bank == train_rows
    drawn = Table.read(sample_to_file(out, tmp_path / "t.h5", n=6, seed=2, device="cpu", batch_size=4),
                       path="catalog")
    pairs = {(round(float(m), 4), round(float(h), 4)) for m, h in zip(drawn["cond_mag"], drawn["cond_hlr"])}
    assert pairs <= train_rows and len(pairs) > 1
    again = Table.read(sample_to_file(out, tmp_path / "u.h5", n=6, seed=2, device="cpu", batch_size=4),
                       path="catalog")
    assert list(again["cond_mag"]) == list(drawn["cond_mag"])
    fresh = type(model).from_config(model.config)  # never trained: no conditions to draw from
    with pytest.raises(GalgenInputError, match="--cond mag=...,hlr=..."):
        fresh.sample(2)
    # fine-tuned from it on other training galaxies (another split), the model keeps the
    # standardisation its weights learned with and stores the new training set's rows
    path.write_text(yaml.safe_dump({"model": cfg["model"], "train": {**cfg["train"], "seed": 7, "init": str(out)}}))
    train(path, sdss_tiny, tmp_path / "tuned")
    tuned = load_model(tmp_path / "tuned")
    tr7, _ = split_indices(len(cat), 0.125, seed=7)
    rows7 = {(round(float(m), 4), round(float(h), 4)) for m, h in zip(cat["mag"][tr7], cat["hlr"][tr7])}
    assert rows7 != train_rows
    assert torch.equal(tuned.cond_mean, model.cond_mean) and torch.equal(tuned.cond_std, model.cond_std)
    assert {(round(float(m), 4), round(float(h), 4)) for m, h in tuned.cond_bank.tolist()} == rows7


GAN_MODEL = {"kind": "gan", "latent_dim": 4, "width": 4, "r1_gamma": 0.1, "r1_every": 2, "ema": 0.9}


def test_gan_resume_is_exact_and_validation_reports_distances(sdss_tiny, tmp_path):
    """The GAN recipe (spectral-norm power iterations, lazy R1, EMA) resumes bit for bit; each
    validation logs the KS distances of flux, HSM size and |e| of generated vs held-out
    observed galaxies, uses their mean as the loss, and writes a sample grid."""
    cfg = tmp_path / "gan.yaml"
    cfg.write_text(yaml.safe_dump({"model": GAN_MODEL, "train": {**BASE["train"], "lr": 1e-3}}))
    train(cfg, sdss_tiny, tmp_path / "straight")
    train(cfg, sdss_tiny, tmp_path / "resumed", overrides={"steps": 3})
    train(cfg, sdss_tiny, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["step"] == b["step"] == 6
    assert any("generator_ema" in k for k in a["model"]) and any("_u" in k for k in a["model"])
    assert states_equal(a["model"], b["model"])
    assert a["config"]["model"]["log_flux"][1] > 0  # filled in from the data
    val = read_log(tmp_path / "straight" / "val_log.csv")
    assert [int(r["step"]) for r in val] == [3, 6]
    for r in val:
        ks = [float(r[k]) for k in ("ks_flux", "ks_sigma", "ks_e")]
        assert all(0 <= v <= 1 for v in ks)
        assert float(r["loss"]) == pytest.approx(sum(ks) / 3, abs=1e-5)
    assert val == read_log(tmp_path / "resumed" / "val_log.csv")
    assert sorted(p.name for p in (tmp_path / "straight" / "val_samples").iterdir()) == \
        ["step_000003.png", "step_000006.png"]
    model = load_model(tmp_path / "straight")
    assert model.kind == "gan" and model.sample(2).shape == (2, 32, 32)


def test_depth_factors_are_log_uniform_and_cap_the_signal_to_noise(sdss_tiny):
    from galgen.data import ObservationLoader
    from galgen.train.trainer import depth_factors

    batch = ObservationLoader(sdss_tiny).batch(torch.arange(64))
    torch.manual_seed(0)
    many = torch.cat([depth_factors(batch, 40.0) for _ in range(200)])
    assert float(many.min()) >= 1 and float(many.max()) <= 40
    u = many.log() / math.log(40)  # uniform on [0, 1]
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.all(depth_factors(batch, 40.0, deepest=40.0) == 40)  # the curriculum's first step
    mid = torch.cat([depth_factors(batch, 40.0, deepest=4.0) for _ in range(50)])
    assert float(mid.min()) >= 4 * (1 - 1e-6) and float(mid.max()) <= 40
    noise = batch.observation.noise
    snr = (noise.chi2(batch.observed, torch.zeros_like(batch.observed)) - 32 * 32).clamp(min=0).sqrt()
    cap = float(snr.median())
    f = torch.stack([depth_factors(batch, 1e6, snr_cap=cap) for _ in range(20)])
    bright = snr > cap
    # a bright galaxy is seen at least as shallow as brings it to the cap, never a faint one for that reason
    assert torch.all(f[:, bright] >= (snr[bright] / cap) ** 2 * (1 - 1e-5))
    shallow = batch.shallower((snr / cap).clamp(min=1) ** 2)
    snr_after = (shallow.observation.noise.chi2(shallow.observed, torch.zeros_like(batch.observed))
                 - 32 * 32).clamp(min=0).sqrt()
    assert torch.all(snr_after[bright] < 1.5 * cap) and float(snr_after[bright].median()) > 0.6 * cap


def test_training_on_a_mixture_of_depths_resumes_exactly_and_differs_from_the_files_depth(sdss_tiny, tmp_path):
    mix = dict(depth_mix=10.0, snr_cap=50.0, depth_mix_steps=4)
    cfg = write_config(tmp_path, **mix)
    train(cfg, sdss_tiny, tmp_path / "straight")
    train(cfg, sdss_tiny, tmp_path / "resumed", overrides={"steps": 3})
    train(cfg, sdss_tiny, tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert states_equal(a["model"], b["model"])
    train(write_config(tmp_path, "plain.yaml"), sdss_tiny, tmp_path / "plain")
    plain = [r["loss"] for r in read_log(tmp_path / "plain" / "train_log.csv")]
    mixed = [r["loss"] for r in read_log(tmp_path / "straight" / "train_log.csv")]
    assert plain[0] != mixed[0]  # the same first batch, seen shallower
    for bad, match in (({"depth_mix": 0.5}, "depth_mix: must be >= 1"), ({"snr_cap": -1.0}, "snr_cap: must be > 0"),
                       ({"depth_mix_steps": -1}, "depth_mix_steps: must be >= 0")):
        with pytest.raises(GalgenInputError, match=match):
            train(write_config(tmp_path, "bad.yaml", **bad), sdss_tiny, tmp_path / "bad")


def test_a_vae_records_the_noise_its_encoder_was_trained_on(sdss_tiny, tmp_path):
    from galgen.train.data import TrainingData
    import numpy as np

    rms = TrainingData(sdss_tiny, np.arange(64)).statistics()["noise_rms"]
    cfg = {"model": {"kind": "vae", "latent_dim": 4, "width": 4, "input_scale": 3 * rms},
           "train": {**BASE["train"], "steps": 1}}
    path = tmp_path / "vae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(path, sdss_tiny, tmp_path / "vae")
    model = load_model(tmp_path / "vae")
    assert model.input_scale == pytest.approx(3 * rms, rel=1e-5)
    assert model.encoder_noise_rms == pytest.approx(rms, rel=0.02)  # the file's (training split), not input_scale
    del cfg["model"]["input_scale"]
    path.write_text(yaml.safe_dump(cfg))
    train(path, sdss_tiny, tmp_path / "vae2")
    model = load_model(tmp_path / "vae2")
    assert model.encoder_noise_rms == model.input_scale and "encoder_noise_rms" not in model.config


def test_a_depth_mixed_vae_fits_its_prior_to_codes_of_galaxies_at_the_training_depths(sdss_tiny, tmp_path):
    import numpy as np

    from galgen.models import VAE
    from galgen.train import TrainConfig, TrainingData

    data = TrainingData(sdss_tiny, np.arange(48))
    model = VAE(32, latent_dim=4, width=4)
    cfg = TrainConfig(steps=1, batch_size=16, device="cpu", depth_mix=10.0, prior_epochs=1)
    trainer = Trainer(model, data, None, cfg, tmp_path / "run")
    torch.manual_seed(0)
    seen = list(trainer._prior_batches())
    assert sum(len(b) for b in seen) == 48
    file_var = data.batch(torch.arange(48)).observation.noise.variance_map
    ratio = torch.cat([b.observation.noise.variance_map for b in seen]) / file_var
    per_galaxy = ratio.flatten(1)
    assert torch.allclose(per_galaxy, per_galaxy[:, :1].expand_as(per_galaxy), rtol=1e-5)  # one factor each
    assert float(per_galaxy.min()) >= 1 - 1e-6 and float(per_galaxy.max()) <= 10 * (1 + 1e-6)
    assert float(per_galaxy[:, 0].std()) > 0.5  # a mixture, not one depth
    assert trainer.finish() is not None and bool(trainer.model.latent_flow.fitted)


def test_a_vae_can_fit_its_prior_to_the_training_galaxies_map_codes(sdss_tiny, tmp_path, caplog):
    """prior_codes: map: the flow is fitted to each training galaxy's MAP code (one code per
    galaxy, as map_codes gives them), not to draws of q(z|x); a bad value is a clear error."""
    import logging

    import numpy as np

    from galgen.inference import map_codes
    from galgen.models import VAE
    from galgen.train import TrainConfig, TrainingData

    data = TrainingData(sdss_tiny, np.arange(32))
    torch.manual_seed(0)
    model = VAE(32, latent_dim=4, width=4)
    cfg = TrainConfig(steps=1, batch_size=16, device="cpu", prior_epochs=1, prior_codes="map", prior_map_steps=5)
    trainer = Trainer(model, data, None, cfg, tmp_path / "run")
    expect, _ = map_codes(model.eval(), trainer._prior_batches(), max_iter=5)
    fitted = {}
    model.latent_flow.fit = lambda z, ctx=None, **kw: fitted.setdefault("codes", z) is None or {}
    with caplog.at_level(logging.INFO, logger="galgen.train"):
        trainer.finish()
    assert fitted["codes"].shape == (32, 4) and torch.allclose(fitted["codes"], expect, atol=1e-5)
    assert any("map_codes: 32 galaxies" in r.getMessage() for r in caplog.records)
    with pytest.raises(GalgenInputError, match="prior_codes"):
        TrainConfig(prior_codes="mean").check()
