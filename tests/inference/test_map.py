"""Batched MAP fits of latent codes on data drawn from the model itself."""

import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.inference.map import fit_map
from galgen.models import VAE
from galgen.physics import GaussianNoise, Observation, gaussian_psf


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def self_generated(n=12, seed=0, variance=25.0):
    torch.manual_seed(seed)
    vae = VAE(32, latent_dim=4, width=8, flux_scale=200.0).eval()
    with torch.no_grad():  # a random decoder is a valid generative model of galaxies
        vae.decoder.amplitude.weight.normal_(0, 0.3)
    g = torch.Generator().manual_seed(seed + 1)
    z_true = torch.randn(n, 4, generator=g)
    psf = gaussian_psf(1.2, 15, 0.4)
    obs = Observation(psf, pixel_scale=0.4, stamp=32, noise=GaussianNoise(torch.full((n, 32, 32), variance)))
    with torch.no_grad():
        _, data = obs.observe(vae.decode(z_true), generator=g)
    return vae, obs, data, z_true


def test_map_explains_data_drawn_from_the_model():
    vae, obs, data, z_true = self_generated()
    res = fit_map(vae.with_prior("normal"), data, obs, restarts=2, lr=0.05, max_iter=400,
                  generator=torch.Generator().manual_seed(3))
    red = res.reduced_chi2.numpy()
    assert 0.85 < np.median(red) < 1.15, red
    assert (res.status == 0).float().mean() > 0.8
    # the fit is at least as good as the truth (it maximises the posterior, not the likelihood)
    truth_chi2 = obs.noise.chi2(data, obs.noiseless(vae.decode(z_true))).detach()
    assert float(np.median(res.chi2.numpy() / truth_chi2.numpy())) < 1.05
    assert torch.allclose(res.residual, data - res.model)
    assert res.intrinsic.shape == (12, 32, 32) and res.z.shape == (12, 4)


def test_bad_pixels_flag_one_galaxy_without_losing_the_batch():
    vae, obs, data, _ = self_generated(n=4)
    data = data.clone()
    data[1, 5, 5] = float("nan")
    res = fit_map(vae.with_prior("normal"), data, obs, max_iter=150)
    assert int(res.status[1]) == 2
    assert bool(torch.isfinite(res.chi2[[0, 2, 3]]).all())
    with pytest.raises(GalgenInputError, match="stamp"):
        fit_map(vae, torch.zeros(2, 48, 48), obs)


def test_map_codes_of_a_data_set_are_its_galaxies_fits():
    """map_codes: batch by batch, each galaxy's code is its own MAP fit (as good as one
    fit of the whole set: float differences of the batch size move a flat direction),
    which explains the data as well as the code that drew it (the flux in the code), where
    the untrained encoder's guess does not; anything but Batch items is refused."""
    from galgen.inference import map_codes
    from galgen.physics import Batch

    vae, obs, data, z_true = self_generated(n=12, seed=2, variance=0.25)
    vae = vae.with_prior("normal")
    halves = [Batch(observed=data[i:i + 6], observation=obs.select(torch.arange(i, i + 6))) for i in (0, 6)]
    lines = []
    codes, cond = map_codes(vae, halves, max_iter=400, log=lines.append)
    whole = fit_map(vae, data, obs, optimizer="adam", max_iter=400, fit_flux=False)
    assert cond is None and codes.shape == (12, 4) and len(lines) == 2 and "12 galaxies" in lines[-1]
    assert torch.allclose(codes[:6], whole.z[:6], atol=1e-5)  # the same batch, the same fit
    with torch.no_grad():
        chi2 = {k: obs.noise.chi2(data, obs.noiseless(vae.decode(z)))
                for k, z in (("map", codes), ("whole", whole.z), ("truth", z_true), ("guess", vae.encode(data).mean))}
    assert torch.allclose(chi2["map"], chi2["whole"], rtol=1.5e-2)
    med = {k: float(v.median()) for k, v in chi2.items()}
    assert med["map"] < 1.02 * med["truth"] and med["guess"] > 1.5 * med["truth"], med
    with pytest.raises(GalgenInputError, match="Batch"):
        map_codes(vae, [data])
    with pytest.raises(GalgenInputError, match="no batches"):
        map_codes(vae, [])
