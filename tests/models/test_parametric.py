"""SersicModel (Sersic, bulge + disk) against GalSim, and fits with galgen's MAP code.

The renderer it draws with is tested in ``tests/physics/test_sersic.py``.
"""

import math

import galsim
import numpy as np
import pytest
import torch

from galgen.models import sample_latents

from galgen.errors import GalgenInputError
from galgen.inference import fit_map
from galgen.models.parametric import SersicModel
from galgen.physics import GaussianNoise, Observation, psf_from_galsim


def test_observed_bulge_disk_matches_galsim_convolution():
    """Through the physics layer at oversampling 3, against galsim.Convolve(profile, psf).drawImage."""
    S, k, scale = 32, 3, 0.396
    m = SersicModel("bulge-disk", stamp=S, oversampling=k, pixel_scale=scale, fit_centroid=False, pad=S // 2)
    theta = torch.tensor([[np.log(0.4 / 0.6), np.log(0.5), np.log(1.2), 0.0, 0.0, 0.2, -0.1]], dtype=torch.float64)
    p = m.physical(theta)
    psf = galsim.Moffat(beta=3.0, fwhm=1.4)
    prof = galsim.Add([galsim.Sersic(4.0, half_light_radius=float(p["hlr_bulge"]), flux=float(p["bt"])),
                       galsim.Sersic(1.0, half_light_radius=float(p["hlr_disk"]), flux=1 - float(p["bt"]))
                       .shear(g1=float(p["g1_disk"]), g2=float(p["g2_disk"]))])
    ref = galsim.Convolve(prof, psf).drawImage(nx=S, ny=S, scale=scale, use_true_center=False).array
    obs = Observation(psf_from_galsim(psf, 127, scale / k, dtype=torch.float64), pixel_scale=scale,
                      oversampling=k, stamp=S)
    got = obs.noiseless(m.decode(theta))[0].numpy()
    assert np.abs(got - ref).max() / ref.max() < 2e-3
    assert got.sum() == pytest.approx(ref.sum(), rel=2e-3)


@pytest.mark.parametrize("kind", ["sersic", "bulge-disk"])
def test_model_shapes_bounds_and_finite_gradients(kind):
    m = SersicModel(kind, stamp=32, pixel_scale=0.396)
    theta = torch.zeros(3, m.latent_dim, dtype=torch.float64)
    theta[1] = 6.0   # near every bound: n -> 6, B/T -> 1, |g| -> 0.9, offsets -> 2 px
    theta[2] = -6.0
    theta.requires_grad_(True)
    img = m.decode(theta)
    assert img.shape == (3, 32, 32) and bool((img >= 0).all())
    (img.sum() + m.prior().log_prob(theta).sum()).backward()
    assert torch.isfinite(theta.grad).all()
    p = m.physical(theta.detach())
    for key, (lo, hi) in {"n": (0.5, 6.0), "bt": (0.0, 1.0), "dx": (-2.0, 2.0)}.items():
        if key in p:
            assert bool(((p[key] >= lo) & (p[key] <= hi)).all())
    g = p.get("g1", p.get("g1_disk")) ** 2 + p.get("g2", p.get("g2_disk")) ** 2
    assert bool((g < 0.81 + 1e-9).all())
    with pytest.raises(GalgenInputError, match="kind"):
        SersicModel("spiral", stamp=32, pixel_scale=0.4)


def test_map_fit_recovers_a_galsim_galaxy():
    S, scale, var = 48, 0.396, 4.0
    truth = dict(n=1.5, hlr=1.0, g1=0.2, g2=-0.1, flux=3e4)
    psf = galsim.Moffat(beta=3.0, fwhm=1.3)
    gal = galsim.Sersic(truth["n"], half_light_radius=truth["hlr"], flux=truth["flux"]).shear(g1=0.2, g2=-0.1)
    clean = galsim.Convolve(gal, psf).drawImage(nx=S, ny=S, scale=scale, use_true_center=False).array
    rng = np.random.default_rng(0)
    data = torch.tensor(clean + rng.normal(0, np.sqrt(var), size=(4, S, S)), dtype=torch.float32)
    obs = Observation(psf_from_galsim(psf, 33, scale), pixel_scale=scale, stamp=S,
                      noise=GaussianNoise(torch.full((4, S, S), var)))
    m = SersicModel("sersic", stamp=S, pixel_scale=scale)
    res = fit_map(m, data, obs, lr=0.05, max_iter=600, tol=1e-6, patience=20)
    p = m.physical(res.z)
    assert torch.allclose(p["hlr"], torch.tensor(1.0), rtol=0.05), p["hlr"]
    assert torch.allclose(p["n"], torch.tensor(1.5), atol=0.2), p["n"]
    assert torch.allclose(p["g1"], torch.tensor(0.2), atol=0.02) and torch.allclose(p["g2"], torch.tensor(-0.1), atol=0.02)
    assert torch.allclose(res.log_scale.exp(), torch.tensor(3e4), rtol=0.03)
    red = res.reduced_chi2
    assert bool(((red > 0.9) & (red < 1.1)).all()), red


def test_sample_prior_follows_log_prior():
    m = SersicModel("bulge-disk", stamp=32, pixel_scale=0.4)
    th = sample_latents(m.prior(), 40000, generator=torch.Generator().manual_seed(0)).double()
    mu, sd = th.mean(0), th.std(0)
    names = m.param_names
    for i, name in enumerate(names):
        want_mu = math.log(0.8) if name.startswith("log_hlr") else 0.0
        want_sd = 1.5 if name == "t_bt" else 1.0
        assert abs(mu[i] - want_mu) < 0.03 and abs(sd[i] / want_sd - 1) < 0.02, name
    # the density it samples is the one log_prior evaluates: its gradient is the Gaussian score
    x = th[:5].float().requires_grad_(True)
    g, = torch.autograd.grad(m.prior().log_prob(x).sum(), x)
    mu_t, sd_t = m._prior_moments(torch.float32, "cpu")
    assert torch.allclose(g, -(x - mu_t) / sd_t**2, atol=1e-5)


def test_renderer_still_importable_from_the_model_module():
    import galgen.models.parametric as parametric
    import galgen.physics as physics

    assert parametric.render_sersic is physics.render_sersic and parametric.sersic_b is physics.sersic_b
