"""galgen.physics.convolve against direct convolution, analytic results and GalSim."""

import galsim
import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from galgen.errors import GalgenInputError
from galgen.physics import convolve, good_fft_size, pixelate, psf_transfer


@pytest.mark.parametrize("h, w, p, q", [(16, 16, 5, 5), (15, 17, 4, 6), (8, 8, 21, 21), (12, 9, 12, 9),
                                        (7, 9, 16, 2), (31, 31, 63, 64), (5, 5, 1, 1)])
def test_matches_direct_linear_convolution(h, w, p, q):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(h, w))
    psf = rng.uniform(size=(p, q))
    ours = convolve(torch.tensor(img), torch.tensor(psf)).numpy()
    full = convolve2d(img, psf, mode="full")
    ref = full[p // 2:p // 2 + h, q // 2:q // 2 + w]
    assert np.allclose(ours, ref, atol=1e-12)


def test_batched_and_shared_psf_and_cached_transfer():
    rng = np.random.default_rng(1)
    imgs = torch.tensor(rng.normal(size=(4, 20, 20)))
    psfs = torch.tensor(rng.uniform(size=(4, 7, 7)))
    per = convolve(imgs, psfs)
    for i in range(4):
        assert torch.allclose(per[i], convolve(imgs[i], psfs[i]), atol=1e-12)
    shared = convolve(imgs, psfs[0])
    t = psf_transfer(psfs[0], (good_fft_size(20 + 7 // 2), good_fft_size(20 + 7 // 2)))
    assert torch.allclose(shared, convolve(imgs, psfs[0], transfer=t), atol=1e-12)


def test_gaussian_convolved_with_gaussian_is_analytic():
    """Gaussian (sigma1) * Gaussian (sigma2) = Gaussian (sqrt(s1^2+s2^2)), float64, 1e-6 of peak."""
    n, scale = 65, 0.1
    y, x = (np.indices((n, n)) - n // 2) * scale
    def gauss(s, size):
        yy, xx = (np.indices((size, size)) - size // 2) * scale
        return np.exp(-(xx**2 + yy**2) / (2 * s**2)) / (2 * np.pi * s**2) * scale**2
    s1, s2 = 0.5, 0.3
    out = convolve(torch.tensor(gauss(s1, n)), torch.tensor(gauss(s2, 41))).numpy()
    ref = gauss(np.hypot(s1, s2), n)
    assert np.abs(out - ref).max() <= 1e-6 * ref.max()


def test_gradients_in_both_arguments():
    rng = np.random.default_rng(2)
    img = torch.tensor(rng.normal(size=(2, 6, 7)), requires_grad=True)
    psf = torch.tensor(rng.uniform(size=(2, 3, 4)), requires_grad=True)
    assert torch.autograd.gradcheck(convolve, (img, psf))


def test_pixelate_with_galsim_oversampled_drawing():
    """GalSim drawn at k=3 no_pixel-integrated ... summed equals GalSim at the detector scale."""
    prof = galsim.Exponential(half_light_radius=0.8, flux=50.0).shear(g1=0.2, g2=0.1)
    S, k, scale = 24, 3, 0.3
    off = (S // 2 + 0.5) * k - 0.5 - (S * k) // 2
    fine = prof.drawImage(nx=S * k, ny=S * k, scale=scale / k, use_true_center=False, offset=(off, off)).array
    coarse = prof.drawImage(nx=S, ny=S, scale=scale, use_true_center=False).array
    ours = pixelate(torch.tensor(fine, dtype=torch.float64), k).numpy()
    assert np.abs(ours - coarse).max() <= 2e-3 * coarse.max()
    assert ours.sum() == pytest.approx(fine.sum())


def test_bad_input_is_named():
    img = torch.zeros(3, 8, 8)
    with pytest.raises(GalgenInputError, match="psf: batch size 2"):
        convolve(img, torch.zeros(2, 3, 3))
    with pytest.raises(GalgenInputError, match="psf: contains NaN"):
        convolve(img, torch.full((3, 3), float("nan")))
    with pytest.raises(GalgenInputError, match="images: expected shape"):
        convolve(torch.zeros(8), torch.zeros(3, 3))
    with pytest.raises(GalgenInputError, match="dtype/device"):
        convolve(img, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(GalgenInputError, match="not a multiple"):
        pixelate(torch.zeros(7, 7), 3)


def test_physics_runs_without_galsim():
    """GPU images may lack GalSim: the torch paths of galgen.physics must not import it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['galsim'] = None; sys.modules['astropy'] = None\n"
            "import torch; from galgen.physics import convolve, moffat_psf, Observation, GaussianNoise\n"
            "psf = moffat_psf(1.0, 3.5, 9, 0.2)\n"
            "obs = Observation(psf, pixel_scale=0.2, noise=GaussianNoise(torch.ones(16, 16)))\n"
            "print(float(obs.noiseless(torch.ones(2, 16, 16)).sum()) > 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_oversized_psf_is_cropped_exactly():
    rng = np.random.default_rng(5)
    img = torch.tensor(rng.normal(size=(3, 10, 12)))
    big = torch.tensor(rng.uniform(size=(3, 41, 40)))
    core = big[:, 20 - 9:20 + 10, 20 - 11:20 + 12]  # within H-1, W-1 of the centre (20, 20)
    assert torch.allclose(convolve(img, big), convolve(img, core), atol=1e-12)
    ref = np.stack([convolve2d(img[i].numpy(), big[i].numpy(), mode="full")[20:30, 20:32] for i in range(3)])
    assert np.allclose(convolve(img, big).numpy(), ref, atol=1e-10)
