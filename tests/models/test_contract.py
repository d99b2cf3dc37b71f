"""The latent-model contract: every shipped model speaks it, and its priors sample reproducibly."""

import warnings

import pytest
import torch
from torch.distributions import Distribution, Independent, Laplace

from galgen.errors import GalgenInputError
from galgen.models import (VAE, WGANGP, AutoEncoder, FlatPrior, LatentModel, amortised_guess, sample_latents,
                           standard_normal)
from galgen.models.parametric import SersicModel


def _vae_with_flow():
    torch.manual_seed(0)
    vae = VAE(16, latent_dim=3, width=4, prior={"transforms": 1, "hidden": [16]})
    vae.fit_prior(torch.randn(200, 3) * torch.tensor([2.0, 0.5, 1.0]) + 1.0, epochs=2)
    return vae.eval()


MODELS = {
    "ae": lambda: AutoEncoder(16, latent_dim=3, width=4).eval(),
    "vae": lambda: VAE(16, latent_dim=3, width=4).eval(),
    "vae-flow": _vae_with_flow,
    "wgan": lambda: WGANGP(16, latent_dim=3, width=4).eval(),
    "sersic": lambda: SersicModel("sersic", stamp=16, pixel_scale=0.4),
    "bulge-disk": lambda: SersicModel("bulge-disk", stamp=16, pixel_scale=0.4, fit_centroid=False),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_shipped_model_speaks_the_contract(name):
    model = MODELS[name]()
    assert isinstance(model, LatentModel)
    d = model.latent_dim
    prior = model.prior()
    assert isinstance(prior, Distribution) and tuple(prior.event_shape) == (d,)
    z = sample_latents(prior, 5, generator=torch.Generator().manual_seed(1))
    assert z.shape == (5, d)
    assert torch.equal(z, sample_latents(model.prior(), 5, generator=torch.Generator().manual_seed(1)))
    lp = prior.log_prob(z)
    assert lp.shape == (5,) and bool(torch.isfinite(lp).all())
    with torch.no_grad():
        img = model.decode(z)
    assert img.ndim == 3 and img.shape[0] == 5 and bool((img >= 0).all())
    guess = amortised_guess(model, torch.rand(5, 16, 16) * 10)
    assert guess is None or guess.shape == (5, d)


def test_prior_densities_are_the_ones_sampled():
    """Each prior's log_prob is the density of its own draws (moments, and the Gaussian score)."""
    sersic = SersicModel("sersic", stamp=16, pixel_scale=0.4)
    p = sersic.prior()
    z = sample_latents(p, 40000, generator=torch.Generator().manual_seed(0)).double()
    assert torch.allclose(z.mean(0), sersic.prior_loc.double(), atol=0.03)
    assert torch.allclose(z.std(0), sersic.prior_scale.double(), rtol=0.02)
    x = torch.randn(3, sersic.latent_dim, requires_grad=True)
    g, = torch.autograd.grad(p.log_prob(x).sum(), x)
    assert torch.allclose(g, -(x - sersic.prior_loc) / sersic.prior_scale**2, atol=1e-5)
    n = standard_normal(4)
    v = torch.randn(7, 4)
    assert torch.allclose(n.log_prob(v), Independent(torch.distributions.Normal(0.0, torch.ones(4)), 1).log_prob(v))
    assert bool(torch.isnan(n.log_prob(torch.full((1, 4), float("nan")))).all())  # no validation error


def test_vae_flow_prior_is_the_flow_module_and_samples_as_before():
    vae = _vae_with_flow()
    flow = vae.latent_flow
    z = torch.randn(6, 3)
    assert torch.equal(vae.prior().log_prob(z), flow.log_prob(z))
    for t in (1.0, 0.7):  # the module's own sampler is the reference (galgen 0.1's VAE.sample_latents)
        ref = flow.sample(6, generator=torch.Generator().manual_seed(3), temperature=t)
        new = sample_latents(vae.prior(), 6, generator=torch.Generator().manual_seed(3), temperature=t)
        assert torch.equal(ref, new)
    assert set(vae.prior_choices) == {"flow", "normal"}
    normal = vae.with_prior("normal")
    assert normal.decoder is vae.decoder  # shares the weights
    assert torch.equal(normal.prior().log_prob(z), standard_normal(3).log_prob(z))
    with pytest.raises(GalgenInputError, match=r"one of \['flow', 'mixture', 'normal'\]"):
        vae.with_prior("gaussian")
    with pytest.raises(GalgenInputError, match="not fitted"):
        VAE(16, latent_dim=3, width=4).with_prior("flow")
    with pytest.raises(GalgenInputError, match="offers"):
        WGANGP(16, latent_dim=3, width=4).with_prior("normal")


def test_vae_checkpoints_of_galgen_0_1_load():
    """0.1 stored the flow as the submodule ``prior``: its keys load into ``latent_flow``."""
    vae = _vae_with_flow()
    old = {(k.replace("latent_flow.", "prior.", 1) if k.startswith("latent_flow.") else k): v
           for k, v in vae.state_dict().items()}
    assert any(k.startswith("prior.") for k in old)
    fresh = VAE(16, latent_dim=3, width=4, prior={"transforms": 1, "hidden": [16]})
    fresh.load_state_dict(old)
    assert bool(fresh.latent_flow.fitted)
    z = torch.randn(4, 3)
    assert torch.equal(fresh.prior().log_prob(z), vae.prior().log_prob(z))


def test_vae_encode_is_a_distribution_and_still_unpacks_with_a_warning():
    vae = VAE(16, latent_dim=3, width=4).eval()
    x = torch.rand(2, 16, 16)
    q = vae.encode(x)
    mu, logvar = vae.encoder_moments(x)
    assert torch.equal(q.mean, mu) and torch.allclose(q.stddev, (0.5 * logvar).exp())
    with pytest.warns(DeprecationWarning, match="encode now returns a distribution"):
        a, b = vae.encode(x)
    assert torch.equal(a, mu) and torch.equal(b, logvar)


def test_auto_encoder_prior_is_flat():
    ae = AutoEncoder(16, latent_dim=3, width=4)
    p = ae.prior()
    assert isinstance(p, FlatPrior)
    assert torch.equal(p.log_prob(torch.randn(4, 3) * 100), torch.zeros(4))


def test_sample_latents_batched_priors_and_any_distribution():
    # a prior per galaxy (batch shape (n,)), e.g. conditioned on each galaxy's catalog values
    per = Independent(torch.distributions.Normal(torch.arange(4.0)[:, None].expand(4, 2), 0.1), 1)
    z = sample_latents(per, 4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 2) and torch.allclose(z[:, 0], torch.arange(4.0), atol=0.5)
    with pytest.raises(GalgenInputError, match="batch shape"):
        sample_latents(per, 3)
    # any other distribution: reproducible with the generator, the global random state untouched
    lap = Independent(Laplace(torch.zeros(2), torch.ones(2)), 1)
    state = torch.get_rng_state()
    a = sample_latents(lap, 3, generator=torch.Generator().manual_seed(5))
    b = sample_latents(lap, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    with pytest.raises(GalgenInputError, match="temperature"):
        sample_latents(lap, 3, temperature=0.5)


def test_deprecated_names_still_work():
    sersic = SersicModel("sersic", stamp=16, pixel_scale=0.4)
    theta = torch.zeros(2, sersic.latent_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sersic.prior().log_prob(theta)
    with pytest.warns(DeprecationWarning):
        assert torch.equal(sersic.log_prior(theta), sersic.prior().log_prob(theta))
    with pytest.warns(DeprecationWarning):
        s = sersic.sample_prior(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, sample_latents(sersic.prior(), 3, generator=torch.Generator().manual_seed(0)))


class _RecordingEncoder(LatentModel):
    """Its guess is the rms of each input image's outer ring (pure noise here)."""

    latent_dim = 1
    encoder_noise_rms = 2.0

    def decode(self, z, cond=None):
        return torch.zeros(len(z), 32, 32)

    def prior(self, cond=None):
        return standard_normal(1)

    def encode(self, observed, cond=None):
        ring = torch.ones(32, 32, dtype=torch.bool)
        ring[4:-4, 4:-4] = False
        return observed[:, ring].std(1, keepdim=True)


@pytest.mark.parametrize("sigma, encoded", [(0.2, 2.0), (1.9, None), (3.0, None)])
def test_amortised_guess_brings_deeper_data_to_the_encoders_training_noise(sigma, encoded):
    """Data 0.8 or more below the encoder's noise variance get noise up to it; other data are untouched."""
    from galgen.physics import GaussianNoise, Observation

    psf = torch.zeros(5, 5)
    psf[2, 2] = 1.0
    x = torch.randn(16, 32, 32, generator=torch.Generator().manual_seed(3)) * sigma
    obs = Observation(psf, pixel_scale=0.4, stamp=32, noise=GaussianNoise(torch.full((16, 32, 32), sigma**2)))
    model = _RecordingEncoder()
    plain = amortised_guess(model, x)
    matched = amortised_guess(model, x, None, obs)
    if encoded is None:
        assert torch.equal(matched, plain)
    else:
        assert plain.median() < 0.3
        assert matched.median() == pytest.approx(encoded, rel=0.05)
        assert torch.equal(matched, amortised_guess(model, x, None, obs))  # a fixed seed: the same guess


@pytest.mark.slow
def test_an_sdss_encoder_guesses_galaxies_forty_times_deeper_after_noise_matching(tmp_path):
    """sdss-vae-bd's encoder on the same galaxies from sdss-deep: flux guessed 15-36x too high unmatched."""
    import galgen
    from galgen.data import ObservationLoader
    from galgen.simulate import simulate

    path = simulate(tmp_path / "deep.h5", survey="sdss-deep", n=24, stamp=64, seed=11, psf_size=33,
                    morphology="rich", progress=False)
    model = galgen.load_pretrained("sdss-vae-bd").eval()
    batch = next(iter(ObservationLoader(path).iter_batches(24)))
    ratios = {}
    with torch.no_grad():
        for name, obs in (("plain", None), ("matched", batch.observation)):
            z = amortised_guess(model, batch.observed, None, obs)
            img = batch.observation.noiseless(model.decode(z).float())
            ratios[name] = (img.sum((1, 2)) / batch.observed.sum((1, 2))).median().item()
    assert ratios["plain"] > 3.0
    assert 0.8 < ratios["matched"] < 1.25
