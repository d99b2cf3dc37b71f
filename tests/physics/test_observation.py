"""Observation, PSFs, noise and GalSim interop against GalSim and closed forms."""

import math

import galsim
import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.physics import (
    CCDNoise,
    CorrelatedGaussianNoise,
    GaussianNoise,
    Observation,
    gaussian_psf,
    moffat_psf,
    psf_from_galsim,
    to_interpolated_image,
)

S, SCALE = 32, 0.2


def _fine_intrinsic(prof, size, k, scale):
    """GalSim's default (pixel-integrated) drawing on the oversampled grid of the convention."""
    off = (size // 2 + 0.5) * k - 0.5 - (size * k) // 2
    return prof.drawImage(nx=size * k, ny=size * k, scale=scale / k, use_true_center=False,
                          offset=(off, off)).array


PROFILES = {
    "sersic1": galsim.Sersic(1.0, half_light_radius=0.8, flux=1e4).shear(g1=0.2, g2=0.1),
    "sersic4": galsim.Sersic(4.0, half_light_radius=0.8, flux=1e4).shear(g1=-0.1, g2=0.15),
    "bulge+disk": galsim.Add(galsim.Sersic(4.0, half_light_radius=0.4, flux=3e3),
                             galsim.Exponential(half_light_radius=1.2, flux=7e3).shear(g1=0.3, g2=0.0)),
}
# PSF, grid size in units of S*k (the PSF light beyond its grid is the flux error), max diff / peak
PSFS = {
    "moffat": (galsim.Moffat(beta=3.5, fwhm=1.0), 2, 2e-3),
    "kolmogorov": (galsim.Kolmogorov(fwhm=0.8), 4, 2e-3),
    # lambda/D = 0.75 detector pixel (an undersampled space telescope); on a grid 16x the stamp
    # the Airy loses 7e-4 of its light (with lambda/D = 0.25" it would be 1.2e-3: docs/physics.md)
    "airy": (galsim.Airy(lam_over_diam=0.15, obscuration=0.3), 16, 1e-2),
}


@pytest.mark.parametrize("psf_name", list(PSFS))
@pytest.mark.parametrize("gal_name", list(PROFILES))
def test_observe_agrees_with_galsim_at_oversampling_3(psf_name, gal_name):
    psf, mult, tol = PSFS[psf_name]
    gal = PROFILES[gal_name]
    k, grid = 3, 2 * S  # intrinsic grid twice the stamp so that no light is cut
    intrinsic = torch.tensor(_fine_intrinsic(gal, grid, k, SCALE), dtype=torch.float64)
    p = psf_from_galsim(psf, (mult * S * k) | 1, SCALE / k, dtype=torch.float64)
    ours = Observation(p, pixel_scale=SCALE, oversampling=k, stamp=S).noiseless(intrinsic).numpy()
    ref = galsim.Convolve(gal, psf).drawImage(nx=S, ny=S, scale=SCALE, use_true_center=False).array
    assert np.abs(ours - ref).max() <= tol * ref.max()
    assert ours.sum() == pytest.approx(ref.sum(), rel=1e-3)


def test_oversampling_1_is_worse_than_3_for_cuspy_profiles():
    """At k = 1 the PSF is sampled at detector pixels; the cusp of n = 4 makes that visible."""
    gal, (psf, mult, _) = PROFILES["sersic4"], PSFS["moffat"]
    ref = galsim.Convolve(gal, psf).drawImage(nx=S, ny=S, scale=SCALE, use_true_center=False).array
    err = {}
    for k in (1, 3):
        intrinsic = torch.tensor(_fine_intrinsic(gal, 2 * S, k, SCALE), dtype=torch.float64)
        p = psf_from_galsim(psf, (mult * S * k) | 1, SCALE / k, dtype=torch.float64)
        ours = Observation(p, pixel_scale=SCALE, oversampling=k, stamp=S).noiseless(intrinsic).numpy()
        err[k] = np.abs(ours - ref).max() / ref.max()
    assert err[3] < 2e-3 < err[1]


def test_analytic_psfs_match_galsim():
    fwhm = torch.tensor([1.4, 0.9], dtype=torch.float64)
    ours = moffat_psf(fwhm, 3.5, 41, 0.2, g1=0.05, g2=-0.03)
    for i, f in enumerate(fwhm.tolist()):
        ref = psf_from_galsim(galsim.Moffat(beta=3.5, fwhm=f).shear(g1=0.05, g2=-0.03), 41, 0.2,
                              dtype=torch.float64)
        assert torch.allclose(ours[i], ref, rtol=0, atol=1e-6 * float(ref.max()))
    g = gaussian_psf(1.0, 31, 0.15, g1=0.2, dtype=torch.float64)
    ref = psf_from_galsim(galsim.Gaussian(fwhm=1.0).shear(g1=0.2, g2=0.0), 31, 0.15, dtype=torch.float64)
    assert torch.allclose(g, ref, atol=1e-6 * float(ref.max()))


def test_psf_parameters_are_differentiable():
    fwhm = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    g1 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, b, e: moffat_psf(f, b, 9, 0.3, g1=e), (fwhm, beta, g1))


def test_gaussian_noise_chi2_and_closed_form():
    gen = torch.Generator().manual_seed(0)
    var = torch.rand(50, 16, 16, generator=gen, dtype=torch.float64) * 4 + 0.5
    mask = torch.rand(50, 16, 16, generator=gen) < 0.1
    noise = GaussianNoise(var, mask)
    model = torch.zeros(50, 16, 16, dtype=torch.float64)
    data = noise.sample(model, generator=gen)
    chi2 = noise.chi2(data, model)
    npix = (~mask).sum(dim=(-2, -1)).double()
    # chi2 over all images has mean sum(npix) and sd sqrt(2 sum(npix))
    assert abs(chi2.sum() - npix.sum()) < 3 * math.sqrt(2 * npix.sum())
    good = ~mask
    closed = -0.5 * (((data - model) ** 2 / var + torch.log(2 * math.pi * var)) * good).sum(dim=(-2, -1))
    assert torch.allclose(noise.log_prob(data, model), closed)
    assert torch.all(data[mask] == 0)  # masked pixels stay noiseless


def test_ccd_noise_matches_galsim_variance():
    sky, gain, rn = 130.0, 4.7, 5.5
    noise = CCDNoise(sky, gain, rn)
    model = torch.full((200, 32, 32), 50.0, dtype=torch.float64)
    data = noise.sample(model, generator=torch.Generator().manual_seed(1))
    expected = (50 + sky) / gain + (rn / gain) ** 2
    assert float(noise.variance(model)[0, 0, 0]) == pytest.approx(expected)
    img = galsim.ImageD(np.full((32, 32), 50.0))
    assert galsim.CCDNoise(sky_level=sky, gain=gain, read_noise=rn).getVariance() == pytest.approx(
        sky / gain + (rn / gain) ** 2)
    assert img.array.mean() == 50.0
    z2 = ((data - model) ** 2 / expected).mean()
    assert abs(float(z2) - 1) < 3 * math.sqrt(2 / data.numel())


def test_correlated_noise_likelihood():
    h = w = 16
    kernel = torch.tensor([[0.1, 0.2, 0.1], [0.2, 1.0, 0.2], [0.1, 0.2, 0.1]], dtype=torch.float64)
    noise = CorrelatedGaussianNoise.from_correlation(kernel, (h, w))
    # exact dense covariance of white noise convolved (periodically) with the kernel
    n = h * w
    conv = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        e = torch.zeros(h, w, dtype=torch.float64)
        e.view(-1)[i] = 1
        k_pad = torch.zeros(h, w, dtype=torch.float64)
        k_pad[:3, :3] = kernel
        k_pad = torch.roll(k_pad, (-1, -1), (0, 1))
        conv[:, i] = torch.fft.ifft2(torch.fft.fft2(e) * torch.fft.fft2(k_pad)).real.reshape(-1)
    cov = conv @ conv.T
    r = torch.randn(h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dense = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
    assert float(noise.log_prob(r, torch.zeros_like(r))) == pytest.approx(float(dense.log_prob(r.reshape(-1))),
                                                                         rel=1e-9)
    white = CorrelatedGaussianNoise(torch.full((h, w), 2.0, dtype=torch.float64))
    assert torch.allclose(white.log_prob(r, 0 * r), GaussianNoise(torch.full((h, w), 2.0,
                                                                            dtype=torch.float64)).log_prob(r, 0 * r))


def test_likelihood_gradcheck():
    gen = torch.Generator().manual_seed(3)
    psf = gaussian_psf(0.8, 7, 0.3, dtype=torch.float64)
    noise = GaussianNoise(torch.rand(2, 6, 6, generator=gen, dtype=torch.float64) + 0.5)
    obs = Observation(psf, pixel_scale=0.6, oversampling=2, stamp=6, noise=noise)
    data = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64)
    intrinsic = torch.rand(2, 12, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: obs.log_likelihood(x, data), (intrinsic,))
    ccd = CCDNoise(10.0, 2.0, 3.0)
    model = torch.rand(6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: ccd.log_prob(data[0], m * 20 + 1), (model,))


def test_interpolated_image_round_trip():
    prof = galsim.Exponential(half_light_radius=0.6, flux=100.0).shear(g1=0.2, g2=0.0)
    img = prof.drawImage(nx=48, ny=48, scale=0.1, use_true_center=False).array
    ii = to_interpolated_image(torch.tensor(img), 0.1)
    back = ii.drawImage(nx=48, ny=48, scale=0.1, use_true_center=False).array
    assert np.abs(back - img).max() <= 1e-3 * img.max()
    assert ii.flux == pytest.approx(img.sum(), rel=1e-6)
    # dropped into a GalSim simulation: observed through a PSF at a coarser scale
    psf = galsim.Moffat(beta=3.0, fwhm=0.5)
    ref = galsim.Convolve(prof, psf).drawImage(nx=24, ny=24, scale=0.2, use_true_center=False).array
    ours = galsim.Convolve(ii, psf).drawImage(nx=24, ny=24, scale=0.2, use_true_center=False).array
    assert np.abs(ours - ref).max() <= 5e-3 * ref.max()


@pytest.mark.parametrize("make, message", [
    (lambda: Observation(torch.full((5, 5), 0.1), pixel_scale=0.2), "psf: a PSF must sum to 1"),
    (lambda: Observation(torch.full((5, 5), float("nan")), pixel_scale=0.2), "psf: contains NaN"),
    (lambda: Observation(gaussian_psf(1.0, 5, 0.2), pixel_scale=0), "pixel_scale"),
    (lambda: GaussianNoise(torch.zeros(4, 4)), "variance: must be positive"),
    (lambda: CCDNoise(100.0, 0.0, 5.0), "gain: must be positive"),
    (lambda: CCDNoise(100.0, 2.0, -1.0), "read_noise"),
    (lambda: moffat_psf(1.0, 0.9, 9, 0.2), "beta"),
    (lambda: Observation(gaussian_psf(torch.ones(3), 5, 0.2), pixel_scale=0.2).noiseless(torch.zeros(2, 8, 8)),
     "does not match 3 per-galaxy PSFs"),
    (lambda: Observation(gaussian_psf(1.0, 5, 0.2), pixel_scale=0.2, oversampling=3).noiseless(
        torch.zeros(8, 8)), "not a multiple of the oversampling"),
])
def test_bad_input_is_named(make, message):
    with pytest.raises(GalgenInputError, match=message):
        make()


def test_observation_from_cutouts_reproduces_the_simulation(tmp_path):
    from galgen.data import observation_from_cutouts

    """The simulator's intrinsic images, observed by galgen, give its noiseless images."""
    from galgen.simulate import simulate

    path = simulate(tmp_path / "s.h5", survey="sdss", n=6, stamp=64, seed=4, oversampling=3, psf_size=95)
    from galgen.data import read_cutouts

    arrays, cat, _ = read_cutouts(path)
    obs = observation_from_cutouts(path, dtype=torch.float64)
    assert obs.oversampling == 3 and obs.stamp == 64 and obs.psf.shape == (6, 95, 95)
    model = obs.noiseless(torch.tensor(arrays["intrinsic"], dtype=torch.float64)).numpy()
    fits = np.asarray(cat["fits_stamp"])
    assert fits.sum() >= 2
    peak = arrays["noiseless"].max(axis=(1, 2))
    err = np.abs(model - arrays["noiseless"]).max(axis=(1, 2)) / peak
    # the intrinsic grid is the stamp itself here (no padding), so edges lose a little light
    assert np.all(err[fits] < 1e-2), err
    data = torch.tensor(arrays["observed"], dtype=torch.float64)
    logl = obs.log_likelihood(torch.tensor(arrays["intrinsic"], dtype=torch.float64), data)
    chi2 = obs.noise.chi2(data, torch.tensor(arrays["noiseless"], dtype=torch.float64))
    npix = 64 * 64
    expected = -0.5 * (chi2 + torch.log(2 * math.pi * torch.tensor(arrays["variance"], dtype=torch.float64)).sum((1, 2)))
    fit = torch.tensor(fits)
    assert torch.allclose(logl[fit], expected[fit], rtol=2e-3)
    assert abs(float(chi2.sum()) / (6 * npix) - 1) < 3 * math.sqrt(2 / (6 * npix))


def test_observation_from_survey():
    from galgen.simulate import survey_observation

    from galgen.simulate import load_survey

    sv = load_survey("lsst")
    obs = survey_observation("lsst", psf_size=41, stamp=32, oversampling=2, dtype=torch.float64)
    assert obs.pixel_scale == sv.pixel_scale and obs.intrinsic_scale == pytest.approx(0.1)
    ref = psf_from_galsim(galsim.Kolmogorov(fwhm=0.7), 41, 0.1, dtype=torch.float64)
    assert torch.allclose(obs.psf, ref)
    empty = torch.zeros(1, 32, 32, dtype=torch.float64)
    assert float(obs.noise.variance(empty)[0, 0, 0]) == pytest.approx(sv.sky_variance)
    noiseless, noisy = obs.observe(torch.zeros(1, 64, 64, dtype=torch.float64),
                                   generator=torch.Generator().manual_seed(0))
    assert noisy.std().item() == pytest.approx(math.sqrt(sv.sky_variance), rel=0.1)


def test_select_indexes_per_galaxy_psfs_and_noise_and_shares_the_psf_transforms():
    psfs = torch.stack([gaussian_psf(f, 15, SCALE / 2, dtype=torch.float64) for f in (0.6, 0.9, 1.3)])
    var = torch.stack([torch.full((S, S), v, dtype=torch.float64) for v in (1.0, 4.0, 9.0)])
    mask = torch.zeros(3, S, S, dtype=torch.bool)
    mask[1, :4] = True
    obs = Observation(psfs, pixel_scale=SCALE, oversampling=2, stamp=S, noise=GaussianNoise(var, mask))
    torch.manual_seed(0)
    intr = torch.rand(3, 2 * S, 2 * S, dtype=torch.float64)
    data = obs.noiseless(intr) + torch.randn(3, S, S, dtype=torch.float64)
    full = obs.log_likelihood(intr, data)
    idx = torch.tensor([2, 0, 1, 1])
    sel = obs.select(idx)
    assert torch.allclose(sel.log_likelihood(intr[idx], data[idx]), full[idx], rtol=1e-12)
    # the selection indexes the parent's cached PSF transform instead of computing its own
    (parent_t,) = obs._transfer.values()
    (sel_t,) = sel._transfer.values()
    assert torch.equal(sel_t, parent_t[idx])
    # per-galaxy CCD parameters are indexed too, a shared PSF and correlated noise are kept
    ccd = CCDNoise(torch.tensor([10.0, 20.0, 30.0]), 2.0, 5.0)
    one = Observation(psfs[0], pixel_scale=SCALE, oversampling=2, stamp=S, noise=ccd).select(torch.tensor([2, 2]))
    assert one.psf.ndim == 2 and one.noise.sky_level.tolist() == [30.0, 30.0]
    corr = CorrelatedGaussianNoise(torch.ones(S, S))
    assert Observation(psfs, pixel_scale=SCALE, noise=corr).select([0]).noise is corr
    with pytest.raises(GalgenInputError, match="index: out of range"):
        obs.select([3])
    with pytest.raises(GalgenInputError, match="index: expected 1-d"):
        obs.select([[0]])


def test_physics_reads_no_files_and_points_to_the_new_homes():
    with pytest.raises(GalgenInputError, match="observation_from_cutouts"):
        Observation.from_cutouts("x.h5")
    with pytest.raises(GalgenInputError, match="survey_observation"):
        Observation.from_survey("sdss")


def test_shallower_batch_is_the_same_galaxies_observed_with_more_variance():
    from galgen.physics import Batch

    g = torch.Generator().manual_seed(4)
    n, s = 6, 32
    noiseless = 50 * torch.rand(n, s, s, generator=g, dtype=torch.float64)
    var = 0.5 + torch.rand(n, s, s, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, s, s, dtype=torch.bool)
    mask[:, :3, :3] = True
    psf = torch.zeros(n, 5, 5, dtype=torch.float64)
    psf[:, 2, 2] = 1
    observed = noiseless + var.sqrt() * torch.randn(n, s, s, generator=g, dtype=torch.float64)
    batch = Batch(observed, Observation(psf, pixel_scale=0.4, stamp=s, noise=GaussianNoise(var, mask)))
    factor = torch.tensor([1.0, 2.0, 4.0, 10.0, 40.0, 40.0], dtype=torch.float64)
    shallow = batch.shallower(factor, generator=g)
    new_var = shallow.observation.noise.variance_map
    assert torch.allclose(new_var, var * factor[:, None, None])
    # the residual from the truth has exactly the new variance: chi2 per good pixel ~ 1 for each galaxy
    good = (~mask[0]).sum().item()
    chi2 = shallow.observation.noise.chi2(shallow.observed, noiseless) / good
    assert torch.all((chi2 - 1).abs() < 5 * (2 / good) ** 0.5), chi2
    assert torch.equal(shallow.observed[0], observed[0])  # factor 1: nothing added
    assert torch.equal(shallow.observed[mask], observed[mask])  # masked pixels untouched
    assert shallow.observation.psf is batch.observation.psf and batch.observation.noise.variance_map is var
    with pytest.raises(GalgenInputError, match="factor must be >= 1"):
        batch.shallower(0.5)
    ccd = Batch(observed, Observation(psf, pixel_scale=0.4, stamp=s, noise=CCDNoise(10.0, 4.7, 5.5)))
    with pytest.raises(GalgenInputError, match="GaussianNoise"):
        ccd.shallower(2.0)
