"""The torch pixel-integrated Sersic renderer against GalSim's exact pixel integral, b_n, and gradients."""

import galsim
import numpy as np
import pytest
import torch
from scipy.special import gammaincinv

from galgen.physics.sersic import render_sersic, sersic_b
from galgen.simulate.render import draw_integrated


@pytest.mark.parametrize("n", [0.3, 0.5, 1.0, 2.0, 4.0, 6.0])
def test_sersic_b_against_the_exact_root(n):
    assert float(sersic_b(torch.tensor(n, dtype=torch.float64))) == pytest.approx(gammaincinv(2 * n, 0.5), rel=1e-12)


@pytest.mark.parametrize("n", [0.5, 1.0, 2.5, 4.0, 6.0])
@pytest.mark.parametrize("scale, N, hlr, g1, g2, off", [
    (0.132, 96, 0.3, 0.0, 0.0, 0.0), (0.132, 96, 1.0, 0.3, -0.2, 0.3), (0.132, 96, 2.0, -0.1, 0.25, -0.4),
    # SDSS pixels: galaxies smaller than a pixel (the midpoint levels used before missed these cusps by 2.5e-2)
    (0.396, 32, 0.1, 0.5, 0.2, 0.25), (0.396, 32, 0.4, -0.6, 0.1, -0.1), (0.396, 32, 1.5, 0.2, 0.6, 0.45)])
def test_render_sersic_matches_galsim_pixel_integral(n, scale, N, hlr, g1, g2, off):
    """Against GalSim's exact pixel integral (real-space convolution with the pixel in the core).

    GalSim's default FFT drawImage itself differs from the exact integral by up to 1e-2 of
    the peak in the central pixel (n = 1, hlr = 1"), so the exact integral is the reference.
    The default rendering (exact core, Gauss-Legendre levels) is within 1.1e-4 of the peak
    (sheared, off-centre, unresolved cusps).
    """
    prof = galsim.Sersic(n, half_light_radius=hlr, flux=100.0).shear(g1=g1, g2=g2)
    ref = draw_integrated(prof, N, scale, offset=off, subsample=12, core=3)
    centre = torch.tensor([[N // 2 + off, N // 2 + off]], dtype=torch.float64)
    img = render_sersic(torch.tensor([hlr], dtype=torch.float64), torch.tensor([n], dtype=torch.float64), g1, g2,
                        size=N, scale=scale, flux=100.0, centre=centre)[0].numpy()
    assert np.abs(img - ref).max() / ref.max() < 2e-4  # 1.1e-4 measured (the old midpoint levels: 4.2e-4)
    # GalSim's real-space drawing (its FFT drawing is 1.4e-3 high for n = 4, hlr = 0.3")
    in_grid = prof.drawImage(nx=N, ny=N, scale=scale, use_true_center=False, offset=(off, off),
                             method="real_space").array.sum()
    assert img.sum() == pytest.approx(in_grid, rel=1e-3)


def test_sersic_b_derivative_is_exact():
    n = torch.tensor([0.5, 0.6, 1.0, 4.0, 6.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sersic_b(n).sum(), n)
    m = n.detach().numpy()
    fd = (gammaincinv(2 * (m + 1e-6), 0.5) - gammaincinv(2 * (m - 1e-6), 0.5)) / 2e-6
    np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-7)


def test_gradcheck_of_the_exact_core():
    """Derivatives of the exactly integrated pixels, a cuspy and a smooth galaxy, one centre within 1e-5 pixel of a pixel edge."""
    args = [torch.tensor([0.5, 0.2], dtype=torch.float64, requires_grad=True),
            torch.tensor([1.3, 4.0], dtype=torch.float64, requires_grad=True),
            torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True),
            torch.tensor([-0.2, 0.05], dtype=torch.float64, requires_grad=True),
            torch.tensor([[4.2, 3.9], [4.50001, 4.0]], dtype=torch.float64, requires_grad=True)]

    def f(hlr, n, g1, g2, centre):
        return render_sersic(hlr, n, g1, g2, size=9, scale=0.3, centre=centre, levels=((None, 3), (2, 4)), core=1)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_gradcheck_of_the_renderer():
    args = [torch.tensor([0.7], dtype=torch.float64, requires_grad=True),
            torch.tensor([1.7], dtype=torch.float64, requires_grad=True),
            torch.tensor([0.1], dtype=torch.float64, requires_grad=True),
            torch.tensor([-0.2], dtype=torch.float64, requires_grad=True),
            torch.tensor([[4.2, 3.9]], dtype=torch.float64, requires_grad=True)]

    def f(hlr, n, g1, g2, centre):
        return render_sersic(hlr, n, g1, g2, size=9, scale=0.3, centre=centre, levels=((None, 3), (1, 6)), core=-1)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)
