"""The PSF-aware VAE: ELBO terms against closed forms, learning, the flow prior, sampling, configs."""

import math

import numpy as np
import pytest
import torch

from galgen.data import CutoutDataset
from galgen.errors import GalgenInputError
from galgen.models import VAE, Batch, good_pixels
from galgen.physics import GaussianNoise, Observation, gaussian_psf
from galgen.train import load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_batch(n=4, stamp=32, cond=None, seed=0):
    """Noise-like cutouts; galaxy i has its first i rows masked."""
    g = torch.Generator().manual_seed(seed)
    psf = gaussian_psf(1.2, 15, 0.4)
    var = torch.full((n, stamp, stamp), 4.0)
    mask = torch.zeros(n, stamp, stamp, dtype=torch.bool)
    for i in range(n):
        mask[i, :i] = True
    obs = Observation(psf, pixel_scale=0.4, stamp=stamp, noise=GaussianNoise(var, mask))
    return Batch(observed=torch.randn(n, stamp, stamp, generator=g) * 2 + 1, observation=obs, cond=cond)


def test_elbo_terms_match_closed_forms():
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=6, width=8, input_scale=2.0, flux_scale=3.0)
    with torch.no_grad():  # a posterior away from N(0, I), so that the KL is not trivially small
        vae.head[1].bias[:6] = torch.linspace(-1, 1, 6)
        vae.head[1].bias[6:] = torch.linspace(-2, 1, 6)
    batch = toy_batch()
    t = vae.elbo(batch, generator=torch.Generator().manual_seed(1))
    assert set(t) == {"nll", "kl", "elbo", "bits_per_pixel"} and all(v.shape == (4,) for v in t.values())
    with torch.no_grad():
        mu, logvar = vae.encoder_moments(batch.observed)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = torch.distributions.kl_divergence(q, p).sum(1)
    assert float(kl.min()) > 1.0
    assert torch.allclose(t["kl"], kl, rtol=1e-5, atol=1e-5)
    # the same eps, by hand: z -> intrinsic -> PSF -> Gaussian log-likelihood of the masked data
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model = batch.observation.noiseless(vae.decode(mu + eps * (0.5 * logvar).exp()))
    good = ~batch.observation.noise.mask
    r2 = ((batch.observed - model) ** 2 / 4.0 + math.log(2 * math.pi * 4.0)) * good
    assert torch.allclose(t["nll"], 0.5 * r2.sum((1, 2)), rtol=1e-5)
    assert torch.allclose(t["elbo"], -t["nll"] - t["kl"])
    n_good = torch.tensor([32 * (32 - i) for i in range(4)], dtype=torch.float32)  # galaxy i: i rows masked
    assert torch.allclose(t["bits_per_pixel"], -t["elbo"] / (n_good * math.log(2)))
    # beta weighs the KL in the bound; nll and kl themselves do not change
    t2 = vae.elbo(batch, beta=0.25, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(t2["nll"], t["nll"]) and torch.allclose(t2["kl"], t["kl"])
    assert torch.allclose(t2["elbo"], -t["nll"] - 0.25 * t["kl"])
    # the generator fixes the reparameterisation noise
    assert torch.equal(vae.elbo(batch, generator=torch.Generator().manual_seed(1))["nll"], t["nll"])
    assert not torch.equal(vae.elbo(batch, generator=torch.Generator().manual_seed(2))["nll"], t["nll"])


def test_kl_warmup_schedule():
    vae = VAE(32, latent_dim=2, width=8, beta=0.5, warmup_steps=4)
    assert [vae.beta_at(s) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [VAE(32, latent_dim=2, width=8, beta=2.0).beta_at(s) for s in (0, 100)] == [2.0, 2.0]


def test_training_and_validation_steps_follow_the_contract():
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8, input_scale=2.0, beta=0.5, warmup_steps=10)
    opts = vae.make_optimizers(lr=1e-3)
    batch = toy_batch()
    synced = []
    before = vae.decoder.project.weight.detach().clone()
    out = vae.training_step(batch, opts, step=1, sync=lambda params: synced.append(len(list(params))))
    assert set(out) == {"loss", "elbo", "kl", "nll", "beta", "bits_per_pixel"}
    assert all(v.ndim == 0 and not v.requires_grad for v in out.values())
    assert float(out["beta"]) == pytest.approx(0.1)
    assert synced == [len(list(vae.parameters()))]
    assert not torch.equal(before, vae.decoder.project.weight)
    assert float(out["elbo"]) == pytest.approx(-float(out["nll"]) - float(out["kl"]), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(out["nll"]) + 0.1 * float(out["kl"]), rel=1e-5)
    val = vae.validation_step(batch)
    assert set(val) == {"loss", "elbo", "kl", "nll", "bits_per_pixel", "chi2_pixel"}
    assert all(v.shape == (4,) for v in val.values())
    assert torch.allclose(val["loss"], -val["elbo"])
    assert torch.allclose(val["chi2_pixel"], vae.anomaly_score(batch.observed, batch.observation))


def test_brief_training_beats_the_mean_image(sdss_small):
    torch.manual_seed(0)
    ds = CutoutDataset(sdss_small)
    scale = ds.attrs["pixel_scale"]
    sky_sigma = float(np.sqrt(ds.attrs["sky_level"] / ds.attrs["gain"]))
    peak = float(np.median([ds[i]["observed"].max() for i in range(len(ds))]))
    every = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))  # all 60, read once

    def as_batch(idx):
        items = {k: v[idx] for k, v in every.items()}
        return Batch(items["observed"], Observation.from_batch(items, pixel_scale=scale))

    vae = VAE(48, latent_dim=8, width=8, input_scale=sky_sigma, flux_scale=peak, warmup_steps=50)
    opts = vae.make_optimizers(lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(150):
        batch = as_batch(torch.randperm(len(ds), generator=g)[:20])
        losses.append(float(vae.training_step(batch, opts, step)["loss"]))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    full = as_batch(torch.arange(len(ds)))
    chi2_vae = vae.anomaly_score(full.observed, full.observation)  # posterior mean, through each PSF
    mean_image = full.observed.mean(0, keepdim=True).expand_as(full.observed)
    chi2_mean = full.observation.noise.chi2(full.observed, mean_image) / good_pixels(full.observed,
                                                                                    full.observation)
    assert torch.median(chi2_vae) < 0.7 * torch.median(chi2_mean), (torch.median(chi2_vae), torch.median(chi2_mean))
    val = vae.validation_step(full)
    assert torch.allclose(val["chi2_pixel"], chi2_vae)


def test_aggregate_posterior_draws_from_each_q():
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=3, width=8, input_scale=2.0)
    with torch.no_grad():
        vae.head[1].bias[3:] = math.log(0.5**2)  # posterior sigma about 0.5
    batches = [toy_batch(2, seed=0), toy_batch(2, seed=1)]
    codes, cond = vae.aggregate_posterior(batches, samples_per_galaxy=400, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2 * 2 * 400, 3) and cond is None
    mu, logvar = vae.encoder_moments(batches[0].observed)
    draws = codes[:800].view(400, 2, 3)  # batch 0: samples x galaxies x latents
    assert torch.allclose(draws.mean(0), mu.detach(), atol=0.1)
    assert torch.allclose(draws.std(0), (0.5 * logvar.detach()).exp(), rtol=0.15)
    again, _ = vae.aggregate_posterior(batches, samples_per_galaxy=400, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, again)
    with pytest.raises(GalgenInputError, match="samples_per_galaxy"):
        vae.aggregate_posterior(batches, samples_per_galaxy=0)
    with pytest.raises(GalgenInputError, match="no galaxies"):
        vae.aggregate_posterior([])


def test_fit_prior_from_batches_then_sample_from_the_flow():
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=2, width=8, input_scale=2.0, prior={"transforms": 1, "hidden": [16]})
    assert vae.config["prior"] == {"kind": "nsf", "transforms": 1, "hidden": [16]}
    g = torch.Generator().manual_seed(0)
    z = vae.sample_latents(3, generator=g)  # unfitted: N(0, I) by default
    assert torch.equal(z, torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(GalgenInputError, match="not fitted"):
        vae.sample(2, prior="flow")
    with pytest.raises(GalgenInputError, match="not fitted"):
        vae.with_prior("flow")
    batches = [toy_batch(4, seed=s) for s in range(3)]
    hist = vae.fit_prior(batches, samples_per_galaxy=20, epochs=3, generator=torch.Generator().manual_seed(0))
    assert hist["epochs"] == 3 and bool(vae.latent_flow.fitted)
    img = vae.sample(3, generator=torch.Generator().manual_seed(4))  # default is now the flow
    assert img.shape == (3, 32, 32) and bool((img >= 0).all())
    assert torch.equal(img, vae.sample(3, generator=torch.Generator().manual_seed(4), prior="flow"))
    assert not torch.equal(img, vae.sample(3, generator=torch.Generator().manual_seed(4), prior="normal"))
    z = torch.randn(5, 2)
    assert torch.allclose(vae.prior().log_prob(z), vae.latent_flow.log_prob(z))
    normal = vae.with_prior("normal").prior().log_prob(z)
    assert torch.allclose(normal, torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1))
    with pytest.raises(GalgenInputError, match=r"one of \['flow', 'mixture', 'normal'\]"):
        vae.sample(2, prior="uniform")
    with pytest.raises(GalgenInputError, match="latents_or_batches"):
        vae.fit_prior(3)


def test_conditioning_checkpoint_and_config_roundtrip(tmp_path):
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8, conditions=("mag",), prior={"kind": "maf", "transforms": 2,
                                                                      "hidden": [16]})
    vae.set_condition_stats([17.0], [1.0])
    with pytest.raises(GalgenInputError, match="cond"):
        vae.sample(2, prior="normal")
    with pytest.raises(GalgenInputError, match=r"cond: expected shape \(2, 1\)"):
        vae.sample(2, cond=torch.zeros(3, 1), prior="normal")
    with pytest.raises(GalgenInputError, match="cond"):
        vae.encode(torch.zeros(2, 32, 32))
    mu, _ = vae.encoder_moments(torch.zeros(2, 32, 32), torch.tensor([[16.0], [18.0]]))
    assert not torch.allclose(mu[0], mu[1])  # the encoder sees the conditions
    normal = vae.sample(2, cond=torch.tensor([16.0]), prior="normal", generator=torch.Generator().manual_seed(0))
    other = vae.sample(2, cond=torch.tensor([18.0]), prior="normal", generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(normal, other)  # and so does the decoder
    codes = torch.randn(200, 4) + torch.linspace(-1, 1, 200)[:, None]
    mags = torch.linspace(16, 18, 200)[:, None]
    vae.fit_prior(codes, mags, epochs=2)
    img = vae.sample(3, cond=torch.tensor([17.5]), generator=torch.Generator().manual_seed(0))
    assert img.shape == (3, 32, 32) and bool((img >= 0).all())
    assert vae.prior(mags[:5]).log_prob(codes[:5]).shape == (5,)
    path = save_checkpoint(tmp_path / "vae.pt", model_state=vae.state_dict(), config=vae.config)
    ck = load_checkpoint(path)
    clone = VAE.from_config(ck["config"])
    assert clone.config == vae.config and not bool(clone.latent_flow.fitted)
    clone.load_state_dict(ck["model"])  # strict: same architecture, flow included
    assert bool(clone.latent_flow.fitted) and clone.conditions == ("mag",)
    assert torch.equal(clone.cond_mean, torch.tensor([17.0]))
    for key, value in vae.latent_flow.state_dict().items():
        assert torch.equal(clone.latent_flow.state_dict()[key], value), key
    assert torch.equal(clone.sample(3, cond=torch.tensor([17.5]), generator=torch.Generator().manual_seed(0)), img)
    assert torch.allclose(clone.prior(mags[:5]).log_prob(codes[:5]), vae.prior(mags[:5]).log_prob(codes[:5]))


def test_bad_options():
    with pytest.raises(GalgenInputError, match="prior.kind"):
        VAE(32, latent_dim=4, width=8, prior={"kind": "realnvp"})
    with pytest.raises(GalgenInputError, match="unknown option"):
        VAE(32, latent_dim=4, width=8, prior={"bins": 8})
    with pytest.raises(GalgenInputError, match="latent_dim"):
        VAE(32, latent_dim=0)
    with pytest.raises(GalgenInputError, match="input_scale"):
        VAE(32, input_scale=0.0)
    with pytest.raises(GalgenInputError, match="beta"):
        VAE(32, beta=-1.0)
    with pytest.raises(GalgenInputError, match="kind 'ae'"):
        VAE.from_config({"kind": "ae", "stamp": 32})
    vae = VAE(32, latent_dim=4, width=8)
    with pytest.raises(GalgenInputError, match="not conditioned"):
        vae.sample(2, cond=torch.zeros(2, 1), prior="normal")
    with pytest.raises(GalgenInputError, match=r"z: expected shape \(B, 4\)"):
        vae.decode(torch.zeros(2, 3))
    with pytest.raises(GalgenInputError, match="temperature"):
        vae.sample(2, prior="normal", temperature=0.0)


def test_flux_shape_decoder_starts_as_a_sersic_galaxy_and_fits_with_lm(tmp_path):
    """decoder="flux-shape": images sum to the flux head's F, start as F * softmax(-Sersic
    template), survive a checkpoint, and the Levenberg-Marquardt fitter (forward-mode
    Jacobians through the warp) reaches the optimum Adam reaches."""
    from galgen.inference import fit_map
    from galgen.models.networks import FluxShapeGenerator

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8, decoder="flux-shape", log_flux=(math.log(5000.0), 0.3)).eval()
    assert isinstance(vae.decoder, FluxShapeGenerator) and vae.config["decoder"] == "flux-shape"
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = vae.decode(z)
        flux = vae.decoder.log_flux(z).exp()
        seed = torch.softmax(-vae.decoder.template(z).flatten(1), 1).view(3, 32, 32) * flux[:, None, None]
    assert bool((img >= 0).all()) and torch.allclose(img.sum((1, 2)), flux, rtol=1e-5)
    assert torch.allclose(img, seed, rtol=1e-5, atol=1e-6 * float(flux.max()))  # the body starts at zero
    torch.nn.init.normal_(vae.decoder.shape.out.weight, std=0.2)  # a body that draws structure
    path = save_checkpoint(tmp_path / "vae.pt", model_state=vae.state_dict(), config=vae.config)
    clone = VAE.from_config(load_checkpoint(path)["config"])
    clone.load_state_dict(load_checkpoint(path)["model"])
    with torch.no_grad():
        img = vae.decode(z)
        assert torch.equal(clone.decode(z), img)
    assert "decoder" not in VAE(32, latent_dim=4, width=8).config  # conv-decoder configs are unchanged
    obs = Observation(gaussian_psf(torch.full((3,), 1.5), 15, 1.0).float(), pixel_scale=1.0, stamp=32,
                      noise=GaussianNoise(torch.full((3, 32, 32), 4.0)))
    with torch.no_grad():
        data = obs.noise.sample(obs.noiseless(img), generator=torch.Generator().manual_seed(2))
    lm = fit_map(vae, data, obs, optimizer="lm")
    adam = fit_map(vae, data, obs, optimizer="adam", lr=0.02, max_iter=800, tol=1e-9, patience=50)
    assert (lm.status == 0).all() and (lm.n_iter <= 40).all()
    assert (lm.log_posterior >= adam.log_posterior - 1e-3 * adam.log_posterior.abs()).all()
    assert (lm.reduced_chi2 <= adam.reduced_chi2 + 0.01).all(), (lm.reduced_chi2, adam.reduced_chi2)
    with pytest.raises(GalgenInputError, match="decoder"):
        VAE(32, decoder="diffusion")
    assert vae.map_optimizer == "lm" and VAE(32, latent_dim=4, width=8).map_optimizer == "adam"  # fit_map's default


def test_bulge_disk_seed_is_the_parametric_bulge_disk_galaxy_and_reseeding_keeps_the_weights():
    """seed_profile="bulge-disk": with the body at zero the decoder draws F times the
    unit-flux image of galgen's parametric bulge + disk model at the moments head's
    parameters (to float32 precision); reseed_bulge_disk keeps the encoder, the body and
    the flux of a Sersic-seeded VAE and maps the Sersic's size, shear and index onto both
    components and B/T = (n - 1/2) / 5.5; a conv VAE cannot take the option."""
    from galgen.models import reseed_bulge_disk
    from galgen.models.parametric import SersicModel

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8, decoder="flux-shape", seed_profile="bulge-disk",
              log_flux=(math.log(5000.0), 0.3)).eval()
    assert vae.config["seed_profile"] == "bulge-disk"
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img, p = vae.decode(z), vae.decoder.shape_parameters(z)
        flux = vae.decoder.log_flux(z).exp()

    def eta(g1, g2):  # SersicModel's shear parameters: g = 0.9 tanh|eta| eta / |eta|
        g = torch.sqrt(g1**2 + g2**2)
        return torch.atanh(g / 0.9) * g1 / g, torch.atanh(g / 0.9) * g2 / g

    s0 = vae.decoder.template_sigma  # pixel_scale 1: sizes in intrinsic pixels
    theta = torch.stack([torch.logit(p["bt"]), math.log(s0) + p["log_size_bulge"], math.log(s0) + p["log_size"],
                         *eta(p["g1_bulge"], p["g2_bulge"]), *eta(p["g1"], p["g2"]),
                         torch.atanh(p["dx"] / 2), torch.atanh(p["dy"] / 2)], 1)  # centroid offset 2 tanh(u) pixels
    assert float(p["dx"].abs().max()) > 0.01  # an untrained network seed is off centre
    ref = SersicModel("bulge-disk", stamp=32, pixel_scale=1.0).decode(theta)
    ref = ref / ref.sum((1, 2), keepdim=True) * flux[:, None, None]
    assert torch.allclose(img, ref, rtol=1e-4, atol=1e-5 * float(flux.max()))
    assert 0 < float(p["bt"].min()) and float(p["bt"].max()) < 1

    sersic = VAE(32, latent_dim=10, width=8, decoder="flux-shape", log_flux=(math.log(5000.0), 0.3)).eval()
    torch.nn.init.normal_(sersic.decoder.shape.out.weight, std=0.2)
    bd = reseed_bulge_disk(sersic)
    x = torch.rand(3, 32, 32) * 100
    z = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(bd.encoder_moments(x)[0], sersic.encoder_moments(x)[0])
        assert torch.equal(bd.decoder.shape.logits(z), sersic.decoder.shape.logits(z))
        assert torch.equal(bd.decoder.log_flux(z), sersic.decoder.log_flux(z))
        old, new = sersic.decoder.shape_parameters(z), bd.decoder.shape_parameters(z)
    for k in ("log_size", "g1", "g2"):
        assert torch.allclose(new[k], old[k]) and torch.allclose(new[k + "_bulge"], old[k])
    assert torch.allclose(new["bt"], (old["n"] - 0.5) / 5.5, atol=1e-6)
    assert float(new["dx"].abs().max()) == 0 and float(new["dy"].abs().max()) == 0
    with pytest.raises(GalgenInputError, match="seed_profile"):
        VAE(32, latent_dim=4, width=8, seed_profile="bulge-disk")
    with pytest.raises(GalgenInputError, match="network seed"):
        reseed_bulge_disk(bd)
    # seed_latents: the seed's parameters are the first 9 coordinates, each through its affine map
    lat = reseed_bulge_disk(bd, seed_latents=True).eval()
    with torch.no_grad():
        assert torch.equal(lat.decoder.shape.logits(z), sersic.decoder.shape.logits(z))
        h = lat.decoder.moments(z)
        loc, scale = lat.decoder.moments.loc, lat.decoder.moments.log_scale.exp()
        assert torch.allclose(h, loc + scale * z[:, :9])
        z2 = z.clone()
        z2[:, 9:] += 1.0  # the body's coordinates move, the seed does not
        assert torch.equal(lat.decoder.moments(z2), h)
        p = lat.decoder.shape_parameters(z)
        assert torch.allclose(p["bt"], torch.sigmoid(h[:, 3])) and torch.allclose(p["log_size_bulge"], h[:, 4])
    with pytest.raises(GalgenInputError, match="network seed"):
        reseed_bulge_disk(lat, seed_latents=True)


def test_symmetry_gate_closed_draws_point_symmetric_galaxies_with_the_same_flux(tmp_path):
    """symmetry_gate: image = S + w (I - S), S the part of I point-symmetric about the centre
    pixel. A closed gate gives an exactly symmetric galaxy (its image equals its rotation by
    180 degrees, and its asymmetry statistic is nil) with the ungated total flux; an open one
    gives the ungated image back; add_symmetry_gate keeps every weight and starts at w = 0.5;
    the gate learns in the ELBO's gradient; a gated model survives a checkpoint."""
    from galgen.evaluation import morphology_statistics
    from galgen.models import FluxShapeGenerator, add_symmetry_gate
    from galgen.models.networks import point_reflect

    # point_reflect is the rotation by 180 degrees about pixel (H//2, W//2)
    x = torch.randn(2, 7, 7)
    assert torch.equal(point_reflect(x), torch.rot90(x, 2, (1, 2)))  # odd: the centre is the middle
    y = torch.randn(2, 8, 8)
    assert torch.equal(point_reflect(y)[:, 1:, 1:], torch.rot90(y[:, 1:, 1:], 2, (1, 2)))  # even: about (4, 4)
    assert torch.equal(point_reflect(point_reflect(y)), y)

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=10, width=8, decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True,
              log_flux=(math.log(5000.0), 0.3)).eval()
    torch.nn.init.normal_(vae.decoder.shape.out.weight, std=0.3)  # a body that draws lopsided structure
    gated = add_symmetry_gate(vae).eval()
    assert gated.config["symmetry_gate"] and "symmetry_gate" not in vae.config
    z = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    z[:, 7:9] = 0.0  # the seed on the centre pixel
    with torch.no_grad():
        assert torch.allclose(gated.decoder.asymmetry_gate(z), torch.full((4,), 0.5))
        free = vae.decode(z)
        gated.decoder.gate[2].bias.fill_(-1.0)  # closed: w = sigmoid(-40)
        closed = gated.decode(z)
        gated.decoder.gate[2].bias.fill_(1.0)  # open: w = 1 - 4e-18
        opened = gated.decode(z)
    assert torch.allclose(opened, free, rtol=1e-5, atol=1e-6 * float(free.max()))
    assert torch.allclose(closed, point_reflect(closed), rtol=1e-5, atol=1e-7 * float(free.max()))
    assert torch.allclose(closed.sum((1, 2)), free.sum((1, 2)), rtol=1e-5) and float(closed.min()) >= 0
    a_free = morphology_statistics(free.numpy(), 1.0)["asymmetry"]
    a_closed = morphology_statistics(closed.numpy(), 1.0)["asymmetry"]
    assert np.all(a_free > 0.02) and np.all(a_closed < 2e-3), (a_free, a_closed)

    # the gate's weights take gradients through the ELBO
    gated.train()
    gated.decoder.gate[2].bias.data.fill_(0.01)
    batch = toy_batch(stamp=32)
    loss = -gated.elbo(batch, generator=torch.Generator().manual_seed(0))["elbo"].mean()
    loss.backward()
    assert float(gated.decoder.gate[2].weight.grad.abs().sum()) > 0

    path = save_checkpoint(tmp_path / "gated.pt", model_state=gated.state_dict(), config=gated.config)
    clone = VAE.from_config(load_checkpoint(path)["config"])
    clone.load_state_dict(load_checkpoint(path)["model"])
    with torch.no_grad():
        assert torch.equal(clone.eval().decode(z), gated.eval().decode(z))
    with pytest.raises(GalgenInputError, match="symmetry gate"):
        add_symmetry_gate(gated)
    # the latent gate: sigmoid(4 z_k) of a new last coordinate, which starts narrow (log-variance -4)
    lat = add_symmetry_gate(vae, "latent", generator=torch.Generator().manual_seed(0)).eval()
    assert lat.latent_dim == 11 and lat.config["symmetry_gate"] == "latent"
    with torch.no_grad():
        mu, logvar = lat.encoder_moments(toy_batch(stamp=32).observed)
        assert float(mu[:, 10].abs().max()) == 0 and torch.allclose(logvar[:, 10], torch.tensor(-4.0))
        zk = torch.cat([z, torch.full((4, 1), -5.0)], 1)  # w = sigmoid(-20)
        closed_lat = lat.decode(zk)
        assert torch.allclose(lat.decoder.asymmetry_gate(zk), torch.zeros(4), atol=1e-8)
        flux = lat.decoder.log_flux(zk).exp()
    assert torch.allclose(closed_lat, point_reflect(closed_lat), rtol=1e-5, atol=1e-7 * float(free.max()))
    assert torch.allclose(closed_lat.sum((1, 2)), flux, rtol=1e-5)
    with pytest.raises(GalgenInputError, match="kind"):
        add_symmetry_gate(vae, "both")
    with pytest.raises(GalgenInputError, match="gate_coordinate"):  # a seed coordinate cannot be the gate's
        FluxShapeGenerator(32, 10, width=8, profile="bulge-disk", seed_latents=True, symmetry_gate="latent",
                           gate_coordinate=3)
    with pytest.raises(GalgenInputError, match="symmetry_gate"):
        VAE(32, latent_dim=4, width=8, symmetry_gate="network")


def test_free_bits_floor_each_coordinates_kl_in_training_only():
    """free_bits: the training loss charges each coordinate max(batch-mean KL, free_bits). With
    a floor above every coordinate's KL the gradient is the likelihood's alone (no push towards
    the prior); with a floor below every one the loss is the ELBO's; the logged and validated
    KL is the true one; the option is in the config only when set; bad values are refused."""
    batch = toy_batch(stamp=32)

    def step(vae, seed=0):
        vae.zero_grad()
        torch.manual_seed(seed)
        out = vae.training_step(batch, {"model": torch.optim.SGD(vae.parameters(), lr=0.0)}, step=0)
        return out, [p.grad.clone() for p in vae.head.parameters()]

    torch.manual_seed(0)
    plain = VAE(32, latent_dim=4, width=8).train()
    state = plain.state_dict()
    high, low = VAE(32, latent_dim=4, width=8, free_bits=1e6).train(), VAE(32, latent_dim=4, width=8, free_bits=1e-9)
    high.load_state_dict(state)
    low.load_state_dict(state)
    assert high.config["free_bits"] == 1e6 and "free_bits" not in plain.config
    assert VAE(**{k: v for k, v in high.config.items() if k != "kind"}).config == high.config
    out_plain, g_plain = step(plain)
    out_low, g_low = step(low.train())
    out_high, g_high = step(high)
    assert torch.allclose(out_low["loss"], out_plain["loss"], rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_low, g_plain))
    # the true KL is logged; the loss charges 4 x 1e6 nats
    assert torch.allclose(out_high["kl"], out_plain["kl"]) and float(out_high["loss"]) > 4e6
    # the likelihood's gradient alone
    plain.zero_grad()
    torch.manual_seed(0)
    plain.elbo(batch)["nll"].mean().backward()
    g_nll = [p.grad.clone() for p in plain.head.parameters()]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_high, g_nll))
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_plain, g_nll))  # the KL's pull
    for bad in (-1.0, float("nan"), True, "1"):
        with pytest.raises(GalgenInputError, match="free_bits"):
            VAE(32, latent_dim=4, width=8, free_bits=bad)


def test_added_latents_start_at_their_prior_and_can_learn():
    """add_latents: the grown VAE has the same KL and, with the new coordinates at zero, the
    same galaxies as its source; the new coordinates' posterior is N(0, 1); the decoder's new
    columns are not zero, so the ELBO's gradient reaches the encoder's new rows; bad
    arguments are refused."""
    from galgen.models import add_latents

    torch.manual_seed(0)
    for kwargs in (dict(decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True, symmetry_gate="network",
                        log_flux=(math.log(5000.0), 0.3)), dict()):
        vae = VAE(32, latent_dim=16, width=8, **kwargs).eval()
        torch.nn.init.normal_(vae.head[1].weight, std=0.05)  # a trained-looking posterior
        grown = add_latents(vae, 3, generator=torch.Generator().manual_seed(1)).eval()
        assert grown.latent_dim == 19 and grown.config["latent_dim"] == 19
        assert grown.encoder.head.out_features == 76  # max(64, 4 * 19): the encoder's features grew too
        batch = toy_batch(stamp=32)
        with torch.no_grad():
            mu, logvar = vae.encoder_moments(batch.observed)
            mu2, logvar2 = grown.encoder_moments(batch.observed)
            assert torch.allclose(mu2[:, :16], mu, atol=1e-6) and torch.allclose(logvar2[:, :16], logvar, atol=1e-6)
            assert float(mu2[:, 16:].abs().max()) == 0 and float(logvar2[:, 16:].abs().max()) == 0
            z = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
            old = vae.decode(z)
            assert torch.allclose(grown.decode(torch.cat([z, torch.zeros(4, 3)], 1)), old, rtol=1e-5,
                                  atol=1e-6 * float(old.abs().max()))
            moved = grown.decode(torch.cat([z, torch.ones(4, 3)], 1))
            assert not torch.allclose(moved, old, rtol=1e-3, atol=1e-4 * float(old.abs().max()))
            g = torch.Generator().manual_seed(0)
            kl_old = vae.elbo(batch, generator=g)["kl"]
            kl_new = grown.elbo(batch, generator=torch.Generator().manual_seed(0))["kl"]
        assert torch.allclose(kl_new, kl_old, rtol=1e-5, atol=1e-5)
        grown.train()
        (-grown.elbo(batch, generator=torch.Generator().manual_seed(0))["elbo"].mean()).backward()
        grad = grown.head[1].weight.grad
        assert float(grad[16:19].abs().sum()) > 0 and float(grad[35:38].abs().sum()) > 0  # new mean, logvar rows
        assert float(grown.head[1].weight.grad[:, 64:76].abs().sum()) > 0  # the new features are alive
    with pytest.raises(GalgenInputError, match="extra"):
        add_latents(vae, 0)
    with pytest.raises(GalgenInputError, match="VAE"):
        add_latents(torch.nn.Linear(2, 2), 1)


def test_added_latents_go_before_a_latent_gate_which_stays_last():
    """add_latents on a VAE with a latent symmetry gate: the gate's coordinate stays the last
    (its encoder rows, its gate value), the new ones are inserted before it, and with them
    at zero the grown VAE draws the source's galaxies, gated as before."""
    from galgen.models import add_latents

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=17, width=8, decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True,
              symmetry_gate="latent", log_flux=(math.log(5000.0), 0.3)).eval()
    torch.nn.init.normal_(vae.head[1].weight, std=0.05)
    torch.nn.init.normal_(vae.decoder.shape.out.weight, std=0.3)  # a lopsided body, so that the gate matters
    grown = add_latents(vae, 3, generator=torch.Generator().manual_seed(1)).eval()
    assert grown.latent_dim == 20 and grown.decoder.gate_coordinate == 19
    batch = toy_batch(stamp=32)
    with torch.no_grad():
        mu, logvar = vae.encoder_moments(batch.observed)
        mu2, logvar2 = grown.encoder_moments(batch.observed)
        assert torch.allclose(mu2[:, :16], mu[:, :16], atol=1e-6) and torch.allclose(mu2[:, 19], mu[:, 16], atol=1e-6)
        assert torch.allclose(logvar2[:, 19], logvar[:, 16], atol=1e-6)
        assert float(mu2[:, 16:19].abs().max()) == 0 and float(logvar2[:, 16:19].abs().max()) == 0
        z = torch.randn(4, 17, generator=torch.Generator().manual_seed(2))
        z[:, 16] = torch.tensor([-2.0, -0.3, 0.4, 2.0])
        zg = torch.cat([z[:, :16], torch.zeros(4, 3), z[:, 16:]], 1)
        assert torch.allclose(grown.decoder.asymmetry_gate(zg), vae.decoder.asymmetry_gate(z))
        old = vae.decode(z)
        assert torch.allclose(grown.decode(zg), old, rtol=1e-5, atol=1e-6 * float(old.abs().max()))
        # the gate's coordinate is still read by the gate alone
        zg2 = zg.clone()
        zg2[:, 19] = 10.0
        full = grown.decode(zg2)
        assert torch.allclose(grown.decode(zg).sum((1, 2)), full.sum((1, 2)), rtol=1e-5)


def test_added_latents_go_before_a_companions_coordinates_which_stay_last():
    """add_latents on a VAE with a latent companion and a latent gate: the companion's seven
    coordinates and the gate's keep their place at the end (the model reads them there), the
    new ones go before them, and with the new ones at zero the grown VAE has its source's
    posterior moments (the locator's included) and draws its galaxies. Before this, the new
    coordinates went after the companion's, which the grown model then read as new
    coordinates: its galaxies and its encoder's companion moments were not the source's."""
    from galgen.models import add_latents, add_symmetry_gate

    vae = add_symmetry_gate(_companion_vae(), "latent", generator=torch.Generator().manual_seed(0)).eval()
    torch.nn.init.normal_(vae.head[1].weight, std=0.05)
    torch.nn.init.normal_(vae.locator_head.weight, std=0.05)  # the locator's moments matter
    assert vae.decoder.companion.start == 9 and vae.decoder.gate_coordinate == 16
    grown = add_latents(vae, 3, generator=torch.Generator().manual_seed(1)).eval()
    assert grown.latent_dim == 20 and grown.decoder.companion.start == 12 and grown.decoder.gate_coordinate == 19
    old_to_new = list(range(9)) + list(range(12, 20))
    x = 100 * torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mu, lv = vae.encoder_moments(x)
        mu2, lv2 = grown.encoder_moments(x)
        assert torch.allclose(mu2[:, old_to_new], mu, atol=1e-6) and torch.allclose(lv2[:, old_to_new], lv, atol=1e-6)
        assert float(mu2[:, 9:12].abs().max()) == 0 and float(lv2[:, 9:12].abs().max()) == 0
        z = torch.randn(4, 17, generator=torch.Generator().manual_seed(2))
        z[:, 9] = 1.5  # a bright companion
        zg = torch.zeros(4, 20)
        zg[:, old_to_new] = z
        old = vae.decode(z)
        assert torch.allclose(grown.decode(zg), old, rtol=1e-5, atol=1e-6 * float(old.abs().max()))


def test_grow_vae_script_writes_a_model_to_fine_tune(tmp_path, pipeline_script):
    """pipelines/grow_vae.py: the written checkpoint loads as the grown model (gate and
    latents) with the source's weights and a provenance naming it; the same seed gives the
    same file's weights; asking for nothing is refused."""
    from galgen.checkpoints import load_model

    grow = pipeline_script("grow_vae")
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=10, width=8, decoder="flux-shape", log_flux=(math.log(5000.0), 0.3))
    src = save_checkpoint(tmp_path / "src.pt", model_state=vae.state_dict(), config=vae.config)
    for name in ("a.pt", "b.pt"):
        grow.main(["--from", str(src), "--out", str(tmp_path / name), "--symmetry-gate", "network", "--latents", "2"])
    a, b = load_model(tmp_path / "a.pt"), load_model(tmp_path / "b.pt")
    assert a.config["symmetry_gate"] == "network" and a.latent_dim == 12 and a.provenance["grown_from"] == str(src)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.decoder.shape.out.weight, vae.decoder.shape.out.weight)
    # --scale: the decoder's new columns at that factor of the default initialisation (same draws)
    grow.main(["--from", str(src), "--out", str(tmp_path / "s.pt"), "--symmetry-gate", "network", "--latents", "2",
               "--scale", "1"])
    new_cols = [m.decoder.shape.project.weight[:, 10:12] for m in (a, load_model(tmp_path / "s.pt"))]
    assert torch.allclose(new_cols[1], 10 * new_cols[0], rtol=1e-5) and float(new_cols[0].abs().max()) > 0
    with pytest.raises(SystemExit):
        grow.main(["--from", str(src), "--out", str(tmp_path / "c.pt")])
    with pytest.raises(SystemExit):  # a warm start is the companion's
        grow.main(["--from", str(src), "--out", str(tmp_path / "c.pt"), "--latents", "1", "--warm-start", "x.h5"])
    seeded = VAE(32, latent_dim=10, width=8, decoder="flux-shape", log_flux=(math.log(5000.0), 0.3),
                 seed_profile="bulge-disk", seed_latents=True)
    src = save_checkpoint(tmp_path / "seeded.pt", model_state=seeded.state_dict(), config=seeded.config)
    grow.main(["--from", str(src), "--out", str(tmp_path / "d.pt"), "--symmetry-gate", "latent", "--companion"])
    d = load_model(tmp_path / "d.pt")
    assert d.config["companion"] and d.latent_dim == 18 and d.decoder.companion.start == 10
    assert d.decoder.gate_coordinate == 17 and d.locator is not None


def test_gate_posterior_recovers_the_weight_that_drew_the_galaxy():
    """VAE.gate_posterior: galaxies drawn as S + w0 A through a PSF with Gaussian noise give
    back w0 within their stated errors, the error being the Fisher one, (sum m_A^2 / var)^-1/2;
    the body, flux and seed do not read the gate's coordinate; the aggregate posterior's
    codes carry draws of that posterior, at the encoder's mean code, as logit(w) / 4."""
    from galgen.models import add_symmetry_gate

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=10, width=8, decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True,
              log_flux=(math.log(5000.0), 0.3)).eval()
    torch.nn.init.normal_(vae.decoder.shape.out.weight, std=0.3)
    lat = add_symmetry_gate(vae, "latent", generator=torch.Generator().manual_seed(0)).eval()
    n = 64
    g = torch.Generator().manual_seed(4)
    z = torch.randn(n, 11, generator=g)
    z[:, 7:9] = 0.0
    w0 = torch.rand(n, generator=g)
    z[:, 10] = torch.logit(w0) / 4
    psf = gaussian_psf(torch.full((n,), 1.5), 15, 1.0).float()
    var = torch.full((n, 32, 32), 4.0)
    obs = Observation(psf, pixel_scale=1.0, stamp=32, noise=GaussianNoise(var))
    with torch.no_grad():
        img = lat.decode(z)
        z_other = z.clone()
        z_other[:, 10] = 1.5  # another gate: the same body, flux and seed
        full = lat.decoder.shape.logits(lat.decoder._networks_input(z_other))
        assert torch.equal(full, lat.decoder.shape.logits(lat.decoder._networks_input(z)))
        data = obs.noise.sample(obs.noiseless(img), generator=torch.Generator().manual_seed(5))
        batch = Batch(observed=data, observation=obs)
        mean, std = lat.gate_posterior(z_other, batch)
        ungated = lat.decode(torch.cat([z[:, :10], torch.full((n, 1), 10.0)], 1))
        anti = obs.noiseless(ungated - 0.5 * (ungated + torch.flip(torch.roll(ungated, (-1, -1), (1, 2)), (1, 2))))
    fisher = (anti**2 / var).sum((1, 2))
    assert torch.allclose(std, fisher.rsqrt(), rtol=1e-3)
    inside = (w0 > 3 * std) & (w0 < 1 - 3 * std)  # away from the clamps at 0 and 1
    pull = ((mean - w0) / std)[inside]
    assert int(inside.sum()) > 20 and float(pull.abs().max()) < 4.5 and abs(float(pull.mean())) < 0.6, pull
    # the aggregate posterior draws each code's gate weight from N(w*, 1/a) at the encoder's mean code
    codes, _ = lat.aggregate_posterior([batch], samples_per_galaxy=200, generator=torch.Generator().manual_seed(6))
    w = torch.sigmoid(4 * codes[:, 10].double()).view(200, n)
    with torch.no_grad():
        m_enc, s_enc = lat.gate_posterior(lat.encode(data).mean, batch)
    ok = (m_enc > 4 * s_enc) & (m_enc < 1 - 4 * s_enc)
    assert int(ok.sum()) > 5
    assert torch.allclose(w.mean(0)[ok], m_enc[ok].double(), atol=float(4 * s_enc[ok].max() / 200**0.5) + 1e-4)
    assert torch.allclose(w.std(0)[ok], s_enc[ok].double(), rtol=0.25)
    # a galaxy whose likelihood wants no asymmetry (w* < 0) gets gate coordinates spread as the prior
    # spreads them where the gate is closed, not an atom at a clamp; one that wants w* = 0.3 gets it
    for w_star, check in ((-0.5, "closed"), (0.3, "open")):
        lat.gate_posterior = lambda zz, bb, w_star=w_star: (torch.full((len(zz),), w_star), torch.full((len(zz),), 0.01))
        codes, _ = lat.aggregate_posterior([batch], samples_per_galaxy=20, generator=torch.Generator().manual_seed(8))
        zk = codes[:, 10]
        wk = torch.sigmoid(4 * zk)
        if check == "closed":
            assert float(wk.max()) < 0.06 and float(zk.std()) > 0.3 and len(torch.unique(zk)) > 0.95 * len(zk)
        else:
            assert abs(float(wk.mean()) - 0.3) < 0.003 and abs(float(wk.std()) - 0.01) < 0.002
    del lat.gate_posterior
    # the ELBO draws each galaxy with its best gate: its nll is the least over the gate's range
    # for the same draw of the other coordinates, and the gate's coordinate has no KL term
    terms = lat.elbo(batch, generator=torch.Generator().manual_seed(7))
    mu, logvar = lat.encoder_moments(data)
    zq = mu + torch.randn(mu.shape, generator=torch.Generator().manual_seed(7)) * (0.5 * logvar).exp()
    assert torch.allclose(terms["kl"], 0.5 * (mu**2 + logvar.exp() - logvar - 1)[:, :10].sum(1), rtol=1e-5)
    with torch.no_grad():
        for zk in (-2.0, -0.5, 0.0, 0.5, 2.0):
            other = -obs.log_likelihood(lat.decode(torch.cat([zq[:, :10], torch.full((n, 1), zk)], 1)), data)
            assert bool((terms["nll"] <= other + 1e-5 * other.abs()).all())
    with pytest.raises(GalgenInputError, match="latent symmetry gate"):
        vae.gate_posterior(z[:, :10], batch)


def _companion_vae(gate=None):
    """A small seed-latent bulge + disk VAE with a companion (coordinates 9-15), whose encoder
    returns the same code for every image (head weights zero) so that tests know its
    reconstruction."""
    from galgen.models import add_companion

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=9, width=8, decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True,
              log_flux=(math.log(5000.0), 0.3), symmetry_gate=gate).eval()
    pair = add_companion(vae, generator=torch.Generator().manual_seed(1)).eval()
    torch.nn.init.normal_(pair.decoder.shape.out.weight, std=0.3)
    return pair


def test_add_companion_puts_its_coordinates_before_a_latent_gate():
    """add_companion: 7 coordinates, before a latent gate's, read by the companion alone; the
    gate's posterior leaves the companion ungated (galaxies drawn with a weight w0 and a
    companion give back w0)."""
    from galgen.models import add_symmetry_gate

    from galgen.models import add_companion

    pair = _companion_vae()
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=9, width=8, decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True,
              log_flux=(math.log(5000.0), 0.3)).eval()
    x = 100 * torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(7))
    grown = add_companion(vae)
    with torch.no_grad():  # the old coordinates' moments are kept
        mu, lv = grown.encoder_moments(x)
        mu0, lv0 = vae.encoder_moments(x)
        position, _ = grown.locator(torch.asinh(x / vae.input_scale))
    assert torch.allclose(mu[:, :9], mu0, atol=1e-5) and torch.allclose(lv[:, :9], lv0, atol=1e-5)
    # the companion starts at the prior's moments, its position at the locator's soft-argmax
    assert torch.equal(mu[:, [9, 12, 13, 14, 15]], torch.zeros(3, 5)) and torch.equal(lv[:, 9:], torch.zeros(3, 7))
    assert torch.allclose(mu[:, 10:12], position / 8, atol=1e-3)  # the position's coordinates are offset / 8 px
    with pytest.raises(GalgenInputError, match="without a companion"):
        add_companion(pair)
    lat = add_symmetry_gate(_companion_vae(), "latent", generator=torch.Generator().manual_seed(0)).eval()
    assert lat.latent_dim == 17 and lat.decoder.companion.start == 9 and lat.decoder.gate_coordinate == 16
    n = 48
    g = torch.Generator().manual_seed(4)
    z = torch.randn(n, 17, generator=g)
    z[:, 7:9] = 0.0
    z[:, 9] = 1.5   # a bright companion: flux fraction sigmoid(-2) = 0.12
    w0 = 0.2 + 0.6 * torch.rand(n, generator=g)
    z[:, 16] = torch.logit(w0) / 4
    psf = gaussian_psf(torch.full((n,), 1.5), 15, 1.0).float()
    obs = Observation(psf, pixel_scale=1.0, stamp=32, noise=GaussianNoise(torch.full((n, 32, 32), 1.0)))
    with torch.no_grad():
        data = obs.noiseless(lat.decode(z))  # noise-free: the vertex is w0 itself
        mean, _ = lat.gate_posterior(z, Batch(observed=data, observation=obs))
    assert torch.allclose(mean, w0, atol=2e-3), (mean - w0).abs().max()


def _fixed_code(vae, z0):
    """The encoder returns z0 (and log-variance 0) for every image."""
    with torch.no_grad():
        vae.head[1].weight.zero_()
        vae.head[1].bias.copy_(torch.cat([z0, torch.zeros_like(z0)]))


def _with_companions(vae, n, has):
    """A companion-free code z0 that the encoder returns for every image, and n noisy
    observations of its galaxy, those in ``has`` with a round exponential companion of 30% of
    the flux 6-10 pixels away: (z0, offsets, observation, noise-free main galaxies, noisy
    observed stamps)."""
    from galgen.physics import render_sersic

    z0 = torch.zeros(16)
    z0[9] = -30.0
    _fixed_code(vae, z0)
    g = torch.Generator().manual_seed(2)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    sep = 6 + 4 * torch.rand(n, generator=g)
    offset = torch.stack([sep * torch.cos(angle), sep * torch.sin(angle)], 1)
    psf = gaussian_psf(torch.full((n,), 1.5), 15, 1.0).float()
    obs = Observation(psf, pixel_scale=1.0, stamp=32, noise=GaussianNoise(torch.full((n, 32, 32), 1.0)))
    with torch.no_grad():
        main = vae.decode(z0.expand(n, -1))
        comp = render_sersic(torch.full((n,), 1.5), 1.0, size=32, scale=1.0, flux=0.3 * main.sum((1, 2)) / 0.7 * has,
                             centre=offset + 16)
        noise = torch.randn(n, 32, 32, generator=torch.Generator().manual_seed(3))
        return z0, offset, obs, main, obs.noiseless(main + comp) + noise, noise


def test_companion_codes_find_a_companion_added_to_the_reconstruction():
    """companion_codes: galaxies that are the VAE's reconstruction plus a second exponential
    galaxy (30% of the flux, at a known offset) get codes that put the companion within a pixel
    of it, with a flux fraction of the right order, and a high signal-to-noise ratio; the
    reconstruction with noise alone has no source above 5 sigma."""
    from galgen.models import companion_codes

    vae = _companion_vae()
    n = 16
    z0, offset, obs, main, observed, noise = _with_companions(vae, n, torch.ones(n, dtype=torch.bool))
    with torch.no_grad():
        codes, snr = companion_codes(vae, Batch(observed=observed, observation=obs))
        _, snr_none = companion_codes(vae, Batch(observed=obs.noiseless(main) + noise, observation=obs))
    c = vae.decoder.companion
    h = c.loc + c.log_scale.exp() * codes
    with torch.no_grad():
        p = vae.decoder.companion_parameters(torch.cat([torch.zeros(n, 9), codes], 1))
    found = torch.stack([p["dx"], p["dy"]], 1)
    assert float((found - offset).norm(dim=1).max()) < 1.0, (found, offset)
    assert bool((snr > 20).all()) and float(snr_none.max()) < 5.0, (snr, snr_none)
    assert bool(((torch.sigmoid(h[:, 0]) > 0.1) & (torch.sigmoid(h[:, 0]) < 0.45)).all()), torch.sigmoid(h[:, 0])


class _Loader:
    """The three methods of an ObservationLoader that warm_start_companion uses."""

    def __init__(self, observed, obs):
        self.observed, self.obs = observed, obs

    def __len__(self):
        return len(self.observed)

    def batch(self, rows):
        rows = torch.as_tensor(rows)
        return Batch(observed=self.observed[rows], observation=self.obs.select(rows))

    def iter_batches(self, size):
        for i in range(0, len(self), size):
            yield self.batch(torch.arange(i, min(i + size, len(self))))


def test_warm_start_companion_teaches_the_encoder_the_residual_companions():
    """warm_start_companion: after it, the encoder's mean codes put the companion of each galaxy
    that has one within 1.5 pixels of it (they started at the centre, 6-10 pixels away; 1,000 steps
    on 32 galaxies from an encoder that returned one code for all), keep
    the other coordinates within 0.1 of where they were, and give galaxies without one a
    flux fraction below 1%."""
    from galgen.models import warm_start_companion

    vae = _companion_vae()
    n = 32
    has = torch.arange(n) % 2 == 0
    _, offset, obs, _, observed, _ = _with_companions(vae, n, has)
    with torch.no_grad():
        before = vae.encode(observed).mean
    out = warm_start_companion(vae, _Loader(observed, obs), epochs=500, batch_size=16, lr=3e-3,
                               generator=torch.Generator().manual_seed(0))
    assert abs(out["found"] - 0.5) < 0.1 and out["steps"] == 1000
    with torch.no_grad():
        after = vae.encode(observed).mean
        p = vae.decoder.companion_parameters(after)
    found = torch.stack([p["dx"], p["dy"]], 1)
    assert float((found - offset).norm(dim=1)[has].max()) < 1.5, (found[has], offset[has])
    assert float(p["fraction"][~has].max()) < 0.01
    keep = torch.ones(16, dtype=torch.bool)
    keep[9:] = False
    assert float((after - before)[:, keep].abs().max()) < 0.1


def test_refit_prior_script_fits_the_flow_to_map_codes(tmp_path, sdss_tiny, one_thread, pipeline_script):
    """pipelines/refit_prior.py --codes map: the flow is fitted to the galaxies' MAP codes
    (the codes written by --save-codes are map_codes' own), recorded in the provenance;
    --load-codes fits the same flow to the same codes; a file of codes of another width
    among them is refused by name."""
    from galgen.checkpoints import load_model
    from galgen.data import ObservationLoader
    from galgen.inference import map_codes

    refit = pipeline_script("refit_prior")
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8)
    src = save_checkpoint(tmp_path / "src.pt", model_state=vae.state_dict(), config=vae.config)
    common = ["--model", str(src), "--n", "16", "--epochs", "2", "--map-steps", "15"]
    refit.main(common + ["--data", str(sdss_tiny), "--codes", "map", "--save-codes", str(tmp_path / "codes.pt"),
                         "--out", str(tmp_path / "a.pt")])
    codes = torch.load(tmp_path / "codes.pt", weights_only=True)
    mine, _ = map_codes(load_model(src).eval(), ObservationLoader(sdss_tiny, np.arange(16), ()).iter_batches(250),
                        max_iter=15)
    assert codes.shape == (16, 4) and torch.allclose(codes, mine, atol=1e-5)
    a = load_model(tmp_path / "a.pt")
    assert a.provenance["prior_refit"]["codes"] == "map" and a.provenance["prior_refit"]["map_steps"] == 15
    assert bool(a.latent_flow.fitted)
    refit.main(common + ["--data", str(sdss_tiny), "--load-codes", str(tmp_path / "codes.pt"),
                         "--out", str(tmp_path / "b.pt")])
    b = load_model(tmp_path / "b.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.latent_flow.state_dict().values(),
                                                  b.latent_flow.state_dict().values()))
    torch.save(torch.zeros(16, 3), tmp_path / "wrong.pt")
    with pytest.raises(GalgenInputError, match="wrong.pt"):
        refit.main(common + ["--data", str(sdss_tiny), "--load-codes", str(tmp_path / "codes.pt"),
                             str(tmp_path / "wrong.pt"), "--out", str(tmp_path / "c.pt")])


def test_code_mixture_prior_is_a_prior_choice_that_survives_a_checkpoint(tmp_path):
    """VAE.fit_code_mixture makes "mixture" a prior choice (not before); its draws decode near
    the training codes' galaxies; a checkpoint holds it, and one from before the mixture (no
    such keys) loads without it; a conditional VAE refuses it."""
    from galgen.checkpoints import load_model

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8)
    assert "mixture" not in vae.prior_choices
    with pytest.raises(GalgenInputError, match="code mixture is not fitted"):
        vae.with_prior("mixture")
    old = {k: v for k, v in vae.state_dict().items() if not k.startswith("code_mixture.")}
    codes = torch.randn(30, 4)
    assert vae.fit_code_mixture(codes, 0.01, bandwidth=1.0) == {"bandwidth": 1.0}
    assert list(vae.prior_choices) == ["mixture", "normal"]
    z = vae.sample_latents(200, prior="mixture", generator=torch.Generator().manual_seed(0))
    assert float(torch.cdist(z, codes).min(1).values.max()) < 0.1  # 4 sd of 0.01 in 4-d: within 0.06
    lp = vae.with_prior("mixture").prior().log_prob(codes[:3])
    assert torch.allclose(lp, torch.full((3,), 4 * -math.log(0.01 * math.sqrt(2 * math.pi)) - math.log(30)),
                          atol=0.05)  # each code's own component dominates (the others are > 100 sd away)
    path = save_checkpoint(tmp_path / "m.pt", model_state=vae.state_dict(), config=vae.config)
    back = load_model(path)
    assert torch.equal(back.code_mixture.centres, codes) and "mixture" in back.prior_choices
    fresh = VAE(32, latent_dim=4, width=8)
    fresh.load_state_dict(old)
    assert "mixture" not in fresh.prior_choices
    cond = VAE(32, latent_dim=4, width=8, conditions=("mag",))
    with pytest.raises(GalgenInputError, match="unconditional"):
        cond.fit_code_mixture(codes, 0.01)


def test_refit_prior_script_fits_the_code_mixture(tmp_path, sdss_tiny, one_thread, pipeline_script):
    """pipelines/refit_prior.py --mixture --keep-flow: a component at each loaded MAP code with
    the encoder's widths of its galaxy times the matched bandwidth; the flow untouched; a bad
    --bandwidth and codes that are not the galaxies' refused."""
    from galgen.checkpoints import load_model
    from galgen.data import ObservationLoader

    refit = pipeline_script("refit_prior")
    torch.manual_seed(0)
    vae = VAE(32, latent_dim=4, width=8)
    src = save_checkpoint(tmp_path / "src.pt", model_state=vae.state_dict(), config=vae.config)
    codes = torch.randn(16, 4)
    torch.save(codes, tmp_path / "codes.pt")
    refit.main(["--model", str(src), "--data", str(sdss_tiny), "--n", "16", "--load-codes", str(tmp_path / "codes.pt"),
                "--mixture", "--keep-flow", "--out", str(tmp_path / "m.pt")])
    m = load_model(tmp_path / "m.pt")
    batch = next(ObservationLoader(sdss_tiny, np.arange(16), ()).iter_batches(16))
    with torch.no_grad():
        widths = (0.5 * vae.eval().encoder_moments(batch.observed, batch.cond)[1]).exp()
    b = m.provenance["prior_refit"]["mixture"]["bandwidth"]
    assert torch.equal(m.code_mixture.centres, codes) and b == pytest.approx(float(m.code_mixture.bandwidth))
    assert torch.allclose(m.code_mixture.scales, b * widths, rtol=1e-5)
    assert not bool(m.latent_flow.fitted) and m.provenance["prior_refit"]["flow"] == "kept"
    with pytest.raises(SystemExit):  # argparse: "'match' or a positive number"
        refit.main(["--model", str(src), "--data", str(sdss_tiny), "--n", "16", "--load-codes",
                    str(tmp_path / "codes.pt"), "--mixture", "--bandwidth", "-2", "--out", str(tmp_path / "y.pt")])
    with pytest.raises(GalgenInputError, match="8 galaxies"):
        refit.main(["--model", str(src), "--data", str(sdss_tiny), "--n", "8", "--load-codes",
                    str(tmp_path / "codes.pt"), "--mixture", "--keep-flow", "--out", str(tmp_path / "x.pt")])


def _bulge_code(zb, hlr=3.0, s0=2.0):
    """A code of VAE(32, latent_dim=12, bulge_index=True) whose seed is a round, centred bulge
    (B/T = sigmoid(30)) of half-light radius ``hlr`` pixels, its index coordinate ``zb``."""
    z = torch.zeros(1, 12)
    z[0, 3] = (30.0 + 1.0) / 1.5                      # t_bt: loc -1, scale 1.5
    z[0, 4] = (math.log(hlr / s0) + 0.7) / 0.7        # log size of the bulge: loc -0.7, scale 0.7
    z[0, 11] = zb
    return z


@pytest.mark.parametrize("n", [2.0, 5.5])
def test_a_bulge_index_coordinate_draws_galsims_sersic_bulge_of_that_index(n):
    """VAE(bulge_index=True): the last coordinate sets the bulge's Sersic index, n = 1 + 5
    sigmoid(ln 1.5 + z_b) (n = 4 at 0), and an untrained decoder (body at zero) draws GalSim's
    pixel-integrated Sersic bulge of that index, within 1e-3 of its peak, where the fixed
    de Vaucouleurs bulge misses it by more."""
    import galsim

    from galgen.simulate.render import draw_integrated

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=12, width=8, decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True,
              bulge_index=True, log_flux=(math.log(1000.0), 0.3)).eval()
    assert vae.config["bulge_index"] is True and vae.decoder.bulge_index.start == 11
    zb = math.log((n - 1) / 5 / (1 - (n - 1) / 5)) - math.log(1.5)
    with torch.no_grad():
        img = vae.decode(_bulge_code(zb))[0].double()
        assert float(vae.decoder.shape_parameters(_bulge_code(zb))["n_bulge"][0]) == pytest.approx(n, rel=1e-5)
        assert float(vae.decoder.shape_parameters(_bulge_code(0.0))["n_bulge"][0]) == pytest.approx(4.0, rel=1e-6)
        de_vauc = vae.decode(_bulge_code(0.0))[0].double()
    ref = torch.as_tensor(draw_integrated(galsim.Sersic(n, half_light_radius=3.0, flux=1.0), 32, 1.0, subsample=12,
                                          core=3))
    ref, img, de_vauc = ref / ref.sum(), img / img.sum(), de_vauc / de_vauc.sum()
    assert float((img - ref).abs().max() / ref.max()) < 1e-3
    assert float((de_vauc - ref).abs().max() / ref.max()) > 1e-2


def test_add_bulge_index_keeps_the_galaxies_and_the_companions_and_gates_coordinates():
    """add_bulge_index: one coordinate, before the companion's (which stay before the latent
    gate's, the last); at 0 the grown model draws its source's galaxies; the encoder starts it
    at mean 0 and sd e^-2 and keeps every other coordinate's moments; refusals."""
    from galgen.models import add_bulge_index

    torch.manual_seed(0)
    vae = VAE(32, latent_dim=18, width=8, decoder="flux-shape", seed_profile="bulge-disk", seed_latents=True,
              companion=True, symmetry_gate="latent", log_flux=(math.log(1000.0), 0.3)).eval()
    grown = add_bulge_index(vae, generator=torch.Generator().manual_seed(1)).eval()
    start = vae.decoder.companion.start
    assert grown.latent_dim == 19 and grown.decoder.bulge_index.start == start
    assert grown.decoder.companion.start == start + 1 and grown.decoder.gate_coordinate == 18
    z = torch.randn(4, 18, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        same = grown.decode(torch.cat([z[:, :start], torch.zeros(4, 1), z[:, start:]], 1))
        assert torch.allclose(same, vae.decode(z), rtol=1e-4, atol=1e-6)
        x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) * 10
        q0, q1 = vae.encode(x), grown.encode(x)
    keep = [i for i in range(19) if i != start]
    assert torch.allclose(q1.mean[:, keep], q0.mean, atol=1e-6)
    assert torch.allclose(q1.stddev[:, keep], q0.stddev, rtol=1e-5)
    assert torch.allclose(q1.mean[:, start], torch.zeros(3)) and torch.allclose(q1.stddev[:, start],
                                                                                 torch.full((3,), math.exp(-2.0)))
    with pytest.raises(GalgenInputError, match="add_bulge_index needs"):
        add_bulge_index(grown)
    with pytest.raises(GalgenInputError, match="bulge_index: an option of seed_profile='bulge-disk'"):
        VAE(32, latent_dim=12, width=8, decoder="flux-shape", bulge_index=True)
