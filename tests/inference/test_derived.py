"""Derived quantities against GalSim profiles and analytic moments; credible intervals."""

import galsim
import numpy as np
import pytest
import torch

from galgen.inference import credible_intervals, derived_quantities


@pytest.mark.parametrize("n", [0.5, 1.0, 4.0])
def test_flux_and_half_light_radius_of_galsim_sersics(n):
    scale, hlr = 0.05, 0.6
    prof = galsim.Sersic(n, half_light_radius=hlr, trunc=8 * hlr, flux_untruncated=False, flux=250.0)
    img = prof.drawImage(nx=256, ny=256, scale=scale, use_true_center=False).array
    q = derived_quantities(torch.tensor(img)[None], scale)[0].numpy()
    assert q[0] == pytest.approx(img.sum())
    ref = prof.calculateHLR(scale=scale / 4, size=1024)  # GalSim's own pixel-grid estimate
    assert q[1] == pytest.approx(ref, rel=0.02)
    assert abs(q[2]) < 1e-6 and abs(q[3]) < 1e-6


@pytest.mark.parametrize("g1, g2", [(0.3, 0.0), (-0.1, 0.25)])
def test_ellipticity_of_a_sheared_gaussian(g1, g2):
    shear = galsim.Shear(g1=g1, g2=g2)
    img = galsim.Gaussian(sigma=0.5).shear(shear).drawImage(nx=128, ny=128, scale=0.05, method="no_pixel").array
    e = derived_quantities(torch.tensor(img)[None], 0.05)[0, 2:].numpy()
    assert e == pytest.approx([shear.e1, shear.e2], abs=2e-4)


def test_empty_image_gives_nan_size_and_shape():
    q = derived_quantities(torch.zeros(2, 16, 16), 0.1)
    assert torch.all(q[:, 0] == 0) and torch.isnan(q[:, 1:]).all()


def test_credible_intervals_match_normal_quantiles():
    d = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 40000, 4))
    q = credible_intervals(d)
    assert q.shape == (2, 4, 5)
    assert np.allclose(q[..., 2], 3.0, atol=0.05)
    assert np.allclose(q[..., 3] - q[..., 1], 2 * 2.0 * 0.9945, rtol=0.03)  # 68.27% -> +-1 sigma
    assert np.allclose(q[..., 4] - q[..., 0], 2 * 2.0 * 1.96, rtol=0.03)
