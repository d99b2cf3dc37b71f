"""The PSF-aware VAE: ELBO terms against closed forms, learning, the flow prior, sampling, configs."""

import math

import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.models import VAE, Batch, LatentFlowPrior
from galgen.physics import GaussianNoise, Observation, gaussian_psf
from galgen.train import TrainingData, load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_batch(n=4, stamp=32, masked=0):
    psf = gaussian_psf(1.2, 15, 0.4)
    var = torch.full((n, stamp, stamp), 4.0)
    mask = torch.zeros(n, stamp, stamp, dtype=torch.bool)
    mask[:, :masked] = True
    obs = Observation(psf, pixel_scale=0.4, stamp=stamp, noise=GaussianNoise(var, mask))
    return Batch(observed=torch.randn(n, stamp, stamp) * 2 + 1, observation=obs)


def test_elbo_terms_match_closed_forms():
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=6, width=8, input_scale=2.0)
    batch = toy_batch(masked=3)
    t = vae.elbo(batch, generator=torch.Generator().manual_seed(1))
    mu, logvar = vae.encode(batch.observed)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(t["kl"], torch.distributions.kl_divergence(q, p).sum(1), rtol=1e-5, atol=1e-5)
    # the same eps, by hand: z -> intrinsic -> Gaussian log-likelihood of the masked data
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    model = batch.observation.noiseless(vae.decode(mu + eps * (0.5 * logvar).exp()))
    good = ~batch.observation.noise.mask
    r2 = ((batch.observed - model) ** 2 / 4.0 + math.log(2 * math.pi * 4.0)) * good
    assert torch.allclose(t["nll"], 0.5 * r2.sum((1, 2)), rtol=1e-5)
    assert torch.allclose(t["elbo"], -t["nll"] - t["kl"])
    n_good = 32 * 29
    assert torch.allclose(t["bits_per_pixel"], -t["elbo"] / (n_good * math.log(2)))


def test_kl_warmup_schedule():
    vae = VAE(32, latent_dim=2, width=8, beta=0.5, warmup_steps=4)
    assert [vae.beta_at(s) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert VAE(32, latent_dim=2, width=8, beta=2.0).beta_at(0) == 2.0


def test_brief_training_beats_the_mean_image(sdss_small):
    torch.manual_seed(0)
    data = TrainingData(sdss_small, np.arange(60))
    st = data.statistics()
    vae = VAE(48, latent_dim=8, width=8, input_scale=st["noise_rms"], flux_scale=st["peak"], warmup_steps=50)
    opts = vae.make_optimizers(lr=3e-3)
    losses = []
    for step in range(150):
        batch = data.batch(torch.randperm(60, generator=torch.Generator().manual_seed(step))[:20])
        losses.append(float(vae.training_step(batch, opts, step)["loss"]))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    full = data.batch(torch.arange(60))
    chi2_vae = vae.anomaly_score(full.observed, full.observation)
    mean_image = full.observed.mean(0, keepdim=True).expand_as(full.observed)
    chi2_mean = full.observation.noise.chi2(full.observed, mean_image) / (48 * 48)
    assert torch.median(chi2_vae) < torch.median(chi2_mean), (torch.median(chi2_vae), torch.median(chi2_mean))
    val = vae.validation_step(full)
    assert set(val) >= {"loss", "elbo", "kl", "nll", "bits_per_pixel", "chi2_pixel"}
    assert torch.allclose(val["loss"], -val["elbo"])


def test_flow_prior_learns_a_bimodal_density():
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 2, (4000,), generator=g)
    z = torch.randn(4000, 2, generator=g) * 0.3 + torch.stack([comp * 4.0 - 2.0, torch.zeros(4000)], 1)
    prior = LatentFlowPrior(2, transforms=2, hidden=(64, 64))
    hist = prior.fit(z[:3000], epochs=40, generator=torch.Generator().manual_seed(1))
    held = z[3000:]
    true_lp = torch.logsumexp(torch.distributions.Normal(torch.stack([torch.full((1000,), -2.0),
                                                                     torch.full((1000,), 2.0)], 1),
                                                        0.3).log_prob(held[:, :1]), 1) - math.log(2) \
        + torch.distributions.Normal(0.0, 0.3).log_prob(held[:, 1])
    gauss = torch.distributions.MultivariateNormal(z[:3000].mean(0), torch.cov(z[:3000].T))
    flow_lp = prior.log_prob(held).mean()
    assert flow_lp > gauss.log_prob(held).mean() + 1.0  # far better than the best Gaussian
    assert flow_lp > true_lp.mean() - 0.15  # and close to the true density
    s = prior.sample(4000, generator=torch.Generator().manual_seed(2))
    assert abs(float((s[:, 0] > 0).float().mean()) - 0.5) < 0.05  # both modes, equal weight
    assert float((s[:, 0].abs() < 1).float().mean()) < 0.05  # little mass between them
    assert torch.equal(s[:10], prior.sample(10 * 0 + 4000, generator=torch.Generator().manual_seed(2))[:10])
    assert hist["best_val_loss"] == min(hist["val_loss"]) and bool(prior.fitted)


def test_conditional_flow_follows_its_context():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(3000, 1, generator=g) * 2 - 1
    z = torch.randn(3000, 2, generator=g) * 0.2 + 3 * c
    prior = LatentFlowPrior(2, context=1, transforms=2, hidden=(32, 32))
    prior.fit(z, c, epochs=30, generator=g)
    for value in (-0.8, 0.8):
        s = prior.sample(500, torch.tensor([value]), generator=torch.Generator().manual_seed(1))
        assert torch.allclose(s.mean(0), torch.full((2,), 3 * value), atol=0.25)
    with pytest.raises(GalgenInputError, match="context"):
        prior.log_prob(z[:5])


def test_sampling_priors_conditions_and_config_roundtrip(tmp_path):
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8, conditions=("mag",), prior={"kind": "maf", "transforms": 2,
                                                                      "hidden": [16]})
    vae.set_condition_stats([17.0], [1.0])
    with pytest.raises(GalgenInputError, match="not fitted"):
        vae.sample(2, cond=torch.tensor([17.0]), prior="flow")
    with pytest.raises(GalgenInputError, match="cond"):
        vae.sample(2, prior="normal")
    with pytest.raises(GalgenInputError, match="cond: expected shape"):
        vae.sample(2, cond=torch.zeros(3, 1), prior="normal")
    codes = torch.randn(200, 4)
    vae.fit_prior(codes, torch.full((200, 1), 17.0), epochs=2)
    img = vae.sample(3, cond=torch.tensor([17.5]), generator=torch.Generator().manual_seed(0))
    assert img.shape == (3, 32, 32) and bool((img >= 0).all())
    again = vae.sample(3, cond=torch.tensor([17.5]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(img, again)
    assert vae.latent_log_prob(codes[:5], torch.full((5, 1), 17.0)).shape == (5,)
    normal = vae.latent_log_prob(torch.zeros(1, 4), torch.full((1, 1), 17.0), prior="normal")
    assert torch.allclose(normal, torch.tensor([-2 * math.log(2 * math.pi)]))
    path = save_checkpoint(tmp_path / "vae.pt", model_state=vae.state_dict(), config=vae.config)
    ck = load_checkpoint(path)
    clone = VAE.from_config(ck["config"])
    clone.load_state_dict(ck["model"])  # strict: same architecture, flow included
    assert bool(clone.prior.fitted) and clone.conditions == ("mag",)
    assert torch.equal(clone.sample(3, cond=torch.tensor([17.5]), generator=torch.Generator().manual_seed(0)), img)
    with pytest.raises(GalgenInputError, match="prior.kind"):
        VAE(32, latent_dim=4, width=8, prior={"kind": "realnvp"})
