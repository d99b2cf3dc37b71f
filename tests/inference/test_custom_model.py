"""A user's own latent model, fitted and sampled like the shipped ones (the worked example
of docs/architecture.rst, run small).

The model implements only the latent-model contract (``latent_dim``, ``decode``,
``prior``; ``encode`` left at the base class's ``None``), so this test fails wherever
inference still needs anything else of a model. The galgen names are imported inside
the test so that, where they do not exist, this test fails and the others still run.
"""

import math

import numpy as np
import torch


def _blob_model_class():
    from galgen.models import LatentModel, standard_normal

    class GaussianBlob(LatentModel):
        """A circular Gaussian galaxy of fixed flux on a 32x32 grid (pixel scale 0.2 arcsec).

        z[0] is the log size in prior units (sigma = 0.5 arcsec * exp(0.3 z[0])), z[1] the
        x offset in units of 0.4 arcsec; the prior is N(0, I).
        """

        latent_dim = 2

        def __init__(self, size=32, scale=0.2, flux=1000.0):
            super().__init__()
            self.flux, self.scale = flux, scale
            r = (torch.arange(size, dtype=torch.float32) - size // 2) * scale
            self.register_buffer("y", r[:, None])
            self.register_buffer("x", r[None, :])

        def sigma(self, z):
            return 0.5 * torch.exp(0.3 * z[..., 0])

        def prior(self, cond=None):
            return standard_normal(self.latent_dim, device=self.x.device, dtype=self.x.dtype)

        def decode(self, z, cond=None):
            sigma = self.sigma(z)[:, None, None]
            dx = 0.4 * z[:, 1, None, None]
            r2 = (self.x - dx) ** 2 + self.y**2
            return self.flux * self.scale**2 / (2 * math.pi * sigma**2) * torch.exp(-0.5 * r2 / sigma**2)

    return GaussianBlob


def test_a_custom_latent_model_is_fitted_and_sampled():
    from galgen.inference import fit_map, sample_posterior, split_rhat
    from galgen.models import sample_latents
    from galgen.physics import GaussianNoise, Observation, gaussian_psf

    torch.manual_seed(0)
    model = _blob_model_class()().eval()
    gen = torch.Generator().manual_seed(1)
    z_true = sample_latents(model.prior(), 4, generator=gen)
    assert z_true.shape == (4, 2)
    noise = GaussianNoise(torch.full((32, 32), 4.0))  # sigma 2 counts per pixel: S/N ~ 50
    observation = Observation(gaussian_psf(0.5, 15, 0.2), pixel_scale=0.2, stamp=32, noise=noise)
    with torch.no_grad():
        _, observed = observation.observe(model.decode(z_true), generator=gen)

    fit = fit_map(model, observed, observation, restarts=2, max_iter=300, generator=gen)
    size_true, size_map = model.sigma(z_true), model.sigma(fit.z.to(z_true))
    assert torch.all((size_map / size_true - 1).abs() < 0.1), (size_map, size_true)
    assert torch.all((fit.z[:, 1] - z_true[:, 1]).abs() * 0.4 < 0.05)  # x offset within 0.05 arcsec

    post = sample_posterior(model, observed, observation, fit, samples=50, chains=2, generator=gen)
    samples = post.samples.detach().cpu().numpy()  # (galaxies, chains, draws, parameters)
    assert samples.shape[:3] == (4, 2, 50)
    rhat = split_rhat(np.moveaxis(samples, -1, 1))  # (galaxies, parameters)
    assert np.all(np.isfinite(rhat)), rhat
    assert math.isfinite(float(np.abs(samples).max()))
