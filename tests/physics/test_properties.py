"""Property tests (hypothesis) of the convolution: linearity, flux, shift equivariance."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from galgen.physics import convolve, pixelate

sizes = st.integers(4, 24)


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.normal(size=s)) for s in shapes]


@settings(max_examples=40, deadline=None)
@given(h=sizes, w=sizes, p=st.integers(1, 9), seed=st.integers(0, 2**31), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linear_in_images(h, w, p, seed, a, b):
    x, y, k = _arrays(seed, (h, w), (h, w), (p, p))
    lhs = convolve(a * x + b * y, k)
    rhs = a * convolve(x, k) + b * convolve(y, k)
    assert torch.allclose(lhs, rhs, atol=1e-9 * (1 + float(lhs.abs().max())))


@settings(max_examples=40, deadline=None)
@given(h=sizes, p=st.integers(1, 7), seed=st.integers(0, 2**31))
def test_flux_conserved_when_nothing_leaves_the_grid(h, p, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((h + 2 * p, h + 2 * p))
    img[p:p + h, p:p + h] = rng.uniform(size=(h, h))  # light at least p from every edge
    psf = rng.uniform(size=(p, p))
    psf /= psf.sum()
    out = convolve(torch.tensor(img), torch.tensor(psf))
    assert abs(float(out.sum()) - img.sum()) <= 1e-10 * img.sum()


@settings(max_examples=40, deadline=None)
@given(h=st.integers(8, 24), p=st.integers(1, 7), dy=st.integers(-3, 3), dx=st.integers(-3, 3),
       seed=st.integers(0, 2**31))
def test_shift_equivariance(h, p, dy, dx, seed):
    """Shifting the image shifts the convolution (away from the edges)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h + 16, h + 16))
    img[8:8 + h // 2, 8:8 + h // 2] = rng.uniform(size=(h // 2, h // 2))
    psf = torch.tensor(rng.uniform(size=(p, p)))
    shifted = np.roll(img, (dy, dx), axis=(0, 1))
    a = convolve(torch.tensor(img), psf)
    b = convolve(torch.tensor(shifted), psf)
    assert torch.allclose(torch.roll(a, (dy, dx), dims=(0, 1)), b, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), k=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_pixelate_conserves_flux_and_is_linear(n, k, seed):
    x, y = _arrays(seed, (2, n * k, n * k), (2, n * k, n * k))
    assert torch.allclose(pixelate(x, k).sum(dim=(-2, -1)), x.sum(dim=(-2, -1)))
    assert torch.allclose(pixelate(x + 2 * y, k), pixelate(x, k) + 2 * pixelate(y, k))
