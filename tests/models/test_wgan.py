"""WGAN-GP whose critic sees generated galaxies through the physics layer."""

import copy
import json

import pytest
import torch
from torch import nn

from galgen.errors import GalgenInputError
from galgen.models import Batch
from galgen.models.wgan import WGANGP, Critic
from galgen.physics import GaussianNoise, Observation, gaussian_psf

S = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def _observation(n, variance=25.0, oversampling=1, mask=None, fwhm=None, g1=0.0):
    fwhm = torch.linspace(2.5, 4.0, n) if fwhm is None else fwhm
    psf = gaussian_psf(fwhm, 15 * oversampling + (oversampling + 1) % 2, 1.0 / oversampling, g1=g1)
    noise = GaussianNoise(torch.full((n, S, S), float(variance)), mask)
    return Observation(psf, pixel_scale=1.0, oversampling=oversampling, stamp=S, noise=noise)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


class LinearCritic(nn.Module):
    """D(u) = w . u: its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, u, cond=None):
        return u.flatten(1) @ self.w.flatten()


class QuadraticCritic(nn.Module):
    """D(u) = a/2 |u|^2: its input gradient is a u."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, u, cond=None):
        return 0.5 * self.a * u.flatten(1).square().sum(1)


class DeltaGenerator(nn.Module):
    """A point source of flux ``flux`` at the centre pixel, whatever the latent vector."""

    def __init__(self, size, flux):
        super().__init__()
        self.size = size
        self.flux = nn.Parameter(torch.tensor(float(flux)))

    def forward(self, z):
        img = torch.zeros(z.shape[0], self.size, self.size)
        img[:, self.size // 2, self.size // 2] = 1.0
        return img * self.flux


# -- gradient penalty ---------------------------------------------------------------------


@pytest.mark.parametrize("norm", [0.5, 3.0])
def test_gradient_penalty_of_a_linear_critic_is_analytic(norm):
    torch.manual_seed(0)
    gan = WGANGP(S, latent_dim=4, width=4, input_scale=5.0)
    w = torch.randn(S, S)
    w *= norm / w.norm()
    gan.critic = LinearCritic(w)
    real, fake = 50 * torch.rand(6, S, S), 50 * torch.rand(6, S, S)
    gp = gan.gradient_penalty(real, fake)
    assert gp.item() == pytest.approx((norm - 1) ** 2, rel=1e-5)
    # create_graph: the penalty back-propagates to the critic, d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    gp.backward()
    assert torch.allclose(gan.critic.w.grad, 2 * (norm - 1) * w / norm, atol=1e-6)

    # in a training step: the reported penalty, Wasserstein estimate and loss
    obs = _observation(6)
    opts = gan.make_optimizers()
    m = gan.training_step(Batch(real, obs), opts, step=0)
    assert m["gradient_penalty"].item() == pytest.approx((norm - 1) ** 2, rel=1e-5)
    assert m["loss"].item() == pytest.approx(-m["wasserstein"].item() + 10 * (norm - 1) ** 2, rel=1e-5, abs=1e-5)
    assert "generator_loss" not in m


def test_gradient_penalty_at_the_interpolates():
    """For D = a/2 |u|^2 the gradient is a u_hat: the penalty depends on where u_hat lies."""
    torch.manual_seed(1)
    gan = WGANGP(S, latent_dim=4, width=4, input_scale=5.0)
    a = 0.02
    gan.critic = QuadraticCritic(a)
    real, fake = 100 * torch.rand(5, S, S), torch.rand(5, S, S)
    gp = gan.gradient_penalty(real, fake, generator=torch.Generator().manual_seed(3))
    e = torch.rand(5, 1, 1, generator=torch.Generator().manual_seed(3))
    u_hat = e * torch.asinh(real / 5.0) + (1 - e) * torch.asinh(fake / 5.0)
    expected = ((a * u_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)
    assert gp.item() > 0.01  # a point that distinguishes interpolates from the end points
    with pytest.raises(GalgenInputError, match="real, fake"):
        gan.gradient_penalty(real, fake[:3])


# -- update schedule ----------------------------------------------------------------------


def test_generator_steps_every_n_critic_and_leaves_the_critic_gradients_alone():
    torch.manual_seed(2)
    gan = WGANGP(S, latent_dim=4, width=4, input_scale=5.0, flux_scale=5.0, n_critic=3)
    opts = gan.make_optimizers(lr=1e-3)
    assert opts["critic"].defaults["betas"] == (0.0, 0.9) and opts["generator"].defaults["lr"] == 1e-3
    critic_ids = {id(p) for g in opts["critic"].param_groups for p in g["params"]}
    gen_ids = {id(p) for g in opts["generator"].param_groups for p in g["params"]}
    assert critic_ids == {id(p) for p in gan.critic.parameters()}
    assert gen_ids == {id(p) for p in gan.generator.parameters()}

    # the critic's gradients at its optimiser step, to compare with them after the call
    at_step = {}
    critic_step = opts["critic"].step

    def recording_step(*args, **kwargs):
        at_step["grads"] = [p.grad.clone() for p in gan.critic.parameters()]
        return critic_step(*args, **kwargs)

    opts["critic"].step = recording_step
    synced = []
    obs = _observation(4)
    batch = Batch(10 * torch.randn(4, S, S), obs)
    for step in range(6):
        c0, g0 = _params(gan.critic), _params(gan.generator)
        m = gan.training_step(batch, opts, step, sync=lambda ps: synced.append(len(list(ps))))
        generator_step = (step + 1) % 3 == 0
        assert _changed(c0, gan.critic), step
        assert _changed(g0, gan.generator) == generator_step, step
        assert ("generator_loss" in m) == generator_step
        assert all(v.ndim == 0 and not v.requires_grad for v in m.values())
        # the generator's backward neither computed nor added critic gradients
        assert all(torch.equal(a, p.grad) for a, p in zip(at_step["grads"], gan.critic.parameters()))
        assert all(p.requires_grad for p in gan.critic.parameters())
    n_c, n_g = len(list(gan.critic.parameters())), len(list(gan.generator.parameters()))
    assert synced == [n_c, n_c, n_c, n_g, n_c, n_c, n_c, n_g]


# -- what the critic sees -----------------------------------------------------------------


def _record_critic_inputs(gan):
    seen = []
    gan.critic.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_critic_sees_the_psf_of_each_galaxy_for_a_point_source():
    """A generated point source, observed with almost no noise, reaches the critic as flux x PSF."""
    n, flux, scale = 3, 400.0, 5.0
    gan = WGANGP(S, latent_dim=4, width=4, input_scale=scale)
    gan.generator = DeltaGenerator(S, flux)
    obs = _observation(n, variance=1e-12, fwhm=torch.tensor([2.0, 3.0, 4.5]), g1=0.2)
    seen = _record_critic_inputs(gan)
    gan.training_step(Batch(torch.zeros(n, S, S), obs), gan.make_optimizers(), step=0)
    fake = torch.sinh(seen[0][n:]) * scale  # back to ADU
    expected = torch.zeros(n, S, S)
    expected[:, S // 2 - 7:S // 2 + 8, S // 2 - 7:S // 2 + 8] = flux * obs.psf
    assert torch.allclose(fake, expected, atol=1e-3)
    assert not torch.allclose(fake[0], fake[2], atol=1.0)  # each galaxy its own PSF


def test_critic_sees_observed_fakes_with_the_batch_noise_and_mask():
    """Oversampled generator, per-galaxy PSFs, noise and mask: the critic input is
    asinh(observe(G(z)) / input_scale), masked pixels zero in real and fake images alike."""
    n, scale = 4, 5.0
    torch.manual_seed(3)
    gan = WGANGP(S, latent_dim=4, width=4, oversampling=2, input_scale=scale, flux_scale=30.0)
    mask = torch.zeros(n, S, S, dtype=torch.bool)
    mask[:, :3] = True
    obs = _observation(n, variance=16.0, oversampling=2, mask=mask)
    real = 10 * torch.randn(n, S, S)
    seen = _record_critic_inputs(gan)
    torch.manual_seed(123)
    gan.training_step(Batch(real, obs), gan.make_optimizers(), step=0)
    torch.manual_seed(123)
    intrinsic = gan.generator(torch.randn(n, 4))  # the generator has not stepped yet (n_critic=5)
    noiseless, noisy = obs.observe(intrinsic.float())
    assert not torch.allclose(noisy, noiseless, atol=1.0)  # the noise is there
    noisy = noisy.masked_fill(mask, 0.0)
    u_real, u_fake = seen[0][:n], seen[0][n:]
    assert torch.allclose(u_fake, torch.asinh(noisy / scale), atol=1e-5)
    assert torch.allclose(u_real, torch.asinh(real.masked_fill(mask, 0.0) / scale), atol=1e-6)
    assert bool((u_real[:, :3] == 0).all() and (u_fake[:, :3] == 0).all())


def test_the_noisy_fakes_pass_gradients_to_the_generator():
    gan = WGANGP(S, latent_dim=4, width=4, flux_scale=5.0)
    _, fake = gan.observe_fakes(_observation(2), generator=torch.Generator().manual_seed(0))
    fake.sum().backward()
    assert gan.generator.log_flux_scale.grad is not None and gan.generator.log_flux_scale.grad > 0
    with pytest.raises(GalgenInputError, match="n:"):
        gan.observe_fakes(Observation(gaussian_psf(3.0, 15, 1.0), pixel_scale=1.0, noise=GaussianNoise(1.0)))


# -- conditioning -------------------------------------------------------------------------


def test_fakes_use_the_batch_conditions():
    torch.manual_seed(4)
    gan = WGANGP(S, latent_dim=4, width=4, n_critic=1, conditions=("mag", "hlr"))
    gan.set_condition_stats([20.0, 1.0], [2.0, 0.5])
    cond = torch.tensor([[18.0, 1.5], [22.0, 0.5], [20.0, 1.0]])
    inputs = []
    gan.generator.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    opts = gan.make_optimizers()
    embed0 = gan.critic.embed.weight.detach().clone()
    m = gan.training_step(Batch(10 * torch.randn(3, S, S), _observation(3), cond=cond), opts, step=0)
    assert "generator_loss" in m and len(inputs) == 2
    expected = (cond - torch.tensor([20.0, 1.0])) / torch.tensor([2.0, 0.5])
    for x in inputs:
        assert torch.allclose(x[:, 4:], expected)
    assert not torch.equal(embed0, gan.critic.embed.weight)  # the projection head learns
    assert gan.critic_score(torch.zeros(3, S, S), cond).shape == (3,)
    assert gan.sample(2, cond=torch.tensor([19.0, 1.2])).shape == (2, S, S)


def test_conditioning_errors():
    gan = WGANGP(S, latent_dim=4, width=4, conditions=("mag",))
    plain = WGANGP(S, latent_dim=4, width=4)
    obs = _observation(2)
    with pytest.raises(GalgenInputError, match="cond"):
        gan.sample(2)
    with pytest.raises(GalgenInputError, match=r"cond: expected shape \(2, 1\)"):
        gan.sample(2, cond=torch.zeros(2, 3))
    with pytest.raises(GalgenInputError, match="cond"):
        gan.training_step(Batch(torch.zeros(2, S, S), obs), gan.make_optimizers(), 0)
    with pytest.raises(GalgenInputError, match="cond"):
        plain.sample(2, cond=torch.zeros(2, 1))
    with pytest.raises(GalgenInputError, match="cond"):
        plain.critic_score(torch.zeros(2, S, S), cond=torch.zeros(2, 1))
    with pytest.raises(GalgenInputError, match="z:"):
        plain.generate(torch.zeros(2, 5))
    with pytest.raises(GalgenInputError, match="observed"):
        plain.critic_score(torch.zeros(2, 16, 16))
    with pytest.raises(GalgenInputError, match="n:"):
        plain.sample(0)
    with pytest.raises(GalgenInputError, match="options"):
        plain.sample(2, prior="flow")
    with pytest.raises(GalgenInputError, match="n_critic"):
        WGANGP(S, n_critic=0)
    with pytest.raises(GalgenInputError, match="input_scale"):
        WGANGP(S, input_scale=0.0)


# -- sampling, validation, config ---------------------------------------------------------


def test_sample_shapes_non_negative_and_deterministic():
    gan = WGANGP(S, latent_dim=4, width=4, oversampling=2, flux_scale=3.0)
    a = gan.sample(3, generator=torch.Generator().manual_seed(5))
    b = gan.sample(3, generator=torch.Generator().manual_seed(5))
    c = gan.sample(3, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 2 * S, 2 * S) and bool((a >= 0).all())
    assert torch.equal(a, b) and not torch.equal(a, c)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(gan.generate(z).detach(), a)
    assert Critic(S, width=4, features=8)(torch.zeros(2, S, S)).shape == (2,)


def test_validation_is_per_galaxy_reproducible_and_changes_nothing():
    torch.manual_seed(6)
    gan = WGANGP(S, latent_dim=4, width=4, flux_scale=5.0)
    obs = _observation(5)
    batch = Batch(10 * torch.randn(5, S, S), obs, index=torch.arange(5))
    params = {k: v.clone() for k, v in gan.state_dict().items()}
    rng = torch.get_rng_state()
    v1 = gan.validation_step(batch)
    v2 = gan.validation_step(batch)
    fakes = v1.pop("observed_fakes")
    assert fakes.shape == (5, S, S) and torch.equal(fakes, v2.pop("observed_fakes"))
    assert set(v1) == {"loss", "wasserstein", "critic_real", "critic_fake"}
    assert all(t.shape == (5,) for t in v1.values())
    assert torch.equal(v1["loss"], v1["wasserstein"])
    assert torch.allclose(v1["wasserstein"], v1["critic_real"] - v1["critic_fake"])
    assert torch.allclose(v1["critic_real"], gan.critic_score(batch.observed).detach())
    assert all(torch.equal(v1[k], v2[k]) for k in v1)  # same fakes every time
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(params[k], v) for k, v in gan.state_dict().items())
    assert all(p.grad is None for p in gan.parameters())
    other = gan.validation_step(Batch(batch.observed, obs, index=torch.arange(5, 10)))
    assert not torch.equal(other["critic_fake"], v1["critic_fake"])  # other galaxies, other fakes


def test_from_config_roundtrip():
    torch.manual_seed(7)
    gan = WGANGP(S, latent_dim=6, width=4, oversampling=2, input_scale=3.0, flux_scale=7.0, gp_weight=5.0,
                 n_critic=2, conditions=("mag",))
    gan.set_condition_stats([21.0], [1.5])
    config = json.loads(json.dumps(gan.config))
    assert config["kind"] == "wgan-gp"
    clone = WGANGP.from_config(config)
    clone.load_state_dict(gan.state_dict(), strict=True)
    assert clone.config == gan.config
    cond = torch.tensor([20.0])
    assert torch.equal(clone.sample(2, cond, generator=torch.Generator().manual_seed(1)),
                       gan.sample(2, cond, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, S, S)
    assert torch.equal(clone.critic_score(x, cond), gan.critic_score(x, cond))
    with pytest.raises(GalgenInputError, match="kind"):
        WGANGP.from_config(dict(config, kind="vae"))


def test_training_step_under_bf16_autocast():
    """The trainer may run a whole step under autocast: the penalty's double backward works,
    and the generator is scored by the critic as updated in the same step (autocast's
    cached low-precision weights from before the critic's update are not reused)."""
    torch.manual_seed(8)
    gan = WGANGP(S, latent_dim=4, width=4, flux_scale=5.0, n_critic=1)
    opts = gan.make_optimizers(lr=1e-2)
    g0 = _params(gan.generator)
    seen = _record_critic_inputs(gan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = gan.training_step(Batch(10 * torch.randn(4, S, S), _observation(4)), opts, step=0)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in m.values())
    assert m["gradient_penalty"] > 0
    assert _changed(g0, gan.generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = -gan.critic(seen[-1]).float().mean()
    assert m["generator_loss"].item() == pytest.approx(fresh.item(), abs=1e-3)

    # several steps in one autocast region: each critic update scores with current weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gan.training_step(Batch(10 * torch.randn(4, S, S), _observation(4)), opts, step=1)
        critic_now = copy.deepcopy(gan.critic)
        seen.clear()
        m = gan.training_step(Batch(10 * torch.randn(4, S, S), _observation(4)), opts, step=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        d = critic_now(seen[0]).float()
    assert m["wasserstein"].item() == pytest.approx((d[:4].mean() - d[4:].mean()).item(), abs=1e-3)


# -- learning -----------------------------------------------------------------------------


def test_short_training_moves_the_generated_flux_to_the_data():
    """Data: one round Gaussian galaxy (flux 2000 ADU, sigma 2 px) seen through a Gaussian
    PSF with Gaussian noise. The generator starts ~8x too faint and spread over the
    stamp; after 300 steps (150 generator updates) its median observed flux is within 2x
    of the data's, its light is concentrated, and the critic's Wasserstein estimate has
    fallen from its peak (checked over seeds 0-5: final/peak <= 0.2, flux 2100-2900)."""
    torch.manual_seed(0)
    n, flux, sky, steps = 8, 2000.0, 5.0, 300
    obs = _observation(n, variance=sky**2, fwhm=torch.full((n,), 1.5 * 2.3548))
    y, x = torch.meshgrid(torch.arange(S) - S // 2.0, torch.arange(S) - S // 2.0, indexing="ij")
    r2 = x**2 + y**2
    galaxy = torch.exp(-r2 / (2 * 2.0**2))
    galaxy = (flux * galaxy / galaxy.sum()).expand(n, S, S).contiguous()
    gan = WGANGP(S, latent_dim=8, width=8, input_scale=sky, flux_scale=40.0, n_critic=2)
    opts = {"critic": torch.optim.Adam(gan.critic.parameters(), lr=1e-3, betas=(0.0, 0.9)),
            "generator": torch.optim.Adam(gan.generator.parameters(), lr=2e-3, betas=(0.0, 0.9))}

    def generated():
        img = gan.sample(64, generator=torch.Generator().manual_seed(0))
        observed = _observation(64, fwhm=torch.full((64,), 1.5 * 2.3548)).noiseless(img)
        r = ((img * r2).sum(dim=(1, 2)) / img.sum(dim=(1, 2))).sqrt()  # rms radius
        return observed.sum(dim=(1, 2)).median().item(), r.median().item()

    data_flux = obs.noiseless(galaxy).sum(dim=(1, 2)).median().item()
    flux0, r0 = generated()
    assert flux0 < data_flux / 5
    w = []
    for step in range(steps):
        _, noisy = obs.observe(galaxy)
        w.append(gan.training_step(Batch(noisy, obs), opts, step)["wasserstein"].item())
    flux1, r1 = generated()
    assert data_flux / 2 < flux1 < 2 * data_flux, (flux0, flux1, data_flux)
    assert r1 < 0.6 * r0, (r0, r1)
    window = [sum(w[i:i + 50]) / 50 for i in range(steps - 49)]
    assert max(window) > 0.3  # the critic did tell the faint fakes from the data
    assert window[-1] < 0.5 * max(window), window[::25]
