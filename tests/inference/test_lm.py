"""The Levenberg-Marquardt MAP fitter: the same optimum as Adam run to convergence, batch
independence (converged galaxies leaving the batch change nothing), forward-mode
derivatives that agree with reverse mode, and whitening that reproduces each noise
model's chi-square."""

import math

import pytest
import torch

from galgen.inference import fit_map
from galgen.models.parametric import SersicModel
from galgen.physics import CCDNoise, CorrelatedGaussianNoise, GaussianNoise, Observation, moffat_psf
from galgen.physics.sersic import render_sersic

S, SCALE = 32, 0.396


def _sersic_batch(n, seed=0):
    """Noisy Sersic galaxies of known parameters, rendered by galgen's own model at random latents."""
    gen = torch.Generator().manual_seed(seed)
    model = SersicModel("sersic", stamp=S, pixel_scale=SCALE)
    theta = torch.zeros(n, model.latent_dim)
    theta[:, 0] = math.log(0.8) + 0.3 * torch.randn(n, generator=gen)
    theta[:, 1:] = 0.5 * torch.randn(n, model.latent_dim - 1, generator=gen)
    psf = moffat_psf(torch.linspace(1.0, 1.6, n), 3.5, 25, SCALE).float()
    obs = Observation(psf, pixel_scale=SCALE, stamp=S, noise=GaussianNoise(torch.full((n, S, S), 25.0)))
    with torch.no_grad():
        clean = obs.noiseless(model.decode(theta) * 8000.0)
    data = obs.noise.sample(clean, generator=gen)
    return model, data, obs


def test_lm_reaches_the_optimum_adam_reaches_when_run_to_convergence():
    model, data, obs = _sersic_batch(6)
    lm = fit_map(model, data, obs, optimizer="lm")
    adam = fit_map(model, data, obs, optimizer="adam", lr=0.02, max_iter=4000, tol=1e-9, patience=50)
    assert (lm.status == 0).all()
    rel = (lm.log_posterior.double() - adam.log_posterior.double()) / adam.log_posterior.double().abs()
    assert rel.abs().max() < 1e-3, rel
    assert (lm.log_posterior.double() >= adam.log_posterior.double() - 1e-2).all()  # never worse than Adam
    assert lm.n_iter.max() <= 40 < adam.n_iter.max()  # second order: a few steps, not hundreds


def test_galaxies_fitted_in_a_batch_equal_galaxies_fitted_alone():
    model, data, obs = _sersic_batch(5, seed=3)
    for opt in ("lm", "adam"):
        batch = fit_map(model, data, obs, optimizer=opt)
        for i in (0, 4):
            alone = fit_map(model, data[i:i + 1], obs.select([i]), optimizer=opt)
            # the same optimum to well within the posterior width (~0.02-0.05 in these units): float
            # reductions differ with the batch size, and so may the step at which a galaxy stops
            assert torch.allclose(batch.z[i], alone.z[0], atol=1e-2, rtol=0), (opt, i, batch.z[i], alone.z[0])
            assert abs(int(batch.n_iter[i]) - int(alone.n_iter[0])) <= (1 if opt == "lm" else 50)
            assert torch.isclose(batch.log_posterior[i], alone.log_posterior[0], rtol=1e-5)


def test_lm_fits_a_deep_decoder_as_well_as_adam(sdss_fit):
    import galgen
    from galgen.data import ObservationLoader

    model = galgen.load_pretrained("sdss-vae").eval()
    b = ObservationLoader(sdss_fit, conditions=model.conditions).batch(list(range(3)))
    lm = fit_map(model, b.observed, b.observation, cond=b.cond, optimizer="lm")
    adam = fit_map(model, b.observed, b.observation, cond=b.cond, optimizer="adam", lr=0.02, max_iter=1500,
                   tol=1e-8, patience=30)
    rel = (lm.log_posterior.double() - adam.log_posterior.double()) / adam.log_posterior.double().abs()
    assert rel.abs().median() < 1e-3, rel
    assert (lm.reduced_chi2 < 1.3).all()


def test_forward_mode_derivatives_of_the_sersic_renderer_match_reverse_mode():
    import torch.autograd.forward_ad as fwAD

    hlr, n = torch.tensor([0.7, 1.3], dtype=torch.float64), torch.tensor([1.0, 3.5], dtype=torch.float64)
    weights = torch.rand(2, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(h, nn):
        return render_sersic(h, nn, 0.1, -0.2, size=24, scale=0.2)

    h_r, n_r = hlr.clone().requires_grad_(), n.clone().requires_grad_()
    (f(h_r, n_r) * weights).sum().backward()
    for tangent_h, tangent_n, ref in ((torch.ones(2, dtype=torch.float64), None, h_r.grad),
                                      (None, torch.ones(2, dtype=torch.float64), n_r.grad)):
        with fwAD.dual_level():
            hh = fwAD.make_dual(hlr, tangent_h) if tangent_h is not None else hlr
            nn = fwAD.make_dual(n, tangent_n) if tangent_n is not None else n
            jvp = fwAD.unpack_dual(f(hh, nn)).tangent
        assert torch.allclose((jvp * weights).sum((1, 2)), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("noise", [
    GaussianNoise(torch.full((2, 8, 8), 4.0),
                  mask=torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.2),
    CCDNoise(sky_level=50.0, gain=2.0, read_noise=3.0),
    CorrelatedGaussianNoise.from_correlation(torch.tensor([[0.0, 0.2, 0.0], [0.2, 1.0, 0.2], [0.0, 0.2, 0.0]]),
                                             (8, 8)),
])
def test_whitened_residuals_give_each_noise_models_chi2(noise):
    gen = torch.Generator().manual_seed(0)
    model = 20 * torch.rand(2, 8, 8, generator=gen)
    data = model + torch.randn(2, 8, 8, generator=gen)
    w = noise.whiten(data - model, model)
    assert torch.allclose((w**2).sum((-2, -1)), noise.chi2(data, model), rtol=1e-5)


def test_unknown_optimizer_is_refused():
    from galgen.errors import GalgenInputError

    model, data, obs = _sersic_batch(1)
    with pytest.raises(GalgenInputError, match="optimizer"):
        fit_map(model, data, obs, optimizer="newton")


def test_map_result_select_keeps_rows_together():
    model, data, obs = _sersic_batch(3, seed=2)
    res = fit_map(model, data, obs)
    sub = res.select([2, 0])
    assert torch.equal(sub.z, res.z[[2, 0]]) and torch.equal(sub.chi2, res.chi2[[2, 0]])
    assert torch.equal(sub.residual[1], res.residual[0]) and sub.wall_time == res.wall_time


def test_auto_optimizer_follows_the_model():
    from galgen.models import LatentModel

    model, data, obs = _sersic_batch(2, seed=4)
    assert model.map_optimizer == "lm" and LatentModel.map_optimizer == "adam"
    auto = fit_map(model, data, obs)
    lm = fit_map(model, data, obs, optimizer="lm")
    assert torch.equal(auto.z, lm.z) and auto.n_iter.max() < 30


def test_central_differences_of_a_deep_decoder_match_forward_mode(sdss_fit):
    """Deep decoders' Gauss-Newton matrix by central differences: the Jacobian within 1e-3 of
    forward mode, the matrix within 1e-2, and the gradient exact (reverse mode) either way."""
    import galgen
    from galgen.data import ObservationLoader
    from galgen.inference.lm import _central_jacobian, _jacobian, gauss_newton

    model = galgen.load_pretrained("sdss-vae").eval()
    assert model.jacobian == "central" and SersicModel.jacobian == "forward"
    b = ObservationLoader(sdss_fit).batch(list(range(3)))
    z = 0.8 * torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base, exact = _jacobian(model, b.observation, z, None)
        fd = _central_jacobian(model, b.observation, z, None)
    s = (b.observed.sum((1, 2)) / base.sum((1, 2))).log()  # the flux of the data
    assert float((fd - exact).norm() / exact.norm()) < 1e-3
    prior = model.prior(None)
    lp_c, g_c, h_c = gauss_newton(model, b.observation, b.observed, z, s, None, prior)
    forward = type(model)(**{k: v for k, v in model.config.items() if k != "kind"})
    forward.load_state_dict(model.state_dict())
    forward.jacobian = "forward"
    with torch.no_grad():
        lp_f, g_f, h_f = gauss_newton(forward.eval(), b.observation, b.observed, z, s, None, forward.prior(None))
    assert torch.allclose(lp_c, lp_f, rtol=1e-5)  # float32 decodes batched differently: ~10 ulp of a 4,096-pixel sum
    assert torch.allclose(g_c, g_f, rtol=1e-3, atol=1e-3 * float(g_f.abs().max()))
    assert float(((h_c - h_f).norm(dim=(1, 2)) / h_f.norm(dim=(1, 2))).max()) < 1e-2


def test_the_gauss_newton_matrix_of_a_flow_prior_holds_its_psd_upper_curvature(sdss_fit):
    """With a flow prior the matrix is the likelihood's Fisher matrix plus the flow's 'upper' curvature
    (checked against the same galaxies with an N(0, I) prior, whose curvature is I), and it is positive
    definite where the likelihood's matrix minus the flow's exact Hessian is not."""
    import galgen
    from galgen.data import ObservationLoader
    from galgen.inference.lm import gauss_newton, prior_curvature
    from galgen.models import standard_normal

    model = galgen.load_pretrained("sdss-vae").eval()
    b = ObservationLoader(sdss_fit).batch(list(range(3)))
    d = model.latent_dim
    z = 1.5 * torch.randn(3, d, generator=torch.Generator().manual_seed(2))
    s = torch.zeros(3)
    flow = model.prior(None)
    _, _, h_flow = gauss_newton(model, b.observation, b.observed, z, s, None, flow)
    _, _, h_unit = gauss_newton(model, b.observation, b.observed, z, s, None, standard_normal(d))
    fisher = h_unit.clone()
    fisher[:, :d, :d] -= torch.eye(d, dtype=fisher.dtype)
    expect = fisher.clone()
    expect[:, :d, :d] += prior_curvature(flow, z, upper=True).double()
    torch.testing.assert_close(h_flow, expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))
    assert (torch.linalg.eigvalsh(h_flow)[:, 0] > 0).all()
    exact = fisher.clone()
    exact[:, :d, :d] += prior_curvature(flow, z, exact=True).double()
    # with the exact Hessian instead, no galaxy's matrix is positive definite (smallest eigenvalues -19 to -80)
    assert (torch.linalg.eigvalsh(0.5 * (exact + exact.transpose(1, 2)))[:, 0] < 0).all()
