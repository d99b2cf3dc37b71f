"""Batched HMC against analytic Gaussian posteriors (a linear decoder)."""

import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.inference.hmc import hmc_sample


def test_linear_gaussian_posterior_mean_and_covariance():
    """y = A z + noise, z ~ N(0, I): the posterior is Gaussian with known moments."""
    torch.manual_seed(0)
    G, d, n_pix, sigma = 6, 3, 20, 0.5
    A = torch.randn(G, n_pix, d, dtype=torch.float64)
    A[:, :, 2] *= 0.1  # one poorly constrained direction: a strongly anisotropic posterior
    z_true = torch.randn(G, d, dtype=torch.float64)
    y = torch.einsum("gpd,gd->gp", A, z_true) + sigma * torch.randn(G, n_pix, dtype=torch.float64)
    C = 4

    def log_prob(x):  # rows ordered galaxy-major: row = g * C + c
        g = torch.arange(len(x)) // C
        r = y[g] - torch.einsum("mpd,md->mp", A[g], x)
        return -0.5 * (r**2).sum(1) / sigma**2 - 0.5 * (x**2).sum(1)

    prec = torch.eye(d, dtype=torch.float64) + A.transpose(1, 2) @ A / sigma**2
    cov = torch.linalg.inv(prec)
    mean = torch.einsum("gij,gj->gi", cov, torch.einsum("gpd,gp->gd", A, y) / sigma**2)
    res = hmc_sample(log_prob, torch.zeros(G, C, d, dtype=torch.float64), n_samples=1500, n_warmup=500,
                     n_leapfrog=10, generator=torch.Generator().manual_seed(1))
    s = res.samples.reshape(G, C * 1500, d)
    sd = cov.diagonal(dim1=1, dim2=2).sqrt()
    # means within ~4 Monte-Carlo standard errors (effective sample size >= ~600 per galaxy)
    assert ((s.mean(1) - mean).abs() / sd).max() < 0.15
    emp_cov = torch.stack([torch.cov(si.T) for si in s])
    rel = (emp_cov.diagonal(dim1=1, dim2=2) / cov.diagonal(dim1=1, dim2=2))
    assert ((rel - 1).abs() < 0.15).all(), rel
    corr = lambda c: c / (c.diagonal(dim1=1, dim2=2)[:, :, None] * c.diagonal(dim1=1, dim2=2)[:, None, :]).sqrt()
    assert (corr(emp_cov) - corr(cov)).abs().max() < 0.08
    assert (res.divergences == 0).all()
    assert ((res.accept_rate > 0.6) & (res.accept_rate < 0.97)).all(), res.accept_rate
    # the mass matrix adapted to the poorly constrained direction
    assert (res.inv_mass[..., 2] > 5 * res.inv_mass[..., 0]).all()


def test_reproducible_and_bad_init():
    target = lambda x: -0.5 * (x**2).sum(1)
    a = hmc_sample(target, torch.zeros(2, 2, 2), n_samples=20, n_warmup=10, generator=torch.Generator().manual_seed(4))
    b = hmc_sample(target, torch.zeros(2, 2, 2), n_samples=20, n_warmup=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.samples, b.samples)
    with pytest.raises(GalgenInputError, match="init"):
        hmc_sample(target, torch.zeros(4, 2))
    with pytest.raises(GalgenInputError, match="not finite"):
        hmc_sample(lambda x: torch.full((len(x),), float("nan")) + 0 * x.sum(1), torch.zeros(1, 1, 2))
