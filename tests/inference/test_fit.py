"""galgen fit: the fit file, its catalog, resume, shards and bad input."""

import h5py
import numpy as np
import pytest
import torch

from galgen.data import observation_from_cutouts
from galgen.models import sample_latents
from astropy.table import Table

from galgen.cli import main
from galgen.errors import GalgenInputError
from galgen.inference.fit import fit_file
from galgen.models import VAE
from galgen.sharding import Shard
from galgen.train import save_checkpoint

FAST = dict(samples=8, chains=2, warmup=8, n_leapfrog=3, batch_size=24, restarts=0, max_iter=40, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=3, width=8, input_scale=5.0, flux_scale=100.0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint(path, model_state=vae.state_dict(), config={"model": vae.config})


def test_fit_file_contents_and_catalog(tiny_model, sdss_tiny, tmp_path):
    out = fit_file(tiny_model, sdss_tiny, tmp_path / "fit.h5", prior="normal", **FAST)
    with h5py.File(out) as f:
        assert f.attrs["format"] == "galgen-fits" and f.attrs["complete"]
        assert f["samples"].shape == (64, 2, 8, 4) and f["z"].shape == (64, 3)
        resid, model = f["residual"][:], f["model"][:]
        chi2, norm = f["chi2"][:], f["normalized_residual"][:]
        assert np.allclose((norm**2).sum((1, 2)), chi2, rtol=1e-4)
        assert f["posterior_std"].shape == (64, 32, 32) and np.all(f["posterior_std"][:] >= 0)
    with h5py.File(sdss_tiny) as f:
        assert np.allclose(f["observed"][:] - model, resid, atol=1e-3)
    cat = Table.read(tmp_path / "fit.fits")
    assert len(cat) == 64 and set(cat["status_name"]) <= {"converged", "max-iterations", "diverged"}
    assert {"chi2_dof", "rhat_max", "ess_bulk_min", "z_map", "flux_map", "hlr_lo68", "e1_hi95"} <= set(cat.colnames)
    with h5py.File(out) as f:
        dq, draws, dmap, intr = f["derived_quantiles"][:], f["derived_draws"][:], f["derived_map"][:], f["intrinsic"][:]
    assert dq.shape == (64, 4, 5) and draws.shape == (64, 16, 4)
    assert np.all(np.diff(dq, axis=-1) >= -1e-9)  # 2.5 <= 16 <= 50 <= 84 <= 97.5 %
    assert np.allclose(dq[:, :, 2], np.median(draws, axis=1), rtol=1e-5, atol=1e-6)
    assert np.allclose(dmap[:, 0], intr.sum((1, 2)), rtol=1e-5)
    assert np.allclose(cat["hlr_median"], dq[:, 1, 2]) and np.allclose(cat["e2_map"], dmap[:, 3])


@pytest.mark.slow  # 196 s on 2 cores: in `make test-all`; resumability of fits is also covered by test_pipeline
def test_resume_equals_uninterrupted_and_shards(tiny_model, sdss_tiny, tmp_path, monkeypatch):
    straight = fit_file(tiny_model, sdss_tiny, tmp_path / "a.h5", prior="normal", **FAST)
    import galgen.inference.fit as fit_mod

    calls = {"n": 0}
    original = fit_mod.fit_map

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(fit_mod, "fit_map", dying)
    with pytest.raises(KeyboardInterrupt):
        fit_file(tiny_model, sdss_tiny, tmp_path / "b.h5", prior="normal", **FAST)
    monkeypatch.setattr(fit_mod, "fit_map", original)
    with h5py.File(tmp_path / "b.h5.partial") as f:
        assert f.attrs["n_done"] == 24
    resumed = fit_file(tiny_model, sdss_tiny, tmp_path / "b.h5", prior="normal", **FAST)
    with h5py.File(straight) as a, h5py.File(resumed) as b:
        for key in ("z", "chi2", "samples", "posterior_mean"):
            assert np.array_equal(a[key][:], b[key][:]), key
    part = fit_file(tiny_model, sdss_tiny, tmp_path / "s1.h5", prior="normal", shard=Shard(1, 2), **FAST)
    with h5py.File(part) as f:
        assert list(f["index"][:]) == list(range(32, 64))


def test_bad_input(tiny_model, sdss_small, tmp_path, capsys):
    with pytest.raises(GalgenInputError, match="stamp 48"):
        fit_file(tiny_model, sdss_small, tmp_path / "x.h5", **FAST)
    assert main(["fit", "--model", str(tmp_path / "none"), "--data", str(sdss_small), "--out",
                 str(tmp_path / "x.h5")]) == 2
    assert not (tmp_path / "x.h5").exists()


def test_parametric_baseline_through_fit_file(sdss_tiny, tmp_path):
    """``--model sersic``: a Sersic fit of each galaxy; its flux and MAP parameters in the catalog."""
    out = fit_file("sersic", sdss_tiny, tmp_path / "sersic.h5", restarts=0, max_iter=200, batch_size=32,
                   device="cpu")
    cat = Table.read(tmp_path / "sersic.fits")
    with h5py.File(sdss_tiny) as f:
        truth = f["catalog"][:]
        observed, var = f["observed"][:], f["variance"][:]
    with h5py.File(out) as f:
        assert f.attrs["model_kind"] == "sersic" and "log_hlr" in f.attrs["param_names"]
    assert {"param_hlr", "param_n", "param_g1", "param_dx"} <= set(cat.colnames)
    assert np.all((cat["param_n"] >= 0.5) & (cat["param_n"] <= 6.0))
    # the fits explain the data far better than no galaxy at all, and recover the fluxes
    chi2_blank = ((observed**2) / var).sum((1, 2))
    assert np.median(cat["chi2"] / chi2_blank) < 0.1 and np.median(cat["chi2_dof"]) < 1.3
    bright = truth["flux"] > np.median(truth["flux"])
    ratio = cat["flux_map"][bright] / truth["flux"][bright]  # the intrinsic image carries the flux scale
    assert abs(np.median(ratio) - 1) < 0.1, ratio  # in-stamp flux: ~5% is beyond 32 pixels


def test_cli_posterior_with_a_dense_metric(sdss_tiny, tmp_path):
    """``galgen fit --model sersic --samples ... --metric dense`` on one shard: chains and diagnostics written."""
    out = tmp_path / "dense.h5"
    assert main(["fit", "--model", "sersic", "--data", str(sdss_tiny), "--out", str(out), "--shard", "0/16",
                 "--samples", "10", "--chains", "2", "--warmup", "40", "--n-leapfrog", "3", "--metric", "dense",
                 "--posterior", "hmc", "--restarts", "0", "--max-iter", "60", "--device", "cpu"]) == 0
    with h5py.File(out) as f:
        assert f["samples"].shape == (4, 2, 10, 7)
        assert np.all(np.isfinite(f["samples"][:])) and np.all(np.isfinite(f["rhat"][:]))
        assert '"metric": "dense"' in f.attrs["fingerprint"]


def test_cli_posterior_with_nuts(sdss_tiny, tmp_path):
    """``galgen fit --posterior nuts``: chains, diagnostics and the method in the fingerprint; a rerun is a no-op."""
    out = tmp_path / "nuts.h5"
    argv = ["fit", "--model", "sersic", "--data", str(sdss_tiny), "--out", str(out), "--shard", "0/16",
            "--samples", "10", "--chains", "2", "--warmup", "30", "--posterior", "nuts", "--max-depth", "4",
            "--metric", "dense", "--restarts", "0", "--max-iter", "60", "--device", "cpu"]
    assert main(argv) == 0
    with h5py.File(out) as f:
        assert f["samples"].shape == (4, 2, 10, 7)
        assert np.all(np.isfinite(f["samples"][:])) and np.all(np.isfinite(f["rhat"][:]))
        assert '"posterior": "nuts"' in f.attrs["fingerprint"] and '"max_depth": 4' in f.attrs["fingerprint"]
        assert (f["posterior_method"][:] == 1).all()
        before = f["samples"][:]
    mtime = out.stat().st_mtime_ns
    assert main(argv) == 0
    assert out.stat().st_mtime_ns == mtime
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["samples"][:], before)
    with pytest.raises(SystemExit):
        main(argv[:-2] + ["--posterior", "gibbs"])


def test_cli_importance_sampled_posteriors(sdss_tiny, tmp_path):
    """``galgen fit --samples`` (importance sampling by default): draws, PSIS diagnostics and catalog columns."""
    from astropy.table import Table

    out = tmp_path / "is.h5"
    assert main(["fit", "--model", "sersic", "--data", str(sdss_tiny), "--out", str(out), "--shard", "0/8",
                 "--samples", "50", "--chains", "2", "--device", "cpu"]) == 0
    with h5py.File(out) as f:
        n = len(f["index"])
        assert f["samples"].shape == (n, 2, 50, 7)
        method, k = f["posterior_method"][:], f["pareto_k"][:]
        assert set(method) <= {1, 2}  # importance sampling, or NUTS where its diagnostics failed
        assert np.all((k <= 0.7) | (method == 1))
        ess = f["is_ess"][:]
        assert np.all(ess[method == 2] > 100)  # 1024 proposals per galaxy
        lo, hi = f["derived_quantiles"][:, 1, 1], f["derived_quantiles"][:, 1, 3]  # hlr 16-84%
        assert np.all(hi > lo)
    cat = Table.read(out.with_suffix(".fits"))
    assert {"pareto_k", "is_ess", "posterior_method"} <= set(cat.colnames)


def test_cli_fallback_none_keeps_every_importance_sampled_galaxy(sdss_tiny, tmp_path, capsys):
    """``galgen fit --fallback none``: every galaxy keeps its importance-sampled draws (none redrawn by NUTS),
    their diagnostics kept; the choice is part of the fit file's fingerprint; a bad value is refused. The
    summary (fit_summary, printed by the CLI) counts the galaxies by method and flags those with k > 0.7."""
    from galgen.inference import fit_summary
    out = tmp_path / "none.h5"
    argv = ["fit", "--model", "sersic", "--data", str(sdss_tiny), "--out", str(out), "--shard", "1/8",
            "--samples", "20", "--chains", "2", "--device", "cpu", "--min-ess", "0", "--fallback", "none"]
    assert main(argv) == 0
    with h5py.File(out) as f:
        assert (f["posterior_method"][:] == 2).all()
        assert np.isfinite(f["pareto_k"][:]).all() and (f["is_ess"][:] > 0).all()
        assert '"fallback": "none"' in f.attrs["fingerprint"]
        k, index = f["pareto_k"][:], f["index"][:]
    summary = fit_summary(out)
    assert summary["galaxies"] == len(k) and summary["by_method"] == {"is": len(k)}
    assert summary["flagged_index"] == index[k > 0.7].tolist()
    assert f"{summary['flagged']} flagged" in capsys.readouterr().err
    with pytest.raises(GalgenInputError, match="no such fit file"):
        fit_summary(tmp_path / "missing.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(GalgenInputError, match="not a galgen fit file"):
        fit_summary(tmp_path / "other.h5")
    with pytest.raises(GalgenInputError, match="fallback"):
        fit_file("sersic", sdss_tiny, tmp_path / "x.h5", samples=10, fallback="hmc")


def test_posterior_log_prob_of_selected_rows(sdss_tiny):
    """The log posterior of a few rows (how NUTS asks for the chains still moving) equals theirs in the full batch."""
    from galgen.inference import posterior_log_prob
    from galgen.models.parametric import SersicModel
    from galgen.physics import Observation

    obs = observation_from_cutouts(sdss_tiny, range(5))
    model = SersicModel(stamp=32, oversampling=obs.oversampling, pixel_scale=obs.pixel_scale)
    with h5py.File(sdss_tiny) as f:
        observed = torch.as_tensor(f["observed"][:5])
    chains = 3
    x = sample_latents(model.prior(), 5 * chains, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, model.initial_log_scale(observed).repeat_interleave(chains)[:, None]], 1)
    lp = posterior_log_prob(model, obs, observed, chains=chains)
    full = lp(x)
    rows = torch.tensor([14, 0, 7, 8])
    assert torch.allclose(lp(x[rows], rows=rows), full[rows], rtol=1e-5)
    assert torch.isfinite(full).all() and len(set(full.tolist())) == len(full)


def test_seed_latent_vae_fits_with_its_map_prior(sdss_tiny, tmp_path):
    """A flux-shape VAE whose seed parameters are latent coordinates fits with N(0, I) unless
    told otherwise (its map_prior), while it samples from its fitted flow."""
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=10, width=8, input_scale=5.0, decoder="flux-shape", seed_profile="bulge-disk",
              seed_latents=True, log_flux=(float(np.log(3000.0)), 0.5))
    vae.fit_prior(0.3 * torch.randn(512, 10), epochs=2, generator=torch.Generator().manual_seed(0))
    assert vae.map_prior == "normal" and bool(vae.latent_flow.fitted)
    z = torch.randn(4, 10)
    assert not torch.allclose(vae.prior().log_prob(z), vae.with_prior("normal").prior().log_prob(z))  # samples: flow
    path = save_checkpoint(tmp_path / "m.pt", model_state=vae.state_dict(), config={"model": vae.config})
    opts = dict(samples=0, batch_size=8, limit=8, max_iter=4, device="cpu")
    cats = {p: Table.read(fit_file(path, sdss_tiny, tmp_path / f"{p}.h5", prior=p, **opts).with_suffix(".fits"))
            for p in ("normal", "flow", None)}
    assert np.array_equal(cats[None]["chi2"], cats["normal"]["chi2"])
    assert not np.array_equal(cats[None]["chi2"], cats["flow"]["chi2"])


def test_galgen_fit_with_the_flux_scale_held(tiny_model, sdss_tiny, tmp_path):
    """galgen fit --scale fixed: the MAP fits z alone with the flux scale held at 0 and every posterior draw
    holds it there; the setting is in the file's fingerprint, and NUTS does not go with it."""
    out = tmp_path / "fixed.h5"
    assert main(["fit", "--model", str(tiny_model), "--data", str(sdss_tiny), "--out", str(out), "--samples", "8",
                 "--chains", "2", "--scale", "fixed", "--min-ess", "0", "--limit", "8", "--batch-size", "8",
                 "--max-iter", "40", "--device", "cpu", "--prior", "normal"]) == 0
    with h5py.File(out) as f:
        assert np.all(f["log_scale"][:] == 0) and np.all(f["samples"][..., -1] == 0)
        assert np.all(np.isfinite(f["samples"][:])) and np.all(np.isfinite(f["pareto_k"][:]))
        assert '"scale": "fixed"' in f.attrs["fingerprint"]
        assert np.all(f["posterior_method"][:] == 2)  # importance sampling, no NUTS fallback
    free = fit_file(tiny_model, sdss_tiny, tmp_path / "free.h5", prior="normal", limit=8, **{**FAST, "samples": 0})
    with h5py.File(free) as f:
        assert np.any(f["log_scale"][:] != 0)  # the default fits the flux scale
    with pytest.raises(GalgenInputError, match="scale"):
        fit_file(tiny_model, sdss_tiny, tmp_path / "x.h5", samples=8, posterior="nuts", scale="fixed")


def test_the_flux_scale_is_held_only_for_data_in_the_training_units(tiny_model, sdss_tiny, tmp_path):
    """same_flux_units (galgen fit --scale auto): sdss-vae's provenance names simulated SDSS r-band data in ADU
    at zero point 28.25 and 0.396"/pixel; a simulated SDSS file matches, the same file with another zero point,
    flux unit or survey does not, and a model without a provenance never does."""
    import shutil

    from galgen.inference.fit import same_flux_units
    from galgen.runtime import resolve_model

    vae = resolve_model("sdss-vae", "cpu")
    assert same_flux_units(vae, sdss_tiny)
    for key, value in (("zero_point", 27.0), ("flux_unit", "electron"), ("survey", "hst")):
        other = tmp_path / f"{key}.h5"
        shutil.copy(sdss_tiny, other)
        with h5py.File(other, "a") as f:
            f.attrs[key] = value
        assert not same_flux_units(vae, other), key
    built = resolve_model(str(tiny_model), "cpu")
    assert built.provenance == {} and not same_flux_units(built, sdss_tiny)
