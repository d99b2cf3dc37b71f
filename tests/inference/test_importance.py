"""Importance-sampled posteriors: PSIS equals arviz's, weighted draws recover an analytic
Gaussian posterior from a deliberately imperfect proposal, Pareto k flags a poor
proposal, and importance-sampled Sersic posteriors agree with NUTS."""


import math

import numpy as np
import pytest
import torch

from galgen.inference.importance import K_HAT_THRESHOLD, importance_sample, psis


def test_psis_matches_arviz():
    az = pytest.importorskip("arviz")
    rng = np.random.default_rng(1)
    lw = rng.standard_t(3, size=(6, 800)) * np.array([0.2, 0.5, 1.0, 1.5, 2.5, 4.0])[:, None]
    ours, k = psis(lw)
    for i in range(len(lw)):
        ref, k_ref = az.psislw(lw[i].copy())
        np.testing.assert_allclose(ours[i], ref, atol=1e-8)
        assert np.isclose(k[i], k_ref)


def _gaussian_target(B=4, k=3, seed=0):
    """Linear-Gaussian posteriors N(mu_b, Sigma_b): the log density as importance_sample calls it."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, k, generator=gen, dtype=torch.float64)
    a = torch.randn(B, k, k, generator=gen, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) + 0.5 * torch.eye(k, dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def log_prob(x, rows=None, chunk=64):
        g = (torch.arange(B * chunk) // chunk) if rows is None else torch.as_tensor(rows) // chunk
        d = x.double() - mu[g]
        return -0.5 * torch.einsum("ni,nij,nj->n", d, prec[g], d)

    return mu, cov, log_prob


def test_weighted_draws_recover_an_analytic_gaussian_posterior():
    mu, cov, log_prob = _gaussian_target()
    B, k = mu.shape
    # an imperfect proposal: shifted by half a sigma, 1.4x too wide
    sd = torch.diagonal(cov, dim1=1, dim2=2).sqrt()
    scale = torch.linalg.cholesky(1.4**2 * cov)
    r = importance_sample(log_prob, mu + 0.5 * sd, scale, draws=4096, samples=2000, chains=2,
                          generator=torch.Generator().manual_seed(3))
    assert r.samples.shape == (B, 2, 2000, k)
    assert (r.pareto_k < K_HAT_THRESHOLD).all()
    draws = r.samples.reshape(B, -1, k).double()
    n_eff = r.ess.double()[:, None]
    err = (draws.mean(1) - mu) / (sd / n_eff.sqrt())
    assert err.abs().max() < 4.5, err  # within MC error of the effective sample size
    emp = torch.stack([torch.cov(d.T) for d in draws])
    assert (emp - cov).abs().max() / cov.abs().max() < 0.12


def test_pareto_k_flags_a_poor_proposal():
    mu, cov, log_prob = _gaussian_target(seed=1)
    narrow = torch.linalg.cholesky(0.2**2 * cov)  # far too narrow: the weights' tail is heavy
    poor = importance_sample(log_prob, mu, narrow, draws=2048, samples=100, df=None, adapt=0,
                             generator=torch.Generator().manual_seed(0))
    good = importance_sample(log_prob, mu, torch.linalg.cholesky(cov), draws=2048, samples=100,
                             generator=torch.Generator().manual_seed(0))
    assert (poor.pareto_k > K_HAT_THRESHOLD).all(), poor.pareto_k
    assert (good.pareto_k < 0.5).all(), good.pareto_k
    assert (poor.ess < 0.2 * good.ess).all()


def test_adaptation_repairs_a_poor_proposal():
    mu, cov, log_prob = _gaussian_target(seed=2)
    narrow = torch.linalg.cholesky(0.5**2 * cov)
    r = importance_sample(log_prob, mu + 0.3, narrow, draws=2048, samples=100, df=None, adapt=2,
                          generator=torch.Generator().manual_seed(0))
    assert (r.pareto_k < K_HAT_THRESHOLD).all(), r.pareto_k


@pytest.mark.slow
def test_importance_sampled_sersic_posteriors_agree_with_nuts():
    from galgen.inference import fit_map, sample_posterior
    from test_lm import _sersic_batch

    model, data, obs = _sersic_batch(3, seed=5)
    res = fit_map(model, data, obs)
    gen = torch.Generator().manual_seed(0)
    a = sample_posterior(model, data, obs, res, samples=500, chains=2, generator=gen, method="is")
    b = sample_posterior(model, data, obs, res, samples=300, chains=4, generator=gen, method="nuts")
    assert (a.method == 2).all() and (b.method == 1).all()
    sa, sb = a.samples.flatten(1, 2).double(), b.samples.flatten(1, 2).double()
    z = (sa.mean(1) - sb.mean(1)) / sb.std(1)
    assert z.abs().max() < 0.25, z  # NUTS: >= 300 effective draws, MC error ~0.06 sd
    ratio = sa.std(1) / sb.std(1)
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio


def test_sample_posterior_refuses_unknown_methods_and_fallbacks():
    from galgen.errors import GalgenInputError
    from galgen.inference import fit_map, sample_posterior
    from test_lm import _sersic_batch

    model, data, obs = _sersic_batch(1)
    res = fit_map(model, data, obs)
    with pytest.raises(GalgenInputError, match="method"):
        sample_posterior(model, data, obs, res, method="gibbs")
    with pytest.raises(GalgenInputError, match="fallback"):
        sample_posterior(model, data, obs, res, method="is", fallback="hmc")


def test_laplace_draws_follow_the_gauss_newton_covariance():
    """``method="laplace"``: unweighted Gaussian draws whose covariance is the inverse Gauss-Newton matrix."""
    from galgen.inference import fit_map, sample_posterior
    from galgen.inference.importance import laplace_approximation
    from test_lm import _sersic_batch

    model, data, obs = _sersic_batch(2, seed=6)
    res = fit_map(model, data, obs)
    mean, tril = laplace_approximation(model, data, obs, res)
    r = sample_posterior(model, data, obs, res, method="laplace", samples=2000, chains=1, draws=2048,
                         generator=torch.Generator().manual_seed(0))
    assert (r.method == 3).all() and torch.isfinite(r.pareto_k).all()
    draws = r.samples[:, 0].double()
    cov = tril @ tril.transpose(1, 2)
    sd = torch.diagonal(cov, dim1=1, dim2=2).sqrt()
    assert ((draws.mean(1) - mean) / sd).abs().max() < 0.15
    emp_sd = draws.std(1)
    assert ((emp_sd / sd) - 1).abs().max() < 0.1


def test_galaxies_draw_until_their_effective_sample_size_is_reached():
    """min_ess: a good proposal stops after `draws`, a poor one keeps drawing (and is done when it reaches it)."""
    mu, cov, log_prob = _gaussian_target(B=3, seed=2)
    widen = torch.tensor([1.0, 3.0, 12.0], dtype=torch.float64)[:, None, None]
    scale = torch.linalg.cholesky(cov) * widen  # exact-ish, 3x and 12x too wide
    r = importance_sample(log_prob, mu, scale, draws=256, samples=100, chains=1, min_ess=200, max_draws=2048,
                          df=None, generator=torch.Generator().manual_seed(0), adapt=0)
    n = r.draws.tolist()
    assert n[0] == 256 and 256 < n[1] < 2048 and n[2] == 2048, n
    assert float(r.ess[1]) >= 180  # (the smoothed ESS; the raw weights' stopped the draws at >= 200)
    assert r.n_proposals == 2048 and r.samples.shape == (3, 1, 100, 3)
    fixed = importance_sample(log_prob, mu, scale, draws=256, samples=100, chains=1, df=None,
                              generator=torch.Generator().manual_seed(0), adapt=0)
    assert fixed.draws.tolist() == [256] * 3 and fixed.n_proposals == 256


def test_galaxies_short_of_min_ess_adapt_their_proposal():
    """min_ess with adapt: a galaxy short of it is proposed again from a proposal adapted to its weighted draws
    (not from the first one), and reaches min_ess in fewer draws than by drawing on from a 12x too wide
    proposal; a good proposal stops after one round; the pooled draws recover the analytic posterior."""
    mu, cov, log_prob = _gaussian_target(B=2, seed=2)
    widen = torch.tensor([1.0, 12.0], dtype=torch.float64)[:, None, None]
    scale = torch.linalg.cholesky(cov) * widen
    kw = dict(draws=256, samples=400, chains=1, min_ess=200, max_draws=4096, df=None)
    a = importance_sample(log_prob, mu, scale, adapt=1, generator=torch.Generator().manual_seed(0), **kw)
    b = importance_sample(log_prob, mu, scale, adapt=0, generator=torch.Generator().manual_seed(0), **kw)
    assert int(a.draws[0]) == 256 and 256 < int(a.draws[1]) < int(b.draws[1]), (a.draws, b.draws)
    assert float(a.ess[1]) >= 200 and float(a.pareto_k[1]) <= K_HAT_THRESHOLD
    x = a.samples[1, 0].double()
    sd = torch.sqrt(torch.diagonal(cov[1]))
    assert torch.all((x.mean(0) - mu[1]).abs() < 4 * sd / math.sqrt(float(a.ess[1])))


def test_adapted_rounds_keep_every_draw():
    """A 12x too wide proposal: the adapted rounds' draws join the first round's, weighted by the mixture of
    the rounds' proposals, and the pooled estimate recovers the analytic posterior with more effective draws
    than the first round alone."""
    mu, cov, log_prob = _gaussian_target(B=1, seed=2)
    scale = torch.linalg.cholesky(cov) * 12.0
    once = importance_sample(log_prob, mu, scale, draws=512, samples=400, chains=1, df=None, adapt=0,
                             generator=torch.Generator().manual_seed(3))
    r = importance_sample(log_prob, mu, scale, draws=512, samples=400, chains=1, df=None, adapt=2,
                          generator=torch.Generator().manual_seed(3))
    assert float(once.pareto_k[0]) > 0.7  # the first round alone is poor
    # no round thrown away: every round's 512 draws are counted (two or three rounds, as k allows)
    assert int(r.draws[0]) in (2 * 512, 3 * 512) and r.n_proposals == 3 * 512
    assert float(r.ess[0]) > 4 * float(once.ess[0])
    assert float(r.pareto_k[0]) <= 0.7
    x = r.samples[0, 0].double()
    sd = torch.sqrt(torch.diagonal(cov[0]))
    assert torch.all((x.mean(0) - mu[0]).abs() < 4 * sd / math.sqrt(float(r.ess[0])) + 0.05 * sd)


def _brute_scale_integral(model, obs, data, z, s_mode, sd, n=4001, span=12.0):
    """``log integral p(x, z, s) ds`` and the conditional mean and sd of ``s``, on a fine grid (float64)."""
    from galgen.inference.fit import posterior_log_prob

    grid = s_mode + sd * torch.linspace(-span, span, n, dtype=torch.float64)
    rows = torch.cat([z.double().expand(n, -1), grid[:, None]], 1)
    lp = posterior_log_prob(model.double(), obs.select(torch.zeros(n, dtype=torch.long)).to(torch.float64),
                            data.double().expand(n, -1, -1))(rows).double()
    h = float(grid[1] - grid[0])
    w = torch.softmax(lp, 0)
    mean = float((w * grid).sum())
    return float(torch.logsumexp(lp, 0)) + math.log(h), mean, float((w * (grid - mean) ** 2).sum().sqrt())


@pytest.mark.parametrize("noise", ["gaussian", "ccd"])
def test_marginal_log_prob_integrates_the_flux_scale_out(noise):
    """Gauss-Hermite about the closed-form conditional mode equals a 4,001-point integral over s, for noise
    whose likelihood is Gaussian in the amplitude and for signal-dependent CCD noise, where it is not."""
    from galgen.inference import fit_map
    from galgen.inference.fit import marginal_log_prob
    from galgen.physics import CCDNoise
    from test_lm import _sersic_batch

    model, data, obs = _sersic_batch(2, seed=3)
    if noise == "ccd":  # sky 400 ADU, gain 4: variance 100 + signal / 4
        obs.noise = CCDNoise(400.0, 4.0, 0.0)
    res = fit_map(model, data, obs)
    gen = torch.Generator().manual_seed(1)
    z = torch.cat([res.z, res.z + 0.05 * torch.randn(res.z.shape, generator=gen)])  # the mode and off it
    lp = marginal_log_prob(model.double(), obs.to(torch.float64), data.double(), chains=2)(z.double())
    for i in range(4):
        g = i // 2
        ref, _, _ = _brute_scale_integral(model, obs.select(torch.tensor([g])), data[g:g + 1], z[i:i + 1],
                                          float(res.log_scale[g]), 0.05)
        assert abs(float(lp[i]) - ref) < 1e-3, (i, float(lp[i]), ref)


def test_log_scale_draws_follow_their_exact_conditional():
    """Each copy of a latent draw gets its own scale, distributed as the grid-integrated conditional."""
    from galgen.inference import fit_map
    from galgen.inference.fit import draw_log_scale
    from test_lm import _sersic_batch

    model, data, obs = _sersic_batch(2, seed=4)
    res = fit_map(model, data, obs)
    n = 4000
    z = res.z[:, None, :].expand(2, n, -1).contiguous()
    s = draw_log_scale(model, obs, data, z, generator=torch.Generator().manual_seed(2)).double()
    for g in range(2):
        _, mean, sd = _brute_scale_integral(model, obs.select(torch.tensor([g])), data[g:g + 1], res.z[g:g + 1],
                                            float(res.log_scale[g]), 0.05)
        assert abs(float(s[g].mean()) - mean) < 4 * sd / math.sqrt(n), (g, float(s[g].mean()), mean)
        assert abs(float(s[g].std()) / sd - 1) < 0.06, (g, float(s[g].std()), sd)


def test_every_treatment_of_the_flux_scale_gives_the_same_posterior():
    """Rao-Blackwellised importance sampling (z proposed, s from its conditional) and the joint proposal of
    (z, s) with s redrawn from its conditional give the posterior moments of the joint sampler within Monte
    Carlo error, where all pass PSIS."""
    from galgen.inference import fit_map, sample_posterior
    from test_lm import _sersic_batch

    model, data, obs = _sersic_batch(3, seed=8)
    res = fit_map(model, data, obs)
    kw = dict(samples=500, chains=2, draws=2048, fallback=None, method="is")
    b = sample_posterior(model, data, obs, res, generator=torch.Generator().manual_seed(1), scale="joint", **kw)
    for i, scale in enumerate(("integrated", "redraw")):
        a = sample_posterior(model, data, obs, res, generator=torch.Generator().manual_seed(2 + i), scale=scale,
                             **kw)
        both = (a.pareto_k <= K_HAT_THRESHOLD) & (b.pareto_k <= K_HAT_THRESHOLD)
        assert both.sum() >= 2, (scale, a.pareto_k, b.pareto_k)
        sa, sb = a.samples[both].flatten(1, 2).double(), b.samples[both].flatten(1, 2).double()
        sd = sb.std(1)
        ess = torch.minimum(a.is_ess, b.is_ess)[both].double()[:, None]
        z = (sa.mean(1) - sb.mean(1)) / (sd * (2 / ess).sqrt())
        assert z.abs().max() < 4.5, (scale, z)
        assert ((sa.std(1) / sd - 1).abs() < 0.12).all(), (scale, sa.std(1) / sd)
    with pytest.raises(Exception, match="scale"):
        sample_posterior(model, data, obs, res, scale="flat", **kw)


def test_adaptation_weights_are_clipped_only_where_few_draws_carry_the_weight():
    """Nonlinear PMC's weights: where fewer than m draws carry the weight, the m largest are set equal
    (so at least m effective draws); elsewhere the weights are only normalised."""
    from galgen.inference.importance import _clipped_log_weights

    rng = np.random.default_rng(0)
    heavy = rng.standard_t(1.5, size=500) * 6.0  # a few draws carry nearly all the weight
    flat = rng.normal(size=500) * 0.1  # about 500 effective draws
    lw = np.stack([heavy, flat, np.r_[heavy[:400], np.full(100, -np.inf)]])
    out = _clipped_log_weights(lw, 40)
    w = np.exp(out)
    np.testing.assert_allclose(w.sum(1), 1.0)
    ess = 1 / (w * w).sum(1)
    w0 = np.exp(lw[0] - lw[0].max())
    assert (w0.sum() ** 2 / (w0 * w0).sum()) < 40 <= ess[0] + 1e-9
    top = np.argsort(-lw[0])[:40]
    np.testing.assert_allclose(w[0, top], w[0, top[0]])  # the 40 largest are equal
    rest = np.setdiff1d(np.arange(500), top)
    np.testing.assert_allclose(w[0, rest] / w[0, top[0]], np.exp(lw[0, rest] - lw[0, top[-1]]))
    np.testing.assert_allclose(w[1], np.exp(lw[1]) / np.exp(lw[1]).sum())  # untouched
    assert np.all(w[2, 400:] == 0) and ess[2] >= 40 - 1e-9  # impossible draws stay impossible


def test_prior_curvature_is_the_fisher_matrix_of_the_flow_base():
    """For a flow prior: J^T J of the map to the base noise (checked against torch.autograd.functional.jacobian),
    positive semi-definite where the exact Hessian of the trained flow is not; for a normal prior, the exact
    Hessian (the identity)."""
    from galgen.inference.lm import prior_curvature
    from galgen.models import standard_normal
    from galgen.runtime import resolve_model

    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior_curvature(standard_normal(3), z), torch.eye(3).expand(4, 3, 3))
    prior = resolve_model("sdss-vae", "cpu").prior()
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    c = prior_curvature(prior, z)
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(lambda v: prior.transform(v[None])[0], z[i])
        torch.testing.assert_close(c[i], jac.T @ jac, rtol=1e-3, atol=1e-3)
    assert (torch.linalg.eigvalsh(c.double()) > -1e-6).all()
    exact = prior_curvature(prior, z, exact=True)
    assert (torch.linalg.eigvalsh(exact.double())[:, 0] < 0).any()  # the flow's log density is not concave
    torch.testing.assert_close(exact, exact.transpose(1, 2), rtol=1e-4, atol=1e-3)
    # upper: PSD and at least both the Gauss-Newton matrix and the exact curvature in every direction
    up = prior_curvature(prior, z, upper=True).double()
    tol = 1e-4 * torch.linalg.eigvalsh(up)[:, -1:]
    for lower in (c.double(), exact.double()):
        assert (torch.linalg.eigvalsh(up - 0.5 * (lower + lower.transpose(1, 2))) > -tol).all()
    assert (torch.linalg.eigvalsh(up - c.double())[:, -1] > 1.0).any()  # the flow is narrower than J^T J says
    torch.testing.assert_close(prior_curvature(standard_normal(3), z[:, :3], upper=True), torch.eye(3).expand(6, 3, 3))


def test_small_adapted_rounds_reach_min_ess_on_a_proposal_too_wide_in_every_direction():
    """A 12-parameter Gaussian posterior, the proposal 2.5x too wide and 1 sd off in every direction (the
    state of the VAE's Laplace proposals): adapted rounds of draws // 4 reach min_ess in fewer draws than
    rounds of draws, and the pooled draws recover the analytic mean and covariance."""
    mu, cov, log_prob = _gaussian_target(B=2, k=12, seed=4)
    sd = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2))
    scale = torch.linalg.cholesky(cov) * 2.5
    kw = dict(draws=1024, samples=1000, chains=1, min_ess=300, max_draws=16384, adapt=1)
    small = importance_sample(log_prob, mu + sd, scale, generator=torch.Generator().manual_seed(0), **kw)
    big = importance_sample(log_prob, mu + sd, scale, round_draws=1024, generator=torch.Generator().manual_seed(0),
                            **kw)
    assert (small.ess >= 300).all() and (small.pareto_k <= K_HAT_THRESHOLD).all(), (small.ess, small.pareto_k)
    assert (small.draws < big.draws).all(), (small.draws, big.draws)
    x = small.samples[:, 0].double()
    err = (x.mean(1) - mu) / (sd / math.sqrt(300))
    assert err.abs().max() < 5, err
    emp = torch.stack([torch.cov(d.T) for d in x])
    assert ((emp - cov).abs().amax((1, 2)) / cov.abs().amax((1, 2)) < 0.3).all()


def test_a_galaxy_hopeless_at_its_efficiency_gives_up_early():
    """give_up: a galaxy whose effective draws per draw could not reach min_ess by max_draws stops after
    give_up draws (instead of drawing on to max_draws); a galaxy on its way to min_ess is not stopped."""
    mu, cov, log_prob = _gaussian_target(B=2, seed=2)
    scale = torch.linalg.cholesky(cov) * torch.tensor([1.5, 1.0], dtype=torch.float64)[:, None, None]
    start = mu.clone()
    start[1] += 40 * torch.diagonal(cov[1]).sqrt()  # 40 sigma off and as narrow as the posterior
    kw = dict(draws=256, samples=100, chains=1, min_ess=200, max_draws=4096, df=None, round_draws=256)
    on = importance_sample(log_prob, start, scale, generator=torch.Generator().manual_seed(0), **kw)
    off = importance_sample(log_prob, start, scale, give_up=768, generator=torch.Generator().manual_seed(0),
                            **kw)
    assert int(on.draws[1]) == 4096 and float(on.ess[1]) < 200, (on.draws, on.ess)  # hopeless all the way
    assert 768 <= int(off.draws[1]) < 1024, off.draws  # stopped at the first check past give_up
    assert int(off.draws[0]) == int(on.draws[0]) and float(off.ess[0]) >= 200


def test_a_held_flux_scale_gives_the_analytic_posterior_of_a_linear_model():
    """scale="fixed": z alone given the flux scale held at the MAP's (0 for fit_map(fit_flux=False)). A
    linear model observed with Gaussian noise has a Gaussian posterior of z with known mean and covariance;
    the draws hold s at 0 and match them within Monte Carlo error. Methods and fallbacks it cannot go with
    are refused."""
    from galgen.inference import fit_map, sample_posterior
    from galgen.physics import GaussianNoise, Observation, gaussian_psf
    from test_calibration import LinearGalaxy

    B, var = 3, 0.5
    model = LinearGalaxy()
    obs = Observation(gaussian_psf(1.0, 9, 1.0), pixel_scale=1.0, stamp=16,
                      noise=GaussianNoise(torch.full((B, 16, 16), var)))
    z_true = torch.tensor([[0.8, -0.4], [-1.1, 0.3], [0.2, 1.2]])
    with torch.no_grad():
        _, observed = obs.observe(model.decode(z_true), generator=torch.Generator().manual_seed(0))
        # the noiseless images of the mean galaxy and of each unit latent: the model is linear in z
        m0 = obs.observe(model.decode(torch.zeros(B, 2)), generator=torch.Generator())[0].double()
        cols = [obs.observe(model.decode(torch.eye(2)[k].expand(B, 2)), generator=torch.Generator())[0].double() - m0
                for k in range(2)]
    a = torch.stack([c.flatten(1) for c in cols], 2)  # (B, pixels, 2)
    prec = a.transpose(1, 2) @ a / var + torch.eye(2, dtype=torch.float64)
    cov = torch.linalg.inv(prec)
    mu = (cov @ (a.transpose(1, 2) @ (observed.double() - m0).flatten(1)[..., None] / var))[..., 0]
    res = fit_map(model, observed, obs, fit_flux=False, max_iter=300)
    assert torch.equal(res.log_scale, torch.zeros(B))
    h = sample_posterior(model, observed, obs, res, samples=1000, chains=2, draws=4096, fallback=None,
                         scale="fixed", generator=torch.Generator().manual_seed(1))
    assert bool((h.samples[..., 2] == 0).all()) and bool((h.pareto_k <= K_HAT_THRESHOLD).all()), h.pareto_k
    z = h.samples[..., :2].flatten(1, 2).double()
    sd = torch.diagonal(cov, dim1=1, dim2=2).sqrt()
    ess = h.is_ess.double()[:, None]
    assert ((z.mean(1) - mu).abs() / (sd / ess.sqrt()) < 4.5).all(), ((z.mean(1) - mu) / sd, ess)
    assert ((z.std(1) / sd - 1).abs() < 0.1).all(), z.std(1) / sd
    with pytest.raises(Exception, match="fallback"):
        sample_posterior(model, observed, obs, res, scale="fixed")
    with pytest.raises(Exception, match="scale"):
        sample_posterior(model, observed, obs, res, scale="fixed", method="nuts")
