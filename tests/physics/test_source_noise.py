"""Variance maps that hold their galaxy's Poisson term, split into background and source (GAN fakes' noise)."""

import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.physics import CCDNoise, GaussianNoise, source_noise, split_variance


def test_split_variance_recovers_the_simulators_gain_and_sky(sdss_fit):
    """On GalSim-simulated SDSS cutouts (variance = (model + sky) / gain + (rn / gain)^2) the
    split gives each map's empty-pixel variance and the survey's gain from the maps and the
    noisy images alone."""
    from galgen.data import CutoutFile, ObservationLoader

    with CutoutFile(sdss_fit) as f:
        cat = f.catalog
    gain, sky, rn = (float(np.asarray(cat[k])[0]) for k in ("gain", "sky_level", "read_noise"))
    batch = next(ObservationLoader(sdss_fit, np.arange(64), ()).iter_batches(64))
    background, inverse_gain = split_variance(batch.observation.noise.variance_map, batch.observed,
                                              batch.observation.noise.mask)
    error = background / (sky / gain + (rn / gain) ** 2) - 1
    assert float(error.abs().median()) < 1e-4 and float(error.abs().max()) < 0.02  # the largest fill the stamp
    assert abs(1.0 / float(inverse_gain) / gain - 1) < 0.03


def test_source_noise_is_the_background_plus_the_images_own_light():
    bg = torch.tensor([4.0, 9.0])
    model = torch.zeros(2, 8, 8)
    model[:, 2:4, 2:4] = 50.0
    ccd = source_noise(bg, 0.25)
    assert isinstance(ccd, CCDNoise)
    assert torch.allclose(ccd.variance(model.double()), (bg[:, None, None] + 0.25 * model).double())
    flat = source_noise(bg, 0.0)  # maps of the background alone: no source term
    assert isinstance(flat, GaussianNoise) and torch.equal(flat.variance(model).expand(2, 8, 8), bg[:, None, None].expand(2, 8, 8))
    # a map without a source term splits into itself and 0
    b, k = split_variance(torch.full((2, 8, 8), 3.0), model)
    assert torch.equal(b, torch.full((2,), 3.0)) and float(k) == 0.0
    with pytest.raises(GalgenInputError, match="variance, observed"):
        split_variance(torch.ones(8, 8), torch.ones(8, 8))


def test_a_gans_fakes_get_the_noise_of_their_own_light():
    """GAN(fake_noise="own"): a fake observed like a real galaxy gets that galaxy's background
    and its own Poisson term, not the real galaxy's shape in its noise; the default keeps the
    batch's observation; the option survives the config and bad values are refused."""
    from galgen.models import GAN, Batch, build_model
    from galgen.physics import Observation, gaussian_psf

    n, s = 4, 16
    real = torch.zeros(n, s, s)
    real[:, 3:6, 3:6] = 400.0  # real galaxies off-centre: their Poisson variance sits there
    var = 2.0 + real / 4.0
    obs = Observation(gaussian_psf(torch.full((n,), 1.5), 11, 1.0), pixel_scale=1.0, stamp=s,
                      noise=GaussianNoise(var))
    batch = Batch(real, obs)
    gan = GAN(s, latent_dim=4, width=8, fake_noise="own", log_flux=[6.0, 0.5])
    fake_obs = gan.fake_observation(batch)
    fake_model = torch.zeros(n, s, s, dtype=torch.float64)
    fake_model[:, 10:13, 10:13] = 80.0  # a fake galaxy elsewhere
    v = fake_obs.noise.variance(fake_model)
    assert torch.allclose(v, 2.0 + fake_model / 4.0, rtol=1e-6)
    assert GAN(s, latent_dim=4, width=8).fake_observation(batch) is obs
    clone = build_model(gan.config)
    assert clone.config["fake_noise"] == "own" and clone.fake_noise == "own"
    assert "fake_noise" not in GAN(s, latent_dim=4, width=8).config
    with pytest.raises(GalgenInputError, match="fake_noise"):
        GAN(s, latent_dim=4, fake_noise="mine")
