"""Batched HMC against analytic Gaussian posteriors (a linear decoder)."""

import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.inference.hmc import hmc_sample


def _gaussian(S, mu=None):
    """The log density (up to a constant) of N(mu, S) for rows ``(M, d)``."""
    P = torch.linalg.inv(S)
    mu = torch.zeros(len(S), dtype=S.dtype) if mu is None else mu

    def log_prob(x):
        r = x - mu
        return -0.5 * torch.einsum("mi,ij,mj->m", r, P, r)

    return log_prob


@pytest.mark.parametrize("sampler", ["hmc", "nuts"])
def test_linear_gaussian_posterior_mean_and_covariance(sampler):
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
                     n_leapfrog=10, sampler=sampler, generator=torch.Generator().manual_seed(1))
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


def test_dense_metric_learns_a_correlated_posterior_and_mixes_faster():
    """N(mu, S) with correlation 0.995 and scales 1:30: the dense metric learns S and mixes far better."""
    from galgen.inference.diagnostics import summarize_chains

    G, C, d = 4, 4, 3
    sd = torch.tensor([1.0, 30.0, 0.2], dtype=torch.float64)
    corr = torch.tensor([[1.0, 0.995, 0.0], [0.995, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    S = corr * sd[:, None] * sd[None, :]
    mu = torch.tensor([1.0, -20.0, 0.5], dtype=torch.float64)
    log_prob = _gaussian(S, mu)

    init = mu + 0.01 * torch.randn(G, C, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(n_samples=600, n_warmup=400, n_leapfrog=4)
    dense = hmc_sample(log_prob, init, metric="dense", generator=torch.Generator().manual_seed(2), **kw)
    diag = hmc_sample(log_prob, init, metric="diag", generator=torch.Generator().manual_seed(2), **kw)
    assert dense.inv_mass.shape == (G, C, d, d) and diag.inv_mass.shape == (G, C, d)
    # the adapted metric is the posterior covariance (to its warm-up estimation error)
    got = dense.inv_mass[:, 0]
    assert ((got.diagonal(dim1=1, dim2=2) / S.diagonal()) - 1).abs().max() < 0.5
    got_corr = got[:, 0, 1] / (got[:, 0, 0] * got[:, 1, 1]).sqrt()
    assert (got_corr > 0.97).all(), got_corr
    s = dense.samples.reshape(G, -1, d)
    assert ((s.mean(1) - mu).abs() / sd).max() < 0.15
    emp = torch.stack([torch.cov(si.T) for si in s])
    assert ((emp.diagonal(dim1=1, dim2=2) / S.diagonal() - 1).abs() < 0.3).all()
    ess_dense = summarize_chains(dense.samples.numpy())["ess_bulk"].min(1)
    ess_diag = summarize_chains(diag.samples.numpy())["ess_bulk"].min(1)
    assert (ess_dense > 3 * ess_diag).all(), (ess_dense, ess_diag)
    with pytest.raises(GalgenInputError, match="metric"):
        hmc_sample(log_prob, init, metric="full")


def test_nuts_draws_standard_normals_at_every_scale():
    """Galaxies whose posteriors differ by 10^4 in scale: standardised NUTS draws are N(0, 1).

    A bias of the trajectory sampling or of the U-turn checks (a transition that is not
    reversible) shows as a wrong variance or tails; each chain picks its own step size and
    trajectory length.
    """
    from scipy import stats

    G, C = 24, 4
    sd = torch.logspace(-2, 2, G, dtype=torch.float64)
    mu = torch.linspace(-5, 5, G, dtype=torch.float64)

    def log_prob(x):
        g = torch.arange(len(x)) // C
        return -0.5 * (((x - mu[g, None]) / sd[g, None]) ** 2).sum(1)

    init = (mu[:, None, None] + 0.1 * sd[:, None, None]).expand(G, C, 2).clone()
    res = hmc_sample(log_prob, init, n_samples=800, n_warmup=300, sampler="nuts",
                     generator=torch.Generator().manual_seed(1))
    z = ((res.samples - mu[:, None, None, None]) / sd[:, None, None, None]).reshape(-1).numpy()
    assert abs(z.mean()) < 0.03 and abs(z.var() - 1) < 0.04, (z.mean(), z.var())
    assert abs(stats.kurtosis(z)) < 0.1
    assert stats.kstest(z[::7], "norm").pvalue > 0.001
    assert (res.divergences == 0).all()
    # the metric takes each galaxy's scale, so that every chain needs a few steps of about
    # the same size (no circling: Stan's checks across merged sub-trees)
    rel = res.inv_mass / sd[:, None, None] ** 2
    assert ((rel > 1 / 3) & (rel < 3)).all(), rel
    assert ((res.n_steps > 1.5) & (res.n_steps < 8)).all(), res.n_steps
    assert ((res.step_size > 0.4) & (res.step_size < 1.6)).all(), res.step_size


def test_nuts_dense_metric_and_depth_limit():
    """On a tilted Gaussian NUTS with the dense metric recovers the covariance; max_depth bounds the trajectory."""
    S = torch.tensor([[1.0, 0.99 * 30], [0.99 * 30, 900.0]], dtype=torch.float64)
    log_prob = _gaussian(S)

    init = 0.01 * torch.randn(3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = hmc_sample(log_prob, init, n_samples=600, n_warmup=300, sampler="nuts", metric="dense",
                     generator=torch.Generator().manual_seed(2))
    s = res.samples.reshape(3, -1, 2)
    emp = torch.stack([torch.cov(si.T) for si in s])
    assert ((emp.diagonal(dim1=1, dim2=2) / S.diagonal() - 1).abs() < 0.15).all()
    assert ((emp[:, 0, 1] / (emp[:, 0, 0] * emp[:, 1, 1]).sqrt() - 0.99).abs() < 0.01).all()
    short = hmc_sample(log_prob, init, n_samples=50, n_warmup=0, sampler="nuts", step_size=1e-3, max_depth=3,
                       adapt_mass=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(short.n_steps, torch.full_like(short.n_steps, 7.0))  # 1 + 2 + 4, never U-turning
    again = hmc_sample(log_prob, init, n_samples=50, n_warmup=0, sampler="nuts", step_size=1e-3, max_depth=3,
                       adapt_mass=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(short.samples, again.samples)
    with pytest.raises(GalgenInputError, match="sampler"):
        hmc_sample(log_prob, init, sampler="mala")
    with pytest.raises(GalgenInputError, match="max_depth"):
        hmc_sample(log_prob, init, sampler="nuts", max_depth=0)


def test_nuts_chains_do_not_wait_for_each_other():
    """Each batched gradient is a leapfrog step of every chain: the run costs about the longest chain's own steps.

    Chains in lock-step would cost the longest trajectory of the batch at every draw,
    about twice as much here (trajectory lengths vary from draw to draw).
    """
    calls = []

    def log_prob(x):
        calls.append(len(x))
        return -0.5 * (x**2).sum(1)

    res = hmc_sample(log_prob, torch.zeros(16, 4, 2, dtype=torch.float64), n_samples=200, n_warmup=0,
                     step_size=0.2, sampler="nuts", adapt_mass=False, generator=torch.Generator().manual_seed(3))
    steps = res.n_steps * 200  # leapfrog steps of each chain
    assert steps.min() < 0.9 * steps.max()  # trajectories differ
    assert len(calls) - 1 < 1.1 * float(steps.max()), (len(calls), float(steps.max()), float(steps.mean()))
    z = res.samples.reshape(-1).numpy()
    assert abs(z.var() - 1) < 0.1


def test_nuts_evaluates_only_the_moving_chains():
    """A target that takes ``rows`` is asked only for the chains still moving, and the draws are the same."""
    scales = torch.logspace(-2, 2, 12, dtype=torch.float64).repeat_interleave(4)  # 12 galaxies x 4 chains
    rows_asked = []

    def plain(x):
        return -0.5 * ((x / scales[:, None]) ** 2).sum(1)

    def by_rows(x, rows=None):
        rows_asked.append(len(x))
        s = scales if rows is None else scales[rows]
        return -0.5 * ((x / s[:, None]) ** 2).sum(1)

    kw = dict(n_samples=100, n_warmup=0, step_size=0.05, adapt_mass=False, sampler="nuts")
    a = hmc_sample(plain, torch.zeros(12, 4, 2, dtype=torch.float64), generator=torch.Generator().manual_seed(3), **kw)
    b = hmc_sample(by_rows, torch.zeros(12, 4, 2, dtype=torch.float64), generator=torch.Generator().manual_seed(3),
                   **kw)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.n_steps, b.n_steps)
    # after the first call (all 48 rows) every row asked for is one leapfrog step of one chain
    assert sum(rows_asked[1:]) == round(float((b.n_steps * 100).sum()))
    assert sum(rows_asked[1:]) < 0.8 * 48 * (len(rows_asked) - 1)  # and fewer than all chains at every step


def test_nuts_with_a_known_dense_metric_needs_no_mass_adaptation():
    """A 1:100 tilted Gaussian: NUTS given its covariance as inv_mass (adapt_mass=False) takes unit-scale steps
    and short trajectories from the start and recovers the covariance; with the identity metric it needs
    far deeper trees. Diagonal metrics take the diagonal of a dense inv_mass; bad shapes and non-positive
    matrices are refused."""
    S = torch.tensor([[1.0, 0.995 * 100], [0.995 * 100, 1e4]], dtype=torch.float64)
    log_prob = _gaussian(S)

    G, C = 3, 4
    init = 0.01 * torch.randn(G, C, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(n_samples=400, n_warmup=60, sampler="nuts", adapt_mass=False, max_depth=6)
    known = hmc_sample(log_prob, init, metric="dense", inv_mass=S.expand(G, 2, 2),
                       generator=torch.Generator().manual_seed(1), **kw)
    plain = hmc_sample(log_prob, init, metric="dense", generator=torch.Generator().manual_seed(1), **kw)
    assert torch.allclose(known.inv_mass, S.expand(G, C, 2, 2))
    assert (known.step_size > 0.4).all() and (known.n_steps < 8).all(), (known.step_size, known.n_steps)
    assert (plain.n_steps > 4 * known.n_steps.max()).all(), (plain.n_steps, known.n_steps)
    s = known.samples.reshape(G, -1, 2)
    emp = torch.stack([torch.cov(si.T) for si in s])
    assert ((emp.diagonal(dim1=1, dim2=2) / S.diagonal() - 1).abs() < 0.2).all(), emp
    assert ((emp[:, 0, 1] / (emp[:, 0, 0] * emp[:, 1, 1]).sqrt() - 0.995).abs() < 0.01).all()
    diag = hmc_sample(log_prob, init, n_samples=5, n_warmup=0, sampler="nuts", inv_mass=S.expand(G, 2, 2),
                      adapt_mass=False, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(diag.inv_mass, S.diagonal().expand(G, C, 2))
    # positive definite in float64 only: float32 chains take its diagonal rather than fail
    near = torch.tensor([[1.0, 1 - 1e-9], [1 - 1e-9, 1.0]], dtype=torch.float64).expand(G, 2, 2)
    r32 = hmc_sample(lambda x: -0.5 * (x**2).sum(1), init.float(), n_samples=3, n_warmup=0, sampler="nuts",
                     metric="dense", inv_mass=near, adapt_mass=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r32.inv_mass, torch.eye(2).expand(G, C, 2, 2))
    with pytest.raises(GalgenInputError, match="inv_mass"):
        hmc_sample(log_prob, init, inv_mass=S)
    with pytest.raises(GalgenInputError, match="positive definite"):
        hmc_sample(log_prob, init, metric="dense", inv_mass=-S.expand(G, 2, 2))


def test_warm_up_refines_an_initial_metric_towards_the_posterior():
    """A wrong initial metric (the variances 4x too large, no correlation) is refined by the warm-up windows,
    regularised towards it with d + 1 pseudo-draws: the adapted metric lies between it and the posterior
    covariance, near the latter."""
    S = torch.tensor([[1.0, 0.9 * 3], [0.9 * 3, 9.0]], dtype=torch.float64)
    log_prob = _gaussian(S)

    G, C = 2, 4
    init = 0.01 * torch.randn(G, C, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = torch.diag_embed(4 * S.diagonal()).expand(G, 2, 2)
    res = hmc_sample(log_prob, init, n_samples=10, n_warmup=600, sampler="nuts", metric="dense", inv_mass=start,
                     generator=torch.Generator().manual_seed(3))
    got = res.inv_mass[:, 0]
    corr = got[:, 0, 1] / (got[:, 0, 0] * got[:, 1, 1]).sqrt()
    assert ((corr > 0.75) & (corr < 0.9)).all(), corr  # pulled towards 0.9 from 0, a little shrunk
    ratio = got.diagonal(dim1=1, dim2=2) / S.diagonal()
    assert ((ratio > 0.7) & (ratio < 1.6)).all(), ratio
