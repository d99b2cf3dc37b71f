"""Simulation-based calibration: coverage and rank uniformity on a model with a known prior."""

import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.inference.calibration import coverage, rank_uniformity, simulation_based_calibration
from galgen.models import LatentModel, sample_latents, standard_normal
from galgen.physics import GaussianNoise, Observation, gaussian_psf


class LinearGalaxy(LatentModel):
    """intrinsic = blob + z0 * (elongation pattern) + z1 * (size pattern), z ~ N(0, I): a user's own model."""

    latent_dim = 2

    def __init__(self, size=16):
        super().__init__()
        y, x = torch.meshgrid(torch.arange(size) - size // 2.0, torch.arange(size) - size // 2.0, indexing="ij")
        r2 = (x**2 + y**2) / 2.5**2
        blob = 600 * torch.exp(-r2 / 2) / (2 * torch.pi * 2.5**2)
        self.register_buffer("basis", torch.stack([blob, 0.25 * blob * (x**2 - y**2) / 2.5**2,
                                                   0.15 * blob * (r2 - 2)]).reshape(3, -1))
        self.size = size

    def decode(self, z, cond=None):
        return (self.basis[0] + z @ self.basis[1:]).view(-1, self.size, self.size)

    def prior(self, cond=None):
        return standard_normal(2, device=self.basis.device)


def test_sbc_of_a_linear_model_is_calibrated():
    B = 200
    obs = Observation(gaussian_psf(1.0, 9, 1.0), pixel_scale=1.0, stamp=16,
                      noise=GaussianNoise(torch.full((B, 16, 16), 0.5)))
    res = simulation_based_calibration(LinearGalaxy(), obs, samples=100, chains=2, warmup=100, n_leapfrog=6,
                                       n_draws=199, max_iter=200, seed=3)
    assert res["ranks"].shape == (B, 6) and res["names"][:4] == ["flux", "hlr", "e1", "e2"]
    assert np.all((res["ranks"] >= 0) & (res["ranks"] <= 199))
    for lev, (frac, nominal, se) in coverage(res["ranks"], 199).items():
        assert nominal == pytest.approx(lev)
        assert np.all(np.abs(frac - lev) < 3.5 * se), (lev, frac)
    _, p = rank_uniformity(res["ranks"], 199, bins=8)
    assert np.all(p > 1e-3), p


def test_miscalibrated_posterior_is_caught():
    """Draws twice too narrow: coverage and rank tests must fail."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(2000, 1))
    x = mu + rng.normal(size=mu.shape)
    narrow = x[:, None] / 2 + 0.5 * np.sqrt(0.5) * rng.normal(size=(2000, 199, 1))
    ranks = (narrow < mu[:, None]).sum(1)
    frac, nominal, se = coverage(ranks, 199)[0.68]
    assert frac[0] < nominal - 5 * se
    assert rank_uniformity(ranks, 199)[1][0] < 1e-6


def test_needs_per_galaxy_observation():
    obs = Observation(gaussian_psf(1.0, 9, 1.0), pixel_scale=1.0, stamp=16, noise=GaussianNoise(torch.ones(16, 16)))
    with pytest.raises(GalgenInputError, match="per-galaxy"):
        simulation_based_calibration(LinearGalaxy(), obs)


def test_sbc_of_the_sersic_model_draws_from_its_prior_at_given_fluxes():
    """A parametric model: parameters from its prior, the flux given, latents named by the model."""
    from galgen.models.parametric import SersicModel

    B = 6
    model = SersicModel("sersic", stamp=24, pixel_scale=0.4)
    obs = Observation(gaussian_psf(1.2, 11, 0.4), pixel_scale=0.4, stamp=24,
                      noise=GaussianNoise(torch.full((B, 24, 24), 4.0)))
    log_scale = torch.log(torch.linspace(2e3, 2e4, B))
    res = simulation_based_calibration(model, obs, samples=60, chains=2, warmup=40, n_leapfrog=4, n_draws=99,
                                       max_iter=60, log_scale=log_scale, seed=1, latent_names=model.latent_names)
    assert res["names"] == ["flux", "hlr", "e1", "e2"] + model.param_names
    truth = torch.as_tensor(res["truth"])
    # true flux: the given total times the in-stamp fraction of the unit-flux render
    frac = torch.as_tensor(res["truth"][:, 0]) / log_scale.exp().double()
    assert torch.all((frac > 0.3) & (frac <= 1.0 + 1e-4))
    assert torch.equal(truth[:, 4:].float(), sample_latents(model.prior(), B, generator=torch.Generator().manual_seed(1)))
    assert np.all((res["ranks"] >= 0) & (res["ranks"] <= 99))
    with pytest.raises(GalgenInputError, match="log_scale"):
        simulation_based_calibration(model, obs, samples=5, chains=1, warmup=5, n_draws=4, max_iter=2,
                                     log_scale=torch.zeros(B + 1))


def test_sbc_pipeline_shards_resume_and_report(sdss_tiny, tmp_path, monkeypatch):
    """pipelines/sbc.py: two shards together give the unsharded run's ranks; --report-only runs nothing."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[2] / "pipelines" / "sbc.py")

    def sbc(out, *extra):
        argv = ["sbc.py", "--model", "sersic", "--data", str(sdss_tiny), "--n", "2", "--batch-size", "1",
                "--samples", "50", "--chains", "4", "--warmup", "10", "--n-leapfrog", "2", "--out", str(out), *extra]
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(script, run_name="__main__")
        return json.loads((out / "sbc.json").read_text())

    sharded = tmp_path / "sharded"
    assert sbc(sharded, "--shard", "1/2")["n"] == 1  # batch 1 only
    assert sorted(p.name for p in sharded.glob("batch*.npz")) == ["batch0001.npz"]
    first = (sharded / "batch0001.npz").stat().st_mtime_ns
    assert sbc(sharded, "--shard", "0/2")["n"] == 2  # batch 0, and batch 1 read back
    assert (sharded / "batch0001.npz").stat().st_mtime_ns == first
    report = sbc(sharded, "--report-only")
    assert report["n"] == 2 and (sharded / "sbc.png").exists()
    whole = sbc(tmp_path / "whole")
    for b in ("batch0000.npz", "batch0001.npz"):
        np.testing.assert_array_equal(np.load(sharded / b)["ranks"], np.load(tmp_path / "whole" / b)["ranks"])
    assert report["coverage"] == whole["coverage"]
    with pytest.raises(SystemExit, match="no batches"):
        sbc(tmp_path / "empty", "--report-only")
