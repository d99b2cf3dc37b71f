"""Batched Hamiltonian Monte Carlo: many galaxies and several chains per galaxy at once.

Every chain of every galaxy is one row of a ``(M, d)`` state; the target's log density
is evaluated for all rows in one call (one batched decoder and physics-layer pass on a
GPU), and each chain has its own step size and mass matrix. Warm-up follows Stan's
scheme in a simplified form: dual-averaging step-size adaptation (Hoffman & Gelman 2014)
towards a target acceptance rate, a mass matrix estimated three times, each from the
draws of one window of the middle of warm-up made with the previous estimate
(regularised towards the identity), then a final step-size adaptation with that metric.
The metric is diagonal per chain, or with ``metric="dense"`` a full covariance from the
warm-up draws of all chains of a galaxy pooled (Stan's ``dense_e``): worth it where
parameters are strongly correlated, such as a Sersic profile's flux, radius and index,
whose narrow, tilted posterior a diagonal metric crosses in many small steps.

Two transitions: ``sampler="hmc"``, trajectories of a fixed number of leapfrog steps
with a step size jittered by +-10% per iteration and a Metropolis correction; and
``sampler="nuts"``, the No-U-Turn sampler (Hoffman & Gelman 2014) in the multinomial
form Stan uses (Betancourt 2017): each chain doubles its trajectory in a random
direction until the generalised U-turn criterion holds on the whole trajectory or on
any of the balanced sub-trees of the new half, or ``max_depth`` doublings, and draws
the next state from the trajectory with weights ``exp(-H)`` (biased towards the new
half). The sub-tree checks are done as the new half is integrated, from check-points
kept at the start of each sub-tree (the iterative form of NumPyro's NUTS), so that all
chains advance in lock-step, one batched gradient per leapfrog step: a chain whose
trajectory has ended waits, and a doubling lasts as long as the longest chain needs.
A transition whose energy error exceeds 1000 (or is not finite) is a divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import GalgenInputError

__all__ = ["HMCResult", "hmc_sample"]


@dataclass
class HMCResult:
    """Draws and sampler statistics of :func:`hmc_sample`.

    Parameters
    ----------
    samples : torch.Tensor
        ``(G, C, N, d)``: galaxies, chains, draws, parameters.
    log_prob : torch.Tensor
        ``(G, C, N)`` log density of each draw.
    accept_rate : torch.Tensor
        ``(G, C)`` mean acceptance probability after warm-up.
    divergences : torch.Tensor
        ``(G, C)`` divergent transitions after warm-up.
    step_size : torch.Tensor
        ``(G, C)`` adapted step sizes.
    inv_mass : torch.Tensor
        ``(G, C, d)`` adapted diagonal inverse mass matrices, or ``(G, C, d, d)`` dense
        ones (``metric="dense"``).
    n_steps : torch.Tensor
        ``(G, C)`` mean leapfrog steps per draw after warm-up (``n_leapfrog`` for HMC; the
        trajectory lengths NUTS chose).
    """

    samples: torch.Tensor
    log_prob: torch.Tensor
    accept_rate: torch.Tensor
    divergences: torch.Tensor
    step_size: torch.Tensor
    inv_mass: torch.Tensor
    n_steps: torch.Tensor


def _value_and_grad(log_prob_fn, x):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        lp = log_prob_fn(x)
        grad, = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), grad.detach()


class _DualAveraging:
    """Per-chain dual averaging of log step sizes (Hoffman & Gelman 2014, section 3.2)."""

    def __init__(self, eps0, target, gamma=0.05, t0=10.0, kappa=0.75):
        self.mu = torch.log(10 * eps0)
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.h = torch.zeros_like(eps0)
        self.log_eps_bar = torch.zeros_like(eps0)
        self.t = 0

    def update(self, accept):
        self.t += 1
        t = self.t
        self.h = (1 - 1 / (t + self.t0)) * self.h + (self.target - accept) / (t + self.t0)
        log_eps = self.mu - math.sqrt(t) / self.gamma * self.h
        w = t ** (-self.kappa)
        self.log_eps_bar = w * log_eps + (1 - w) * self.log_eps_bar
        return log_eps.exp()

    def final(self):
        return self.log_eps_bar.exp()


class _Metric:
    """The inverse mass matrix of every chain: diagonal ``(M, d)`` or dense ``(M, d, d)``."""

    def __init__(self, M, d, device, dtype):
        self.inv_mass = torch.ones(M, d, device=device, dtype=dtype)
        self.chol = None  # dense: inv_mass = chol @ chol.T

    def momentum(self, xi):
        """``p ~ N(0, inv_mass^-1)`` from standard normal ``xi``."""
        if self.chol is None:
            return xi / self.inv_mass.sqrt()
        return torch.linalg.solve_triangular(self.chol.transpose(1, 2), xi[:, :, None], upper=True)[:, :, 0]

    def velocity(self, p):
        if self.chol is None:
            return self.inv_mass * p
        return (self.inv_mass @ p[:, :, None])[:, :, 0]

    def kinetic(self, p):
        if self.chol is None:
            return 0.5 * (p**2 * self.inv_mass).sum(1)
        return 0.5 * ((self.chol.transpose(1, 2) @ p[:, :, None])[:, :, 0] ** 2).sum(1)

    def adapt(self, window, chains, dense):
        """Set from warm-up draws ``(n, M, d)``, regularised towards 1e-3 I as Stan does."""
        def shrink(estimate, n, identity):  # Stan's regularisation
            return (n / (n + 5)) * estimate + 1e-3 * (5 / (n + 5)) * identity

        n, M, d = window.shape
        if not dense:
            self.inv_mass = shrink(window.var(0), n, 1.0)
            return
        G = M // chains
        pooled = window.reshape(n, G, chains, d).permute(1, 2, 0, 3).reshape(G, chains * n, d)
        centred = pooled - pooled.mean(1, keepdim=True)
        m = chains * n
        eye = torch.eye(d, device=window.device, dtype=window.dtype)
        cov = shrink(centred.transpose(1, 2) @ centred / (m - 1), m, eye).repeat_interleave(chains, 0)
        chol, info = torch.linalg.cholesky_ex(cov)
        bad = info != 0
        if bool(bad.any()):  # fall back to the diagonal where the estimate is not positive definite
            diag = torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
            cov = torch.where(bad[:, None, None], diag, cov)
            chol = torch.linalg.cholesky(cov)
        self.inv_mass, self.chol = cov, chol


def _leapfrog(log_prob_fn, x, p, grad, e, metric):
    """One leapfrog step of size ``e`` ``(M, 1)`` (negative: backwards in time)."""
    p = p + 0.5 * e * grad
    x = x + e * metric.velocity(p)
    lp, grad = _value_and_grad(log_prob_fn, x)
    return x, p + 0.5 * e * grad, lp, grad


def _energy_error(lp, p, h0, metric):
    """``H - H0``, +inf where it is not finite."""
    dh = -lp + metric.kinetic(p) - h0
    return torch.where(torch.isfinite(dh), dh, torch.full_like(dh, math.inf))


def _hmc_transition(log_prob_fn, x, lp, grad, eps, metric, n_leapfrog, rand, randn):
    """A fixed-length trajectory with a jittered step size and a Metropolis correction."""
    M, d = x.shape
    e = (eps * (1 + 0.1 * (2 * rand(M) - 1)))[:, None]
    p = metric.momentum(randn(M, d))
    h0 = -lp + metric.kinetic(p)
    xn, pn, lpn, gn = x, p, lp, grad
    for _ in range(n_leapfrog):
        xn, pn, lpn, gn = _leapfrog(log_prob_fn, xn, pn, gn, e, metric)
    dh = _energy_error(lpn, pn, h0, metric)
    divergent = dh > 1000
    accept = torch.where(divergent, torch.zeros_like(dh), torch.exp(torch.clamp(-dh, max=0)))
    take = rand(M) < accept
    x = torch.where(take[:, None], xn, x)
    lp = torch.where(take, lpn, lp)
    grad = torch.where(take[:, None], gn, grad)
    return x, lp, grad, accept, divergent, torch.full_like(accept, n_leapfrog)


def _no_uturn(ps_a, ps_b, rho):
    """The generalised no-U-turn criterion (Betancourt 2017) between two ends of a trajectory."""
    return ((ps_a * rho).sum(1) > 0) & ((ps_b * rho).sum(1) > 0)


def _nuts_transition(log_prob_fn, x, lp, grad, eps, metric, max_depth, rand, randn):
    """One multinomial NUTS transition of every chain, in lock-step (see the module docstring).

    The U-turn criterion is checked, as in Stan (since 2.26), on every balanced sub-tree
    and on the two trajectories that overlap each merge of two sub-trees by one point, which
    stops the circling that the sub-tree checks alone miss on near-Gaussian targets.
    """
    M, d = x.shape
    p0 = metric.momentum(randn(M, d))
    h0 = -lp + metric.kinetic(p0)
    ends = [[x, p0, grad, metric.velocity(p0)] for _ in range(2)]  # backward, forward end: x, p, grad, p#
    rho = p0.clone()  # sum of the momenta over the trajectory
    log_w = torch.zeros_like(lp)  # log of the summed weights exp(h0 - H); the start has weight 1
    new = [x, lp, grad]
    running = torch.ones(M, dtype=torch.bool, device=x.device)
    divergent = torch.zeros_like(running)
    acc_sum, steps = torch.zeros_like(lp), torch.zeros_like(lp)
    for depth in range(max_depth):
        if not bool(running.any()):
            break
        fwd = rand(M) < 0.5
        e = torch.where(fwd, eps, -eps)[:, None]
        near = [torch.where(fwd[:, None], f, b) for f, b in zip(ends[1], ends[0])]  # where the new half starts
        far = [torch.where(fwd[:, None], b, f) for f, b in zip(ends[1], ends[0])]
        xs, ps, gs = near[0], near[1], near[2]
        building = running.clone()  # chains whose new half is still valid
        sub_log_w = torch.full_like(lp, -math.inf)
        sub = [xs, lp, gs]
        sub_rho = torch.zeros_like(ps)
        # check-points of the sub-trees of 2^k steps: at their first point p#, p and sub_rho
        # before it; at their last point p# and p
        first = [[None] * (depth + 1) for _ in range(3)]
        last = [[None] * (depth + 1) for _ in range(2)]
        for i in range(2 ** depth):
            if not bool(building.any()):
                break
            xn, pn, lpn, gn = _leapfrog(log_prob_fn, xs, ps, gs, e, metric)
            keep = building[:, None]  # chains that stopped stay where they are
            xs, ps, gs = torch.where(keep, xn, xs), torch.where(keep, pn, ps), torch.where(keep, gn, gs)
            dh = _energy_error(lpn, pn, h0, metric)
            div = building & (dh > 1000)
            acc_sum += torch.where(building, torch.exp(torch.clamp(-dh, max=0)), torch.zeros_like(dh))
            steps += building.to(steps.dtype)
            ps_sharp = metric.velocity(ps)
            for k in range(depth + 1):
                if i % 2 ** k == 0:
                    first[0][k], first[1][k], first[2][k] = ps_sharp, ps, sub_rho
            sub_rho = sub_rho + torch.where(keep, ps, torch.zeros_like(ps))
            # multinomial sampling within the new half: the i-th point with weight exp(-dh)
            grown = torch.logaddexp(sub_log_w, -dh)
            take = building & ~div & (rand(M) < torch.exp(-dh - grown))
            sub = [torch.where(take[:, None], xs, sub[0]), torch.where(take, lpn, sub[1]),
                   torch.where(take[:, None], gs, sub[2])]
            sub_log_w = torch.where(building, grown, sub_log_w)
            ok = torch.ones_like(building)
            for k in range(1, depth + 1):  # sub-trees of 2^k steps that end here: [a, m-1] + [m, i]
                if (i + 1) % 2 ** k == 0:
                    rho_a = first[2][k - 1] - first[2][k]
                    rho_b = sub_rho - first[2][k - 1]
                    ok &= _no_uturn(first[0][k], ps_sharp, rho_a + rho_b)
                    ok &= _no_uturn(first[0][k], first[0][k - 1], rho_a + first[1][k - 1])
                    ok &= _no_uturn(last[0][k - 1], ps_sharp, rho_b + last[1][k - 1])
            for k in range(depth + 1):
                if (i + 1) % 2 ** k == 0:
                    last[0][k], last[1][k] = ps_sharp, ps
            divergent |= div
            building = building & ~div & ok
        # merge the valid new halves: the biased progressive sample, then the U-turns of the
        # whole trajectory and of the two overlapping the junction
        merge = running & building
        take = merge & (rand(M) < torch.exp(sub_log_w - log_w))
        new = [torch.where(take[:, None], sub[0], new[0]), torch.where(take, sub[1], new[1]),
               torch.where(take[:, None], sub[2], new[2])]
        log_w = torch.where(merge, torch.logaddexp(log_w, sub_log_w), log_w)
        ok = (_no_uturn(far[3], first[0][depth], rho + first[1][depth])
              & _no_uturn(near[3], ps_sharp, sub_rho + near[1]))
        rho = torch.where(merge[:, None], rho + sub_rho, rho)
        for side, sel in ((1, merge & fwd), (0, merge & ~fwd)):
            ends[side] = [torch.where(sel[:, None], v, old) for v, old in zip((xs, ps, gs, ps_sharp), ends[side])]
        running = merge & ok & _no_uturn(ends[0][3], ends[1][3], rho)
    accept = acc_sum / steps.clamp(min=1)
    return new[0], new[1], new[2], accept, divergent, steps


def hmc_sample(log_prob_fn, init: torch.Tensor, *, n_samples: int = 500, n_warmup: int = 500,
               n_leapfrog: int = 16, step_size: float = 0.1, target_accept: float = 0.8,
               adapt_mass: bool = True, metric: str = "diag", sampler: str = "hmc", max_depth: int = 8,
               generator: torch.Generator | None = None) -> HMCResult:
    """Sample many independent targets with HMC or NUTS, all chains in one batch.

    Parameters
    ----------
    log_prob_fn : callable
        ``(M, d) -> (M,)`` log density (up to a constant) of each row; rows are
        independent (row ``i`` may belong to any galaxy and chain). Must be
        differentiable.
    init : torch.Tensor
        ``(G, C, d)`` initial states of ``C`` chains for each of ``G`` galaxies.
    n_samples : int, optional
        Draws kept per chain.
    n_warmup : int, optional
        Adaptation iterations (discarded).
    n_leapfrog : int, optional
        Leapfrog steps per trajectory (``sampler="hmc"``).
    step_size : float, optional
        Initial step size.
    target_accept : float, optional
        Target mean acceptance probability of the step-size adaptation (for NUTS, the
        mean over the trajectory's points, as in Stan).
    adapt_mass : bool, optional
        Estimate the mass matrix during warm-up.
    metric : {"diag", "dense"}, optional
        A diagonal inverse mass matrix per chain (the variances of its warm-up draws),
        or a dense one per galaxy (the covariance of the warm-up draws of its chains).
    sampler : {"hmc", "nuts"}, optional
        Fixed-length trajectories, or the No-U-Turn sampler.
    max_depth : int, optional
        NUTS: at most ``2**max_depth - 1`` leapfrog steps per draw.
    generator : torch.Generator, optional
        Randomness (momenta, acceptance, jitter, NUTS directions).

    Returns
    -------
    HMCResult

    Examples
    --------
    >>> target = lambda x: -0.5 * (x**2).sum(1)
    >>> res = hmc_sample(target, torch.zeros(3, 2, 1), n_samples=200, n_warmup=100,
    ...                  generator=torch.Generator().manual_seed(0))
    >>> res.samples.shape
    torch.Size([3, 2, 200, 1])
    >>> res = hmc_sample(target, torch.zeros(3, 2, 1), n_samples=200, n_warmup=100, sampler="nuts",
    ...                  generator=torch.Generator().manual_seed(0))
    >>> float(res.n_steps.max()) <= 2**8 - 1
    True
    """
    if init.ndim != 3:
        raise GalgenInputError(f"init: expected (galaxies, chains, d), got {tuple(init.shape)}")
    if n_samples < 1 or n_warmup < 0 or n_leapfrog < 1 or not 0 < target_accept < 1:
        raise GalgenInputError("hmc: n_samples, n_leapfrog >= 1, n_warmup >= 0, 0 < target_accept < 1")
    if metric not in ("diag", "dense"):
        raise GalgenInputError(f"metric: 'diag' or 'dense', got {metric!r}")
    if sampler not in ("hmc", "nuts"):
        raise GalgenInputError(f"sampler: 'hmc' or 'nuts', got {sampler!r}")
    if not 1 <= int(max_depth) <= 15:
        raise GalgenInputError(f"max_depth: between 1 and 15 tree doublings, got {max_depth!r}")
    G, C, d = init.shape
    M = G * C
    dev, dt = init.device, init.dtype
    x = init.reshape(M, d).clone()
    lp, grad = _value_and_grad(log_prob_fn, x)
    if not bool(torch.isfinite(lp).all()):
        raise GalgenInputError("init: the log density is not finite at some initial states")
    eps = torch.full((M,), float(step_size), device=dev, dtype=dt)
    metric_ = _Metric(M, d, dev, dt)
    da = _DualAveraging(eps, target_accept)
    # warm-up: step size only (15%), then metric windows of 15%, 25% and 35% of the warm-up, each
    # estimating the metric afresh from its own draws (made with the previous window's metric,
    # so a chain crossing a tilted or stretched posterior gets faster window by window, as in
    # Stan's expanding windows), then step size only (10%)
    ends = [int(f * n_warmup) for f in (0.30, 0.55, 0.90)] if adapt_mass else []
    w1 = int(0.15 * n_warmup)
    w2 = ends[-1] if ends else w1
    window = []

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=dev, dtype=dt)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev, dtype=dt)

    if sampler == "nuts":
        def transition(x, lp, grad, eps):
            return _nuts_transition(log_prob_fn, x, lp, grad, eps, metric_, int(max_depth), rand, randn)
    else:
        def transition(x, lp, grad, eps):
            return _hmc_transition(log_prob_fn, x, lp, grad, eps, metric_, n_leapfrog, rand, randn)

    draws = torch.empty(n_samples, M, d, device=dev, dtype=dt)
    draw_lp = torch.empty(n_samples, M, device=dev, dtype=dt)
    acc_sum = torch.zeros(M, device=dev, dtype=dt)
    div_sum = torch.zeros(M, device=dev, dtype=dt)
    step_sum = torch.zeros(M, device=dev, dtype=dt)
    for it in range(n_warmup + n_samples):
        x, lp, grad, accept, divergent, steps = transition(x, lp, grad, eps)
        if it < n_warmup:
            eps = da.update(accept)
            if w1 <= it < w2:
                window.append(x.clone())
            if it + 1 in ends:
                if len(window) > 10:
                    metric_.adapt(torch.stack(window), C, dense=metric == "dense")
                    da = _DualAveraging(eps, target_accept)
                window = []
            if it == n_warmup - 1:
                eps = da.final()
        else:
            k = it - n_warmup
            draws[k], draw_lp[k] = x, lp
            acc_sum += accept
            div_sum += divergent.to(dt)
            step_sum += steps
    return HMCResult(samples=draws.permute(1, 0, 2).reshape(G, C, n_samples, d),
                     log_prob=draw_lp.T.reshape(G, C, n_samples),
                     accept_rate=(acc_sum / n_samples).reshape(G, C),
                     divergences=div_sum.reshape(G, C), step_size=eps.reshape(G, C),
                     inv_mass=metric_.inv_mass.reshape(G, C, *metric_.inv_mass.shape[1:]),
                     n_steps=(step_sum / n_samples).reshape(G, C))
