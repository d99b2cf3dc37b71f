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

Two samplers: ``sampler="hmc"``, trajectories of a fixed number of leapfrog steps with
a step size jittered by +-10% per iteration and a Metropolis correction, all chains in
lock-step; and ``sampler="nuts"``, the No-U-Turn sampler (Hoffman & Gelman 2014) in the
multinomial form Stan uses (Betancourt 2017): each chain doubles its trajectory in a
random direction until the generalised U-turn criterion fails on the whole trajectory,
on any balanced sub-tree of the new half or across the junction of two merged sub-trees
(Stan's checks since 2.26), or ``max_depth`` doublings are done, and draws its next
state from the trajectory with weights ``exp(-H)`` (biased towards the new half).
NUTS trajectories differ in length from chain to chain and draw to draw, so NUTS
chains do not wait for each other: every batched gradient is one leapfrog step of
every chain, whatever point of its own transition the chain is at (the sub-tree checks
are made from check-points kept at the start and end of each sub-tree as the new half
is integrated, the iterative form of NumPyro's NUTS), and a chain that has drawn its
next state starts its next trajectory at the following step. Chains wait for each
other only where the warm-up estimates the metric and at the end.
A transition whose energy error exceeds 1000 (or is not finite) is a divergence.
"""

from __future__ import annotations

import inspect
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


def _value_and_grad(log_prob_fn, x, rows=None):
    """Log density and gradient of every row of ``x``, or of ``rows`` only (the others 0)."""
    xr = (x if rows is None else x[rows]).detach().requires_grad_(True)
    with torch.enable_grad():
        lp = log_prob_fn(xr) if rows is None else log_prob_fn(xr, rows=rows)
        grad, = torch.autograd.grad(lp.sum(), xr)
    if rows is None:
        return lp.detach(), grad.detach()
    return (torch.zeros(len(x), dtype=x.dtype, device=x.device).index_copy(0, rows, lp.detach().to(x.dtype)),
            torch.zeros_like(x).index_copy(0, rows, grad.detach()))


def _takes_rows(log_prob_fn):
    """Whether ``log_prob_fn`` evaluates a subset of the rows (a ``rows`` keyword)."""
    try:
        return "rows" in inspect.signature(log_prob_fn).parameters
    except (TypeError, ValueError):
        return False


class _DualAveraging:
    """Per-chain dual averaging of log step sizes (Hoffman & Gelman 2014, section 3.2).

    Each chain has its own iteration count, so that chains may finish their transitions
    at different times (NUTS): :meth:`update` advances only the chains of ``mask``.
    """

    def __init__(self, eps0, target, gamma=0.05, t0=10.0, kappa=0.75):
        self.mu = torch.log(10 * eps0)
        self.target, self.gamma, self.t0, self.kappa = target, gamma, t0, kappa
        self.h = torch.zeros_like(eps0)
        self.log_eps_bar = torch.zeros_like(eps0)
        self.t = torch.zeros_like(eps0)

    def update(self, accept, mask=None):
        """The next step sizes (of the chains of ``mask``; others' entries are meaningless)."""
        t = self.t + (1.0 if mask is None else mask.to(self.t.dtype))
        h = (1 - 1 / (t + self.t0)) * self.h + (self.target - accept) / (t + self.t0)
        log_eps = self.mu - t.sqrt() / self.gamma * h
        w = t.clamp(min=1) ** (-self.kappa)
        bar = w * log_eps + (1 - w) * self.log_eps_bar
        if mask is None:
            self.t, self.h, self.log_eps_bar = t, h, bar
        else:
            self.t, self.h = t, torch.where(mask, h, self.h)
            self.log_eps_bar = torch.where(mask, bar, self.log_eps_bar)
        return log_eps.exp()

    def final(self):
        return self.log_eps_bar.exp()


class _Metric:
    """The inverse mass matrix of every chain: diagonal ``(M, d)`` or dense ``(M, d, d)``."""

    def __init__(self, M, d, device, dtype, init=None, dense=False):
        self.inv_mass = torch.ones(M, d, device=device, dtype=dtype)
        self.chol = None  # dense: inv_mass = chol @ chol.T
        self.anchor = None  # an initial metric: the warm-up estimates are regularised towards it
        if init is not None:
            init = init.to(device=device, dtype=dtype)
            if dense and init.ndim == 2:
                init = torch.diag_embed(init)
            elif not dense and init.ndim == 3:
                init = torch.diagonal(init, dim1=1, dim2=2)
            if dense:
                init, self.chol = _cholesky_or_diagonal(init)
            self.anchor = init
            self.inv_mass = init

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
        """Set from warm-up draws ``(n, M, d)``, regularised towards 1e-3 I as Stan does, or
        towards the initial metric (as ``d + 1`` pseudo-draws, a conjugate update) where one was given."""
        def shrink(estimate, n, identity):
            if self.anchor is None:  # Stan's regularisation
                return (n / (n + 5)) * estimate + 1e-3 * (5 / (n + 5)) * identity
            n0 = d + 1
            anchor = self.anchor if not dense else self.anchor[::chains]
            return (n * estimate + n0 * anchor) / (n + n0)

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
        self.inv_mass, self.chol = _cholesky_or_diagonal(cov)


def _cholesky_or_diagonal(cov):
    """``(cov, chol)``, the diagonal of ``cov`` taken where it is not positive definite (in its dtype)."""
    chol, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bool(bad.any()):
        diag = torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
        cov = torch.where(bad[:, None, None], diag, cov)
        chol = torch.linalg.cholesky(cov)
    return cov, chol


def _leapfrog(log_prob_fn, x, p, grad, e, metric, rows=None):
    """One leapfrog step of size ``e`` ``(M, 1)`` (negative: backwards in time); with ``rows``,
    the log density and gradient only of those rows (the others' results are meaningless)."""
    p = p + 0.5 * e * grad
    x = x + e * metric.velocity(p)
    lp, grad = _value_and_grad(log_prob_fn, x, rows)
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
    return x, lp, grad, accept, divergent


def _no_uturn(ps_a, ps_b, rho):
    """The generalised no-U-turn criterion (Betancourt 2017) between two ends of a trajectory."""
    return ((ps_a * rho).sum(-1) > 0) & ((ps_b * rho).sum(-1) > 0)


def _where(mask, a, b):
    """``torch.where`` with a ``(M,)`` mask over the rows of ``(M, ...)`` tensors."""
    return torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b)


class _Nuts:
    """Multinomial NUTS for ``M`` chains that each run their own transitions (module docstring).

    Every call of :meth:`step` is one leapfrog step, one batched gradient, for every chain
    that is not waiting; a chain whose trajectory ends draws its next state and starts the
    next trajectory at once, so that no gradient is spent waiting for the longest
    trajectory of the batch. Chains wait only at the barriers where the warm-up estimates
    the metric (all chains' windows then hold the same number of draws) and at the end.
    """

    def __init__(self, log_prob_fn, x, lp, grad, eps, metric, max_depth, rand, randn):
        self.f, self.metric, self.max_depth, self.rand, self.randn = log_prob_fn, metric, max_depth, rand, randn
        self.by_rows = _takes_rows(log_prob_fn)  # evaluate only the active chains' rows
        self.x, self.lp, self.grad, self.eps = x, lp, grad, eps
        M, d = x.shape
        self.M = M
        self.levels = torch.arange(max_depth + 1, device=x.device)[:, None]  # (L, 1)
        zero = torch.zeros(max_depth + 1, M, d, device=x.device, dtype=x.dtype)
        # check-points of the balanced sub-trees of 2^k steps, per level k: p#, p and the
        # new half's momentum sum before their first point; p# and p at their last point
        self.first_ps, self.first_p, self.first_rho = zero.clone(), zero.clone(), zero.clone()
        self.last_ps, self.last_p = zero.clone(), zero.clone()
        # per-chain trajectory state, set for every chain by start_trajectory below
        none = torch.zeros(M, dtype=torch.bool, device=x.device)
        self.h0, self.log_w, self.acc, self.nst = (torch.zeros_like(lp) for _ in range(4))
        self.rho, self.sub_rho = torch.zeros_like(x), torch.zeros_like(x)
        self.ends = [[x, x, grad, x], [x, x, grad, x]]  # backward, forward end: x, p, grad, p#
        self.new, self.sub = [x, lp, grad], [x, lp, grad]
        self.xs, self.ps, self.gs = x, torch.zeros_like(x), grad
        self.running, self.divergent, self.fwd, self.building = none, none, none, none
        self.depth = torch.zeros(M, dtype=torch.long, device=x.device)
        self.i = self.depth.clone()
        self.sub_log_w = torch.full_like(lp, -math.inf)
        self.active = ~none
        self.finished = none  # chains that ended a transition at the last step
        self.start_trajectory(self.active)

    def start_trajectory(self, mask):
        """A new trajectory from the current state for the chains of ``mask``."""
        m = self.metric
        p0 = m.momentum(self.randn(self.M, self.x.shape[1]))
        h0 = -self.lp + m.kinetic(p0)
        end = [self.x, p0, self.grad, m.velocity(p0)]
        self.h0 = torch.where(mask, h0, self.h0)
        self.ends = [[_where(mask, v, old) for v, old in zip(end, side)] for side in self.ends]
        self.rho = _where(mask, p0, self.rho)
        self.log_w = torch.where(mask, torch.zeros_like(h0), self.log_w)
        self.new = [_where(mask, v, old) for v, old in zip((self.x, self.lp, self.grad), self.new)]
        self.running = self.running | mask
        self.divergent = self.divergent & ~mask
        self.acc = torch.where(mask, torch.zeros_like(h0), self.acc)
        self.nst = torch.where(mask, torch.zeros_like(h0), self.nst)
        self.depth = torch.where(mask, torch.zeros_like(self.depth), self.depth)
        self.start_subtree(mask)

    def _end(self, forward):
        """Each chain's forward end of the trajectory where ``forward``, else its backward end."""
        return [_where(forward, f, b) for f, b in zip(self.ends[1], self.ends[0])]

    def start_subtree(self, mask):
        """The new half of the trajectory of the chains of ``mask``, doubling it at their depth."""
        self.fwd = torch.where(mask, self.rand(self.M) < 0.5, self.fwd)
        near = self._end(self.fwd)
        self.xs, self.ps, self.gs = (_where(mask, v, old) for v, old in zip(near[:3], (self.xs, self.ps, self.gs)))
        self.building = self.building | mask
        self.i = torch.where(mask, torch.zeros_like(self.i), self.i)
        self.sub_log_w = torch.where(mask, torch.full_like(self.sub_log_w, -math.inf), self.sub_log_w)
        self.sub_rho = _where(mask, torch.zeros_like(self.sub_rho), self.sub_rho)

    def step(self):
        """One leapfrog step of every active chain; sets :attr:`finished`, returns nothing."""
        m, act = self.metric, self.active
        e = torch.where(self.fwd, self.eps, -self.eps)[:, None]
        rows = act.nonzero()[:, 0] if self.by_rows and not bool(act.all()) else None
        xn, pn, lpn, gn = _leapfrog(self.f, self.xs, self.ps, self.gs, e, m, rows)
        self.xs, self.ps, self.gs = _where(act, xn, self.xs), _where(act, pn, self.ps), _where(act, gn, self.gs)
        dh = _energy_error(lpn, pn, self.h0, m)
        div = act & (dh > 1000)
        self.acc = self.acc + torch.where(act, torch.exp(torch.clamp(-dh, max=0)), torch.zeros_like(dh))
        self.nst = self.nst + act.to(dh.dtype)
        ps_sharp = m.velocity(self.ps)
        size = 2 ** self.levels  # (L, 1)
        at_level = act & (self.levels <= self.depth)  # (L, M)
        begins = (at_level & (self.i % size == 0))[..., None]
        self.first_ps = torch.where(begins, ps_sharp, self.first_ps)
        self.first_p = torch.where(begins, self.ps, self.first_p)
        self.first_rho = torch.where(begins, self.sub_rho, self.first_rho)
        self.sub_rho = self.sub_rho + _where(act, self.ps, torch.zeros_like(self.ps))
        # multinomial sampling within the new half: this point with weight exp(-dh)
        grown = torch.logaddexp(self.sub_log_w, -dh)
        take = act & ~div & (self.rand(self.M) < torch.exp(-dh - grown))
        self.sub = [_where(take, v, old) for v, old in zip((self.xs, lpn, self.gs), self.sub)]
        self.sub_log_w = torch.where(act, grown, self.sub_log_w)
        # the sub-trees of 2^k steps (k >= 1) that end here, [a, m-1] + [m, i], and the two
        # trajectories that overlap their junction by one point
        ends_here = at_level & ((self.i + 1) % size == 0)
        rho_a = self.first_rho[:-1] - self.first_rho[1:]
        rho_b = self.sub_rho - self.first_rho[:-1]
        ok = (_no_uturn(self.first_ps[1:], ps_sharp, rho_a + rho_b)
              & _no_uturn(self.first_ps[1:], self.first_ps[:-1], rho_a + self.first_p[:-1])
              & _no_uturn(self.last_ps[:-1], ps_sharp, rho_b + self.last_p[:-1]))
        ok = (ok | ~ends_here[1:]).all(0)
        self.last_ps = torch.where(ends_here[..., None], ps_sharp, self.last_ps)
        self.last_p = torch.where(ends_here[..., None], self.ps, self.last_p)
        self.divergent = self.divergent | div
        self.building = self.building & ~(act & (div | ~ok))
        self.i = self.i + act.long()
        end = act & (~self.building | (self.i == 2 ** self.depth))
        self.finished = torch.zeros_like(act)
        if bool(end.any()):
            self._end_subtree(end, ps_sharp)

    def _end_subtree(self, end, ps_sharp):
        """Merge the valid new halves of ``end``: the biased progressive sample, then U-turns."""
        merge = end & self.building
        take = merge & (self.rand(self.M) < torch.exp(self.sub_log_w - self.log_w))
        self.new = [_where(take, v, old) for v, old in zip(self.sub, self.new)]
        self.log_w = torch.where(merge, torch.logaddexp(self.log_w, self.sub_log_w), self.log_w)
        near, far_ps = self._end(self.fwd), self._end(~self.fwd)[3]
        rows = torch.arange(self.M, device=end.device)
        first_ps, first_p = self.first_ps[self.depth, rows], self.first_p[self.depth, rows]
        ok = (_no_uturn(far_ps, first_ps, self.rho + first_p)
              & _no_uturn(near[3], ps_sharp, self.sub_rho + near[1]))
        self.rho = _where(merge, self.rho + self.sub_rho, self.rho)
        for side, sel in ((1, merge & self.fwd), (0, merge & ~self.fwd)):
            self.ends[side] = [_where(sel, v, old)
                               for v, old in zip((self.xs, self.ps, self.gs, ps_sharp), self.ends[side])]
        turned = ~_no_uturn(self.ends[0][3], self.ends[1][3], self.rho)
        self.running = torch.where(end, merge & ok & ~turned, self.running)
        self.building = self.building & ~end
        grow = end & self.running & (self.depth + 1 < self.max_depth)
        self.depth = self.depth + grow.long()
        self.start_subtree(grow)
        self.finished = end & ~grow
        self.running = self.running & ~self.finished
        self.x, self.lp, self.grad = (_where(self.finished, v, old) for v, old in zip(self.new, (self.x, self.lp,
                                                                                                 self.grad)))
        self.xs, self.gs = _where(self.finished, self.x, self.xs), _where(self.finished, self.grad, self.gs)


def _run_nuts(log_prob_fn, x, lp, grad, eps, metric, *, chains, n_warmup, n_samples, max_depth, target_accept,
              w1, ends, dense, rand, randn):
    """NUTS chains, each running its own transitions, with the warm-up of :func:`hmc_sample`."""
    M, d = x.shape
    dev, dt = x.device, x.dtype
    total = n_warmup + n_samples
    da = _DualAveraging(eps, target_accept)
    # metric windows: iterations w1 .. ends[0] - 1, ends[0] .. ends[1] - 1, ...; every chain waits at
    # each end, so that all are in the same window, which starts at win_start
    w2, win_start = (ends[-1] if ends else w1), w1
    window = torch.empty(max([b - a for a, b in zip([w1] + ends[:-1], ends)] + [1]), M, d, device=dev, dtype=dt)
    barriers = torch.tensor(sorted(set(ends)) or [-1], device=dev)
    it = torch.zeros(M, dtype=torch.long, device=dev)
    waiting = torch.zeros(M, dtype=torch.bool, device=dev)
    draws = torch.empty(n_samples, M, d, device=dev, dtype=dt)
    draw_lp = torch.empty(n_samples, M, device=dev, dtype=dt)
    acc_sum, div_sum, step_sum = (torch.zeros(M, device=dev, dtype=dt) for _ in range(3))
    nuts = _Nuts(log_prob_fn, x, lp, grad, eps, metric, max_depth, rand, randn)
    while bool((it < total).any()):
        if not bool(nuts.active.any()):  # every chain at a metric barrier: adapt, go on
            end = int(it.max())
            if end - win_start > 10:
                metric.adapt(window[:end - win_start], chains, dense=dense)
                da = _DualAveraging(nuts.eps, target_accept)
            win_start = end
            go = it < total
            waiting = torch.zeros_like(waiting)
            nuts.active = go
            nuts.start_trajectory(go)
            continue
        nuts.step()
        fin = nuts.finished
        if not bool(fin.any()):
            continue
        accept = nuts.acc / nuts.nst.clamp(min=1)
        warm, samp = fin & (it < n_warmup), fin & (it >= n_warmup)
        rows = samp.nonzero()[:, 0]
        if len(rows):
            k = it[rows] - n_warmup
            draws[k, rows], draw_lp[k, rows] = nuts.x[rows], nuts.lp[rows]
            acc_sum[rows] += accept[rows]
            div_sum[rows] += nuts.divergent[rows].to(dt)
            step_sum[rows] += nuts.nst[rows]
        if bool(warm.any()):
            nuts.eps = torch.where(warm, da.update(accept, warm), nuts.eps)
            rows = (warm & (it >= w1) & (it < w2)).nonzero()[:, 0]
            window[it[rows] - win_start, rows] = nuts.x[rows]
            nuts.eps = torch.where(warm & (it == n_warmup - 1), da.final(), nuts.eps)
        it = it + fin.long()
        waiting = waiting | (fin & torch.isin(it, barriers))
        nuts.active = (it < total) & ~waiting
        nuts.start_trajectory(fin & nuts.active)
    return draws, draw_lp, acc_sum, div_sum, step_sum, nuts.eps


def hmc_sample(log_prob_fn, init: torch.Tensor, *, n_samples: int = 500, n_warmup: int = 500,
               n_leapfrog: int = 16, step_size: float = 0.1, target_accept: float = 0.8,
               adapt_mass: bool = True, metric: str = "diag", sampler: str = "hmc", max_depth: int = 8,
               inv_mass: torch.Tensor | None = None, generator: torch.Generator | None = None) -> HMCResult:
    """Sample many independent targets with HMC or NUTS, all chains in one batch.

    Parameters
    ----------
    log_prob_fn : callable
        ``(M, d) -> (M,)`` log density (up to a constant) of each row; rows are
        independent (row ``i`` may belong to any galaxy and chain). Must be
        differentiable. If it takes a keyword ``rows``, ``log_prob_fn(x[rows], rows=rows)``
        must give the log density of those rows alone: NUTS then evaluates only the
        chains still moving, not those waiting for the others (at a metric estimate or
        at the end), which saves most of the time where trajectory lengths differ
        widely and the cost grows with the batch (a CPU);
        :func:`~galgen.inference.posterior_log_prob` does.
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
    inv_mass : torch.Tensor, optional
        ``(G, d)`` or ``(G, d, d)`` initial inverse mass matrix of each galaxy (its chains
        share it), e.g. the covariance of a Laplace approximation; its diagonal for
        ``metric="diag"``. Must be positive definite. The warm-up windows refine it,
        each estimate regularised towards it (as ``d + 1`` pseudo-draws) rather than
        towards ``1e-3 I``, so that a short warm-up with few chains keeps what it knows.
        Default: the identity.
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
    if inv_mass is not None:
        if inv_mass.shape not in ((G, d), (G, d, d)):
            raise GalgenInputError(f"inv_mass: expected ({G}, {d}) or ({G}, {d}, {d}), got {tuple(inv_mass.shape)}")
        ok = (inv_mass > 0).all(-1) if inv_mass.ndim == 2 else torch.linalg.cholesky_ex(inv_mass.double())[1] == 0
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).flatten().tolist()
            raise GalgenInputError(f"inv_mass: not positive definite for galaxies {bad}")
        inv_mass = inv_mass.repeat_interleave(C, 0)
    metric_ = _Metric(M, d, dev, dt, init=inv_mass, dense=metric == "dense")
    da = _DualAveraging(eps, target_accept)  # (HMC; NUTS chains keep their own iteration counts)
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
        draws, draw_lp, acc_sum, div_sum, step_sum, eps = _run_nuts(
            log_prob_fn, x, lp, grad, eps, metric_, chains=C, n_warmup=n_warmup, n_samples=n_samples,
            max_depth=int(max_depth), target_accept=target_accept, w1=w1, ends=ends, dense=metric == "dense",
            rand=rand, randn=randn)
    else:
        draws = torch.empty(n_samples, M, d, device=dev, dtype=dt)
        draw_lp = torch.empty(n_samples, M, device=dev, dtype=dt)
        acc_sum, div_sum = torch.zeros(M, device=dev, dtype=dt), torch.zeros(M, device=dev, dtype=dt)
        step_sum = torch.full((M,), float(n_leapfrog * n_samples), device=dev, dtype=dt)
        for it in range(n_warmup + n_samples):
            x, lp, grad, accept, divergent = _hmc_transition(log_prob_fn, x, lp, grad, eps, metric_, n_leapfrog,
                                                             rand, randn)
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
    return HMCResult(samples=draws.permute(1, 0, 2).reshape(G, C, n_samples, d),
                     log_prob=draw_lp.T.reshape(G, C, n_samples),
                     accept_rate=(acc_sum / n_samples).reshape(G, C),
                     divergences=div_sum.reshape(G, C), step_size=eps.reshape(G, C),
                     inv_mass=metric_.inv_mass.reshape(G, C, *metric_.inv_mass.shape[1:]),
                     n_steps=(step_sum / n_samples).reshape(G, C))
