"""The latent flow prior: a normalised density, fitted to known non-Gaussian distributions."""

import math

import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.models import LatentFlowPrior


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def two_gaussians(n, generator):
    """Equal mixture of N((-2, 0), 0.3^2 I) and N((2, 0), 0.3^2 I): mean (0, 0), var (4.09, 0.09)."""
    comp = torch.randint(0, 2, (n,), generator=generator)
    centre = torch.stack([comp * 4.0 - 2.0, torch.zeros(n)], 1)
    return torch.randn(n, 2, generator=generator) * 0.3 + centre


def two_gaussians_log_prob(z):
    x = torch.distributions.Normal(torch.tensor([-2.0, 2.0]), 0.3).log_prob(z[:, :1])
    return torch.logsumexp(x, 1) - math.log(2) + torch.distributions.Normal(0.0, 0.3).log_prob(z[:, 1])


@pytest.fixture(scope="module")
def bimodal():
    """A flow fitted to the two-Gaussian mixture, with held-out samples (fitted once, ~1.5 s)."""
    torch.manual_seed(0)
    z = two_gaussians(4000, torch.Generator().manual_seed(0))
    prior = LatentFlowPrior(2, transforms=2, hidden=(64, 64))
    hist = prior.fit(z[:3000], epochs=40, generator=torch.Generator().manual_seed(1))
    return prior, hist, z[:3000], z[3000:]


def test_flow_learns_a_bimodal_density(bimodal):
    prior, hist, train, held = bimodal
    gauss = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    with torch.no_grad():
        flow_lp = prior.log_prob(held).mean()
    assert flow_lp > gauss.log_prob(held).mean() + 1.0  # far better than the best Gaussian
    assert flow_lp > two_gaussians_log_prob(held).mean() - 0.15  # and close to the true density
    assert hist["best_val_loss"] == min(hist["val_loss"]) and hist["epochs"] == len(hist["train_loss"])
    assert hist["val_loss"][hist["best_epoch"]] == hist["best_val_loss"]
    assert bool(prior.fitted)
    # the flow works on standardised codes: the buffers hold the training codes' moments
    assert torch.allclose(prior.z_std, torch.tensor([2.02, 0.3]), rtol=0.05)


def test_samples_reproduce_the_moments_and_both_modes(bimodal):
    prior, _, train, _ = bimodal
    s = prior.sample(8000, generator=torch.Generator().manual_seed(2))
    assert s.shape == (8000, 2)
    # compared with the training sample (its modes hold 51.4% / 48.6%, not exactly half each)
    assert torch.allclose(s.mean(0), train.mean(0), atol=0.1)
    cov, cov_train = torch.cov(s.T), torch.cov(train.T)
    assert torch.allclose(cov.diagonal(), cov_train.diagonal(), rtol=0.1)
    assert abs(float(cov[0, 1] / cov.diagonal().prod().sqrt())) < 0.1  # uncorrelated
    share = float((s[:, 0] > 0).float().mean())
    assert abs(share - float((train[:, 0] > 0).float().mean())) < 0.03  # both modes, right weights
    assert float((s[:, 0].abs() < 1).float().mean()) < 0.05  # little mass between them
    # a colder base distribution concentrates the draws on the modes
    cold = prior.sample(8000, generator=torch.Generator().manual_seed(2), temperature=0.5)
    assert cold[:, 1].std() < 0.7 * s[:, 1].std()


def test_density_is_normalised(bimodal):
    prior = bimodal[0]
    step = 0.04
    x, y = torch.meshgrid(torch.arange(-5, 5, step) + step / 2, torch.arange(-2, 2, step) + step / 2,
                          indexing="ij")
    with torch.no_grad():
        p = prior.log_prob(torch.stack([x.flatten(), y.flatten()], 1)).exp()
    assert float(p.sum() * step**2) == pytest.approx(1.0, abs=0.02)


def test_sampling_is_deterministic_given_a_generator(bimodal):
    prior = bimodal[0]
    state = torch.get_rng_state()
    a = prior.sample(50, generator=torch.Generator().manual_seed(5))
    b = prior.sample(50, generator=torch.Generator().manual_seed(5))
    c = prior.sample(50, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched


def test_state_dict_holds_weights_standardisation_and_flag(bimodal):
    prior, _, _, held = bimodal
    state = prior.state_dict()
    assert {"z_mean", "z_std", "fitted"} <= set(state) and any(k.startswith("flow.") for k in state)
    clone = LatentFlowPrior(**prior.config)
    assert not bool(clone.fitted)
    clone.load_state_dict(state)
    assert bool(clone.fitted)
    with torch.no_grad():
        assert torch.equal(clone.log_prob(held[:20]), prior.log_prob(held[:20]))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(clone.sample(5, generator=g), prior.sample(5, generator=torch.Generator().manual_seed(0)))


def test_conditional_flow_follows_its_context():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(3000, 1, generator=g) * 2 - 1
    z = torch.randn(3000, 2, generator=g) * 0.2 + 3 * c  # mean (3c, 3c), sd 0.2
    prior = LatentFlowPrior(2, context=1, kind="maf", transforms=2, hidden=(32, 32))
    prior.fit(z, c, epochs=30, generator=g)
    for value in (-0.8, 0.8):
        s = prior.sample(500, torch.tensor([value]), generator=torch.Generator().manual_seed(1))
        assert torch.allclose(s.mean(0), torch.full((2,), 3 * value), atol=0.25)
        assert float(s.std(0).max()) < 0.4
    # the density follows the context too: a code is likely only under its own context
    with torch.no_grad():
        here = prior.log_prob(torch.full((1, 2), 2.4), torch.tensor([[0.8]]))
        there = prior.log_prob(torch.full((1, 2), 2.4), torch.tensor([[-0.8]]))
    assert float(here - there) > 20
    with pytest.raises(GalgenInputError, match="context"):
        prior.log_prob(z[:5])
    with pytest.raises(GalgenInputError, match="context"):
        prior.sample(5, torch.zeros(3, 1))


def test_bad_inputs():
    with pytest.raises(GalgenInputError, match="prior.kind"):
        LatentFlowPrior(2, kind="realnvp")
    with pytest.raises(GalgenInputError, match="features"):
        LatentFlowPrior(0)
    with pytest.raises(GalgenInputError, match="prior.hidden"):
        LatentFlowPrior(2, hidden=[])
    prior = LatentFlowPrior(3, transforms=1, hidden=(8,))
    with pytest.raises(GalgenInputError, match=r"z: expected a tensor of shape \(N, 3\)"):
        prior.log_prob(torch.zeros(4, 2))
    with pytest.raises(GalgenInputError, match="unconditional"):
        prior.log_prob(torch.zeros(4, 3), torch.zeros(4, 1))
    with pytest.raises(GalgenInputError, match="at least 10"):
        prior.fit(torch.zeros(5, 3))
    with pytest.raises(GalgenInputError, match="finite"):
        prior.fit(torch.full((20, 3), float("nan")))
    with pytest.raises(GalgenInputError, match="val_fraction"):
        prior.fit(torch.randn(20, 3), val_fraction=1.0)
    assert not bool(prior.fitted)


# -- the code mixture -----------------------------------------------------------------------
def test_code_mixture_density_matches_the_closed_form():
    """CodeMixture.log_prob (blocked matrix products) equals torch's MixtureSameFamily in
    float64, for narrow and wide components alike, and its gradient is the analytic one."""
    from torch.distributions import MixtureSameFamily

    from galgen.models import CodeMixturePrior
    from galgen.models import prior as prior_module

    g = torch.Generator().manual_seed(0)
    codes = torch.randn(300, 5, generator=g) * 3
    scales = torch.rand(300, 5, generator=g) * 0.5 + 0.02
    p = CodeMixturePrior(5)
    p.fit(codes, scales, bandwidth=1.0)
    z = (codes[:40] + 0.05 * torch.randn(40, 5, generator=g)).requires_grad_(True)
    ref = MixtureSameFamily.log_prob(p.distribution(), z.double())
    old = prior_module._MIXTURE_BLOCK
    prior_module._MIXTURE_BLOCK = 40 * 7  # several blocks of 7 components
    try:
        lp = p.log_prob(z)
    finally:
        prior_module._MIXTURE_BLOCK = old
    assert lp.dtype == torch.float32
    assert torch.allclose(lp.double(), ref, atol=1e-4)
    (grad,) = torch.autograd.grad(lp.sum(), z)
    (ref_grad,) = torch.autograd.grad(MixtureSameFamily.log_prob(p.distribution(), z).sum(), z)
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-3)


def test_code_mixture_draws_are_its_components():
    """Draws pick components uniformly and scatter with their widths (times the temperature);
    the same generator gives the same draws."""
    from galgen.models import CodeMixturePrior, sample_latents

    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    scales = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.4, 0.4]])
    p = CodeMixturePrior(2)
    p.fit(codes, scales, bandwidth=1.0)
    z = p.sample(6000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, sample_latents(p.distribution(), 6000, generator=torch.Generator().manual_seed(1)))
    k = torch.cdist(z, codes).argmin(1)
    counts = torch.bincount(k, minlength=3).float()
    assert (counts / 6000 - 1 / 3).abs().max() < 0.03  # binomial sd 0.006
    for i in range(3):
        spread = (z[k == i] - codes[i]).std(0)
        assert torch.allclose(spread, scales[i], rtol=0.1)
    cold = p.sample(6000, generator=torch.Generator().manual_seed(1), temperature=0.5)
    kc = torch.cdist(cold, codes).argmin(1)
    assert torch.allclose((cold[kc == 2] - codes[2]).std(0), 0.5 * scales[2], rtol=0.1)


def test_code_mixture_state_dict_sizes_itself_and_refuses_bad_input():
    """A fresh module takes the number of components from a state_dict (an unfitted one, from
    a state_dict without its keys: checkpoints from before the mixture); bad codes and scales
    are refused by name; a subset keeps max_components of the codes."""
    from galgen.models import CodeMixturePrior

    p = CodeMixturePrior(3)
    codes = torch.randn(50, 3)
    p.fit(codes, 0.05, bandwidth=2.0)
    q = CodeMixturePrior(3)
    q.load_state_dict(p.state_dict())
    assert bool(q.fitted) and torch.equal(q.centres, codes) and torch.equal(q.scales, torch.full((50, 3), 0.1))
    assert float(q.bandwidth) == 2.0
    r = CodeMixturePrior(3)
    r.load_state_dict({})
    assert not bool(r.fitted) and r.centres.shape == (0, 3)
    with pytest.raises(GalgenInputError, match="not fitted"):
        r.distribution()
    with pytest.raises(GalgenInputError, match="codes"):
        p.fit(torch.randn(5, 2), 0.1)
    with pytest.raises(GalgenInputError, match="codes: must be finite"):
        p.fit(torch.full((5, 3), float("nan")), 0.1)
    with pytest.raises(GalgenInputError, match="scales"):
        p.fit(torch.randn(5, 3), torch.zeros(5, 3))
    with pytest.raises(GalgenInputError, match="scales"):
        p.fit(torch.randn(5, 3), torch.ones(4, 3))
    with pytest.raises(GalgenInputError, match="bandwidth"):
        p.fit(codes, 0.1, bandwidth=-1.0)
    with pytest.raises(GalgenInputError, match="at least 10 codes"):
        p.fit(codes[:9], 0.1)
    p.fit(codes, 0.1, max_components=20, bandwidth=1.0)
    assert p.centres.shape == (20, 3)
    assert all(bool((c == codes).all(1).any()) for c in p.centres)


def test_matched_bandwidth_draws_are_as_new_as_fresh_samples():
    """With bandwidth="match", draws from a mixture on 2,000 codes of a known density are
    as far from the nearest code as fresh samples of that density are (the data-copying
    test of Meehan et al. 2020, on samples the fit never saw), where the posterior widths
    alone (bandwidth 1) redraw the codes (distances 10x smaller)."""
    from galgen.models import CodeMixturePrior

    g = torch.Generator().manual_seed(0)
    mix = torch.distributions.Normal(torch.zeros(4), torch.tensor([1.0, 2.0, 0.5, 1.0]))

    def draw(n):
        return mix.sample((n,)) + torch.tensor([3.0, 0, 0, 0]) * (torch.rand(n, 1) < 0.3)

    torch.manual_seed(1)
    codes, fresh = draw(2000), draw(500)

    def median_nn(x, centres):
        unit = centres.std(0)
        return float(torch.cdist(x / unit, centres / unit).min(1).values.median())

    p = CodeMixturePrior(4)
    info = p.fit(codes, 0.01, generator=g)
    assert 0.9 < info["draw_distance"] / info["held_out_distance"] < 1.1
    new = median_nn(fresh, codes)
    matched = median_nn(p.sample(500, generator=torch.Generator().manual_seed(2)), codes)
    assert 0.85 < matched / new < 1.15
    p.fit(codes, 0.01, bandwidth=1.0)
    copied = median_nn(p.sample(500, generator=torch.Generator().manual_seed(2)), codes)
    assert copied / new < 0.1
