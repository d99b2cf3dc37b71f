"""Amortised posterior proposals: features, training, defensive-mixture importance sampling, storage."""

import math

import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.inference import sample_posterior
from galgen.inference.amortized import (AmortizedPosterior, amortized_proposal, attach_amortized_posterior,
                                        attached_amortized_posterior, load_amortized_posterior,
                                        observation_features, train_amortized_posterior)
from galgen.inference.importance import importance_sample
from galgen.physics import GaussianNoise, Observation, gaussian_psf

from test_calibration import LinearGalaxy


def _pool(n=64, size=16, sigma=0.5):
    psfs = torch.stack([gaussian_psf(f, 9, 1.0) for f in torch.linspace(0.8, 1.6, n).tolist()])
    var = torch.full((n, size, size), sigma**2)
    return Observation(psfs, pixel_scale=1.0, stamp=size, noise=GaussianNoise(var))


def test_observation_features_measure_the_psf_and_the_noise():
    import galsim

    fwhm = 1.3
    psf = galsim.Gaussian(fwhm=fwhm).shear(g1=0.2, g2=-0.1)
    img = torch.as_tensor(psf.drawImage(nx=25, ny=25, scale=0.2, method="no_pixel").array, dtype=torch.float64)
    var = torch.full((2, 16, 16), 4.0)
    obs = Observation(torch.stack([img, img.T.contiguous()]), pixel_scale=0.4, oversampling=2, stamp=16,
                      noise=GaussianNoise(var))
    observed = torch.zeros(2, 16, 16)
    observed[:, 8, 8] = 32.0
    image, scalars = observation_features(observed, obs)
    assert torch.allclose(scalars[:, 0], torch.full((2,), math.log(2.0)))  # log sigma
    assert torch.allclose(scalars[:, 1], torch.asinh(torch.tensor(32.0 / (2.0 * 16))).expand(2))
    # a sheared Gaussian keeps its area: (Ixx + Iyy) / 2 = sigma^2 / sqrt(1 - |e|^2), e the distortion
    g = complex(0.2, -0.1)
    e = 2 * g / (1 + abs(g) ** 2)
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    size = sigma * (1 / math.sqrt(1 - abs(e) ** 2)) ** 0.5
    assert scalars[0, 2].item() == pytest.approx(size, rel=0.02)
    assert scalars[0, 3].item() == pytest.approx(e.real, abs=0.01)
    assert scalars[0, 4].item() == pytest.approx(e.imag, abs=0.01)
    assert scalars[1, 3].item() == pytest.approx(-e.real, abs=0.01)  # the transpose swaps the axes
    assert torch.allclose(image, torch.asinh(observed / 6.0))


def test_a_trained_flow_learns_the_posterior_of_a_linear_model():
    torch.manual_seed(0)
    model = LinearGalaxy()
    pool = _pool()
    q = train_amortized_posterior(model, pool, steps=300, batch_size=128, bank=4096, lr=3e-3, seed=1,
                                  width=4, embed=16, context=16, transforms=2, hidden=(32,), log_scale_sd=0.3)
    assert int(q.trained_steps) == 300
    fresh = AmortizedPosterior(16, 2, width=4, embed=16, context=16, transforms=2, hidden=(32,), log_scale_sd=0.3)
    fresh.load_state_dict({k: v for k, v in q.state_dict().items() if k.startswith(("feature_", "flow.z_"))},
                          strict=False)  # same standardisation, untrained networks
    gen = torch.Generator().manual_seed(7)
    n = 256
    obs = pool.select(torch.randint(len(pool.psf), (n,), generator=gen))
    z = torch.randn(n, 2, generator=gen)
    s = 0.3 * torch.randn(n, generator=gen)
    with torch.no_grad():
        _, observed = obs.observe(model.decode(z) * s.exp()[:, None, None], generator=gen)
        truth = torch.cat([z, s[:, None]], 1)
        lq = q.log_prob(truth, q.context(model, observed, obs)).mean()
        lq0 = fresh.log_prob(truth, fresh.context(model, observed, obs)).mean()
    prior = (-0.5 * (z**2).sum(1) - math.log(2 * math.pi) - 0.5 * (s / 0.3) ** 2
             - math.log(0.3 * math.sqrt(2 * math.pi))).mean()
    # the truth is far more probable under the trained posterior than under the prior (the
    # images constrain z and s to a few percent of their prior widths); an untrained flow is not
    assert float(lq - prior) > 4.0, (float(lq), float(prior))
    assert float(lq0 - prior) < 1.0


def _bimodal(x):
    """log density of 0.3 N((-3, 0), 0.5^2 I) + 0.7 N((3, 0), 0.5^2 I), x (N, 2)."""
    a = -((x - torch.tensor([-3.0, 0.0])) ** 2).sum(1) / (2 * 0.25)
    b = -((x - torch.tensor([3.0, 0.0])) ** 2).sum(1) / (2 * 0.25)
    return torch.logaddexp(math.log(0.3) + a, math.log(0.7) + b) - math.log(2 * math.pi * 0.25)


class _Wide:
    """A proposal covering both modes: N((0, 0), diag(3.5^2, 1)) for every galaxy."""

    scale = torch.tensor([3.5, 1.0], dtype=torch.float64)

    def draw(self, idx, n, generator=None):
        eps = torch.randn(len(idx), n, 2, generator=generator, dtype=torch.float64)
        return eps * self.scale, self.log_prob(idx, eps * self.scale)

    def log_prob(self, idx, x):
        return (-0.5 * (x / self.scale) ** 2 - 0.5 * math.log(2 * math.pi) - self.scale.log()).sum(-1)


def test_a_mixture_with_a_covering_proposal_finds_the_second_mode():
    """The Laplace t about one mode misses the other; the defensive mixture recovers the mode weights."""
    B = 4
    mean = torch.tensor([[-3.0, 0.0]] * B, dtype=torch.float64)  # the Laplace approximation of the minor mode
    tril = 0.5 * torch.eye(2, dtype=torch.float64).expand(B, 2, 2)

    def log_prob(x, rows=None):
        return _bimodal(x)

    def weight_of_right_mode(proposal):
        r = importance_sample(log_prob, mean, tril, draws=2048, samples=500, chains=2, adapt=0,
                              generator=torch.Generator().manual_seed(3), proposal=proposal, mix=0.8)
        return (r.samples[..., 0] > 0).float().mean((1, 2)), r.pareto_k, r.ess

    w_t, k_t, _ = weight_of_right_mode(None)
    w_m, k_m, ess_m = weight_of_right_mode(_Wide())
    assert float(w_t.max()) < 0.2  # the t about the left mode: the right mode (70% of the mass) is missed
    assert torch.allclose(w_m, torch.full((B,), 0.7), atol=0.06), w_m
    assert bool((k_m < 0.7).all()) and float(ess_m.min()) > 200


def test_mixture_weights_are_exact_when_the_proposal_is_the_target():
    """With q equal to a Gaussian target, every weight of the mixture is p / (0.8 p + 0.2 t) <= 1.25."""
    B = 2
    mean = torch.zeros(B, 2, dtype=torch.float64)
    tril = torch.eye(2, dtype=torch.float64).expand(B, 2, 2) * 2.0

    class Exact(_Wide):
        scale = torch.tensor([1.0, 1.0], dtype=torch.float64)

    def log_prob(x, rows=None):
        return -0.5 * (x.double() ** 2).sum(1) - math.log(2 * math.pi)

    r = importance_sample(log_prob, mean, tril, draws=1024, samples=400, chains=1, adapt=0,
                          generator=torch.Generator().manual_seed(0), proposal=Exact(), mix=0.8)
    assert bool((r.ess > 0.85 * r.n_proposals).all()) and bool((r.pareto_k < 0.3).all())
    d = r.samples.reshape(B, -1, 2)
    assert torch.allclose(d.std(1), torch.ones(B, 2), atol=0.1)
    with pytest.raises(GalgenInputError, match="mix"):
        importance_sample(log_prob, mean, tril, draws=64, proposal=Exact(), mix=1.0)


def test_save_load_and_attach_beside_a_checkpoint(tmp_path):
    from galgen.checkpoints import amortized_posterior_path, load_model
    from galgen.models import VAE
    vae = VAE(stamp=32, latent_dim=4, width=4).eval()
    q = AmortizedPosterior(32, 4, encoder_features=8, transforms=2, hidden=(16,))
    torch.nn.init.normal_(q.context_net[0].weight)
    path = tmp_path / "model.pt"
    from galgen.checkpoints import save_checkpoint

    save_checkpoint(path, model_state=vae.state_dict(), config={"model": vae.config})
    assert attached_amortized_posterior(load_model(path)) is None
    q.save(amortized_posterior_path(path))
    loaded = load_model(path)
    q2 = attached_amortized_posterior(loaded)
    assert q2 is not None and not any(k.startswith("_amortized") for k in loaded.state_dict())
    obs = _pool(3, size=32)
    observed = torch.randn(3, 32, 32)
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.allclose(q.log_prob(x, q.context(vae, observed, obs)),
                              q2.log_prob(x, q2.context(loaded, observed, obs)))
    assert torch.equal(load_amortized_posterior(amortized_posterior_path(path)).context_net[0].weight,
                       q.context_net[0].weight)
    with pytest.raises(GalgenInputError, match="not an amortised-posterior"):
        load_amortized_posterior(path)
    with pytest.raises(GalgenInputError, match="latent_dim"):
        attach_amortized_posterior(VAE(stamp=32, latent_dim=3, width=4), q)
    prop = amortized_proposal(q2, loaded, observed, obs)
    xs, lq = prop.draw(torch.arange(3), 5, torch.Generator().manual_seed(0))
    assert xs.shape == (3, 5, 5) and torch.allclose(prop.log_prob(torch.arange(3), xs), lq, atol=1e-4)
    # a tempered proposal is a normalised density: E_q[q_T / q] = 1
    hot = amortized_proposal(q2, loaded, observed, obs, temperature=1.2)
    xs, lq1 = prop.draw(torch.arange(3), 20000, torch.Generator().manual_seed(1))
    ratio = (hot.log_prob(torch.arange(3), xs) - lq1).exp().mean(1)
    assert torch.allclose(ratio, torch.ones(3, dtype=ratio.dtype), atol=0.06), ratio
    xh, lqh = hot.draw(torch.arange(3), 5, torch.Generator().manual_seed(0))
    assert torch.allclose(hot.log_prob(torch.arange(3), xh), lqh, atol=1e-4)


def test_pretrained_names_exclude_amortized_posteriors():
    from galgen.pretrained import PRETRAINED_DIR, available_pretrained

    names = available_pretrained()
    assert not any(n.endswith(".posterior") for n in names)
    if (PRETRAINED_DIR / "sdss-vae.posterior.pt").exists():
        assert "sdss-vae" in names


def test_sample_posterior_checks_the_proposal():
    from galgen.inference import fit_map

    model = LinearGalaxy()
    obs = _pool(2)
    with torch.no_grad():
        _, observed = obs.observe(model.decode(torch.zeros(2, 2)), generator=torch.Generator().manual_seed(0))
    res = fit_map(model, observed, obs, max_iter=50)
    with pytest.raises(GalgenInputError, match="no amortised posterior"):
        sample_posterior(model, observed, obs, res, samples=10, chains=1, draws=64, proposal="amortized")
    with pytest.raises(GalgenInputError, match="proposal"):
        sample_posterior(model, observed, obs, res, samples=10, chains=1, draws=64, proposal="flow")
    h = sample_posterior(model, observed, obs, res, samples=10, chains=1, draws=64, proposal="laplace")
    assert h.samples.shape == (2, 1, 10, 3) and np.all(np.isfinite(h.pareto_k.numpy()))


def test_a_mixture_of_laplace_approximations_weights_two_modes_right():
    """t components at both modes, with wrong weights: importance weights restore 0.3 / 0.7."""
    B = 3
    mean = torch.tensor([[[-3.0, 0.0], [3.0, 0.0]]] * B, dtype=torch.float64)
    tril = 0.5 * torch.eye(2, dtype=torch.float64).expand(B, 2, 2, 2)
    logw = torch.log(torch.tensor([[0.5, 0.5]] * B, dtype=torch.float64))

    def log_prob(x, rows=None):
        return _bimodal(x)

    r = importance_sample(log_prob, mean, tril, draws=2048, samples=1000, chains=2, log_weights=logw, adapt=0,
                          generator=torch.Generator().manual_seed(5))
    right = (r.samples[..., 0] > 0).float().mean((1, 2))
    assert torch.allclose(right, torch.full((B,), 0.7), atol=0.04), right
    assert bool((r.pareto_k < 0.5).all()) and float(r.ess.min()) > 0.6 * 2048
    with pytest.raises(GalgenInputError, match="log_weights"):
        importance_sample(log_prob, mean, tril, draws=64)


def test_population_monte_carlo_moves_the_mixture_to_the_modes():
    from galgen.inference.importance import _t_mixture, _weighted_mixture

    B = 2
    mean = torch.tensor([[[-2.0, 0.5], [2.0, -0.5]]] * B, dtype=torch.float64)  # off by 1 in x, 0.5 in y
    tril = 1.2 * torch.eye(2, dtype=torch.float64).expand(B, 2, 2, 2)
    logw = torch.log(torch.tensor([[0.5, 0.5]] * B, dtype=torch.float64))
    x, lq = _t_mixture(mean, tril, logw, 8000, 7, torch.Generator().manual_seed(0))
    lw = (_bimodal(x.reshape(-1, 2).float()).double().view(B, -1) - lq).numpy()
    lw -= np.logaddexp.reduce(lw, 1, keepdims=True)
    m2, t2, w2 = _weighted_mixture(x, lw, mean, tril, logw, 7)
    assert torch.allclose(w2.exp(), torch.tensor([[0.3, 0.7]] * B, dtype=torch.float64), atol=0.05)
    assert torch.allclose(m2, torch.tensor([[[-3.0, 0.0], [3.0, 0.0]]] * B, dtype=torch.float64), atol=0.15)
    sd = torch.diagonal(t2 @ t2.transpose(-1, -2), dim1=-2, dim2=-1).sqrt()
    assert bool(((sd > 0.4) & (sd < 1.0)).all()), sd  # from 1.2 toward the modes' 0.5 in one update


class _Folded(LinearGalaxy):
    """intrinsic = blob + z0^2 (size pattern) + z1 (elongation): the sign of z0 is not identified."""

    def decode(self, z, cond=None):
        zz = torch.stack([z[:, 1], 0.5 * z[:, 0] ** 2], 1)
        return (self.basis[0] + zz @ self.basis[1:]).view(-1, self.size, self.size)


def _folded_fits(z_true, fit_flux=True):
    """Galaxies of the folded model at ``z_true``, observed with noise 0.2, and the Laplace approximation at
    the mode Levenberg-Marquardt finds (of z alone, the flux scale held at 0, without ``fit_flux``):
    ``model, obs, observed, mean, tril``."""
    from galgen.inference import fit_map
    from galgen.inference.importance import laplace_approximation

    model = _Folded()
    obs = _pool(len(z_true), sigma=0.2)
    with torch.no_grad():
        _, observed = obs.observe(model.decode(z_true), generator=torch.Generator().manual_seed(0))
    res = fit_map(model, observed, obs, max_iter=300, optimizer="lm", fit_flux=fit_flux)
    mean, tril = laplace_approximation(model, observed, obs, res, fit_flux=fit_flux)
    return model, obs, observed, mean, tril


def test_modes_found_from_proposal_draws_include_the_mirror_mode():
    from galgen.inference.amortized import multimodal_laplace

    z_true = torch.tensor([[1.5, 0.3], [-1.8, -0.2], [1.2, 0.0], [-1.4, 0.4]])
    model, obs, observed, mean, tril = _folded_fits(z_true)

    class Broad(_Wide):
        scale = torch.tensor([2.0, 1.0, 0.05], dtype=torch.float64)

        def draw(self, idx, n, generator=None):
            eps = torch.randn(len(idx), n, 3, generator=generator, dtype=torch.float64)
            return eps * self.scale, self.log_prob(idx, eps * self.scale)

    means, trils, logw = multimodal_laplace(model, observed, obs, mean, tril, Broad(), starts=4, candidates=64,
                                            generator=torch.Generator().manual_seed(1))
    used = torch.isfinite(logw)
    for b in range(4):
        z0 = means[b, used[b], 0]
        # both signs of z0 are modes, of equal Laplace evidence; duplicates were merged
        assert len(z0) == 2 and float(z0.max()) > 0.8 and float(z0.min()) < -0.8, means[b, :, 0]
        assert torch.allclose(z0.abs(), torch.full_like(z0, abs(float(z_true[b, 0]))), atol=0.25)
        assert torch.allclose(logw[b, used[b]].exp(), torch.full((2,), 0.5, dtype=torch.float64), atol=0.05)


def test_training_resumes_exactly(tmp_path):
    from galgen.checkpoints import load_checkpoint

    model = LinearGalaxy()
    pool = _pool(16)
    kw = dict(batch_size=32, bank=256, lr=3e-3, seed=2, width=4, embed=8, context=8, transforms=1, hidden=(16,),
              checkpoint_every=5, log_every=1)
    whole = train_amortized_posterior(model, pool, steps=12, **kw)

    def stop_at_6(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    interrupted = tmp_path / "q.pt"
    with pytest.raises(KeyboardInterrupt):
        train_amortized_posterior(model, pool, steps=12, out=interrupted, progress=stop_at_6, **kw)
    assert load_checkpoint(interrupted)["step"] == 5
    resumed = train_amortized_posterior(model, pool, steps=12, out=interrupted, **kw)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    again = train_amortized_posterior(model, pool, steps=12, out=interrupted, **kw)  # finished: loads, no work
    assert torch.equal(again.context_net[0].weight, whole.context_net[0].weight)


def test_training_goes_on_from_a_trained_flow(tmp_path):
    import copy

    model = LinearGalaxy()
    pool = _pool(16)
    kw = dict(batch_size=32, bank=256, lr=3e-3, seed=2, width=4, embed=8, context=8, transforms=1, hidden=(16,))
    first = train_amortized_posterior(model, pool, steps=6, **kw)
    start = copy.deepcopy(first)
    more = train_amortized_posterior(model, pool, steps=4, posterior=first, batch_size=32, bank=256, lr=1e-3,
                                     seed=3, out=tmp_path / "more.pt", log_every=1)
    assert int(more.trained_steps) == 10
    # the standardisation the weights were trained with is kept, the weights move on
    for name in ("feature_mean", "feature_std", "flow.z_mean", "flow.z_std"):
        assert torch.equal(more.get_buffer(name), start.get_buffer(name)), name
    assert not torch.equal(more.context_net[0].weight, start.context_net[0].weight)
    # a rerun with the same flow and settings finds the finished checkpoint
    again = train_amortized_posterior(model, pool, steps=4, posterior=copy.deepcopy(start), batch_size=32,
                                      bank=256, lr=1e-3, seed=3, out=tmp_path / "more.pt")
    assert torch.equal(again.context_net[0].weight, more.context_net[0].weight)
    assert int(again.trained_steps) == 10
    with pytest.raises(GalgenInputError, match="other settings"):  # the same --out from another start
        train_amortized_posterior(model, pool, steps=4, bank=256, batch_size=32, lr=1e-3, seed=3,
                                  out=tmp_path / "more.pt", width=4, embed=8, context=8, transforms=1, hidden=(16,))


def test_modes_found_from_given_candidates_alone():
    """multimodal_laplace(proposal=None, extra=...): the candidates (e.g. the heavy draws of an earlier
    importance sampling) near the mirror mode are polished into it; without any candidates it says so."""
    from galgen.inference.amortized import multimodal_laplace

    model, obs, observed, mean, tril = _folded_fits(torch.tensor([[1.5, 0.3], [-1.8, -0.2], [1.2, 0.0]]))
    mirror = mean.double().clone()
    mirror[:, 0] *= -0.8  # 20% short of the mirror mode
    extra = mirror[:, None, :] + 0.05 * torch.randn(3, 8, 3, generator=torch.Generator().manual_seed(1),
                                                    dtype=torch.float64)
    means, _, logw = multimodal_laplace(model, observed, obs, mean, tril, None, starts=2, extra=extra)
    assert bool(torch.isfinite(logw).all()), logw  # two distinct modes, neither merged nor dropped
    assert torch.allclose(means[:, 1, 0], -mean[:, 0].double(), atol=0.05), (means[:, :, 0], mean[:, 0])
    with pytest.raises(GalgenInputError, match="candidates"):
        multimodal_laplace(model, observed, obs, mean, tril, None)


def test_a_failed_importance_sampling_is_searched_again_from_its_heavy_draws():
    """sample_posterior's second search: a galaxy whose draws came from one mode of two, with its heavy
    draws in the other (k flags it), is sampled again from a mixture of both modes found from those draws
    (no amortised posterior): k passes and each mirror mode holds half the draws."""
    from galgen.inference import posterior_log_prob
    from galgen.inference.fit import _search_again
    from galgen.inference.importance import ImportanceResult

    model, obs, observed, mean, tril = _folded_fits(torch.tensor([[1.5, 0.3], [-1.2, 0.1]]))
    heavy = mean.double().clone()
    heavy[:, 0] *= -1  # the heavy draws of a poor run sit at the mirror mode
    samples = (heavy[:, None, None, :] + 0.02 * torch.randn(2, 1, 400, 3, generator=torch.Generator().manual_seed(1),
                                                            dtype=torch.float64)).float()
    first = ImportanceResult(samples=samples, pareto_k=torch.tensor([math.inf, 0.2]),
                             ess=torch.tensor([1.0, 500.0]), n_proposals=1024, draws=torch.tensor([1024, 1024]))

    def draw(rows, loc, tril_, lw, prop):
        lp = posterior_log_prob(model, obs.select(rows), observed[rows], chains=64)
        return importance_sample(lp, loc, tril_, log_weights=lw, draws=1024, samples=400, chains=1,
                                 generator=torch.Generator().manual_seed(2))

    r, mode = _search_again(model, observed, obs, None, None, first, mean, tril, None, draw, False,
                            torch.Generator().manual_seed(3))
    assert float(r.pareto_k[0]) <= 0.7 and float(r.ess[0]) > 200, (r.pareto_k, r.ess)
    right = float((r.samples[0, 0, :, 0] > 0).float().mean())
    assert abs(right - 0.5) < 0.12, right  # the mirror modes have equal mass
    assert int(r.draws[0]) == 2048 and int(r.draws[1]) == 1024  # both runs' draws counted; galaxy 1 untouched
    assert torch.equal(r.samples[1], samples[1]) and torch.isfinite(mode).all()


def test_the_second_search_holds_a_held_flux_scale():
    """scale="fixed": a galaxy whose draws of z (the flux scale held at 0) came from one mirror mode, its heavy
    draws at the other, is searched again at that flux scale: k passes, the mirror modes hold equal mass, and
    the best mode keeps s = 0."""
    from galgen.inference import posterior_log_prob
    from galgen.inference.fit import _held_scale, _search_again
    from galgen.inference.importance import ImportanceResult

    model, obs, observed, mean, tril = _folded_fits(torch.tensor([[1.5, 0.3], [-1.2, 0.1]]), fit_flux=False)
    assert tril.shape == (2, 2, 2) and bool((mean[:, 2] == 0).all())
    heavy = mean[:, :2].double().clone()
    heavy[:, 0] *= -1
    samples = (heavy[:, None, None, :] + 0.02 * torch.randn(2, 1, 400, 2, generator=torch.Generator().manual_seed(1),
                                                            dtype=torch.float64)).float()
    first = ImportanceResult(samples=samples, pareto_k=torch.tensor([math.inf, 0.2]),
                             ess=torch.tensor([1.0, 500.0]), n_proposals=1024, draws=torch.tensor([1024, 1024]))

    def draw(rows, loc, tril_, lw, prop):
        lp = _held_scale(posterior_log_prob(model, obs.select(rows), observed[rows], chains=64), loc[:, 0, 2], 64)
        return importance_sample(lp, loc[..., :2], tril_, log_weights=lw, draws=1024, samples=400, chains=1,
                                 generator=torch.Generator().manual_seed(2))

    r, mode = _search_again(model, observed, obs, None, None, first, mean, tril, None, draw, True,
                            torch.Generator().manual_seed(3), fit_flux=False)
    assert float(r.pareto_k[0]) <= 0.7 and float(r.ess[0]) > 200, (r.pareto_k, r.ess)
    assert abs(float((r.samples[0, 0, :, 0] > 0).float().mean()) - 0.5) < 0.12
    assert torch.equal(r.samples[1], samples[1]) and bool((mode[:, 2] == 0).all()), mode


def test_encoder_features_are_those_of_the_noise_matched_images():
    """Deeper than the encoder's training noise: the features of encoder_input's images; else unchanged."""
    from galgen.inference.amortized import encoder_features
    from galgen.models import VAE, encoder_input

    vae = VAE(stamp=16, latent_dim=3, width=4, input_scale=1.0).eval()
    x = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.1 + 2.0
    with torch.no_grad():
        deep = _pool(4, size=16, sigma=0.1)
        matched = encoder_input(vae, x, deep)
        assert not torch.equal(matched, x)
        assert (matched - x).std().item() == pytest.approx(math.sqrt(1 - 0.01), rel=0.05)
        post = vae.encode(matched)
        expect = torch.cat([post.mean, post.variance.log()], 1)
        assert torch.allclose(encoder_features(vae, x, deep), expect)
        assert not torch.allclose(encoder_features(vae, x), expect)
        shallow = _pool(4, size=16, sigma=1.0)
        assert encoder_input(vae, x, shallow) is x
        assert torch.equal(encoder_features(vae, x, shallow), encoder_features(vae, x))
