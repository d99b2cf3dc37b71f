"""Batched Levenberg-Marquardt MAP fits: second-order steps, per-galaxy damping, shrinking batches.

The log posterior of a galaxy with latent code ``z`` and log flux scale ``s`` is

    L(z, s) = log p(data | m) + log p(z),    m = e^s * O(decode(z)),

with ``O`` the observation (PSF, pixels, crop). Each step solves

    (H + lambda * diag(H)) delta = grad L,    H = J_w^T J_w + C(z),

where ``J_w`` are the model's derivatives in noise units (the Gauss-Newton, or Fisher,
matrix of the likelihood; exact for Gaussian noise of fixed variance, the expected
Hessian otherwise), ``C`` the prior's curvature (minus its exact Hessian; for a
normalizing-flow prior, whose exact Hessian is indefinite, its positive semi-definite
``upper`` curvature, see :func:`prior_curvature`) and the gradient is exact. The Jacobian of the model image comes from
forward-mode autodiff, one pass per latent dimension for every galaxy at once (the
galaxies are independent, so one tangent per dimension serves the whole batch), or, for
models whose :attr:`~galgen.models.LatentModel.jacobian` is ``"central"`` (deep
decoders, where forward mode costs ~4 decodes per tangent on a CPU), from central
differences (2 decodes per dimension, the gradient then by one backward pass); the flux
column is the model image itself. Every galaxy has its own damping ``lambda`` (Nielsen's
rule), its own accept/reject decision on the exact log posterior, and leaves the batch
when it has converged, so that later iterations compute only the galaxies still moving.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["levenberg_marquardt", "gauss_newton", "rows_prior", "prior_curvature", "flow_base_precision"]


def rows_prior(model, cond, prior=None):
    """``prior_of(rows)``: the latent prior of some rows of a batch (one shared prior without conditions).

    Parameters
    ----------
    model : galgen.models.LatentModel
    cond : torch.Tensor or None
        ``(N, C)`` conditions of the whole batch.
    prior : torch.distributions.Distribution, optional
        ``model.prior(cond)`` where the caller has it already.

    Returns
    -------
    callable
    """
    if cond is None:
        shared = model.prior(None) if prior is None else prior
        return lambda rows: shared
    return lambda rows: model.prior(cond[rows])


def _model_images(model, obs, z, s, cond):
    """Noise-free detector images ``e^s O(decode(z))`` of rows (no gradients)."""
    return obs.noiseless(model.decode(z, cond).float()) * s.exp()[:, None, None]


#: Step of the central differences in latent units (relative error of the Jacobian ~1e-4 for sdss-vae).
CENTRAL_STEP = 1e-2


def _jacobian_method(model):
    """How the model image's Jacobian is computed: the model's ``jacobian`` (``"forward"`` for bare modules)."""
    from ..models.base import LatentModel

    return model.jacobian if isinstance(model, LatentModel) else "forward"


def _central_jacobian(model, obs, z, cond, h=CENTRAL_STEP, max_rows=256):
    """Derivatives ``(d, n, S, S)`` of ``O(decode(z))`` by central differences of step ``h``.

    The ``2 d`` shifted codes of every row are decoded in batches of ``max_rows``.
    """
    n, d = z.shape
    shift = h * torch.eye(d, dtype=z.dtype, device=z.device)
    pts = torch.cat([z[None] + shift[:, None], z[None] - shift[:, None]]).reshape(2 * d * n, d)
    rows = torch.arange(n, device=z.device).repeat(2 * d)
    out = []
    for a in range(0, len(pts), max_rows):
        r = rows[a:a + max_rows]
        c = None if cond is None else cond[r]
        out.append(obs.select(r).noiseless(model.decode(pts[a:a + max_rows], c).float()))
    out = torch.cat(out).view(2, d, n, *out[0].shape[1:])
    return (out[0] - out[1]) / (2 * h)


def _jacobian(model, obs, z, cond, max_rows=384):
    """``O(decode(z))`` and its derivatives ``(d, n, S, S)`` in each latent dimension (forward mode).

    The tangents are batched with :func:`torch.func.vmap` (the primal is computed once),
    ``max_rows // n`` tangents at a time; a model whose operations ``vmap`` does not
    support is differentiated one tangent after another.
    """
    n, d = z.shape

    def f(x):
        return obs.noiseless(model.decode(x, cond).float())

    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    step = max(1, max_rows // max(n, 1))
    try:
        primal, cols = None, []
        for a in range(0, d, step):
            tangents = eye[a:a + step, None, :].expand(-1, n, d)
            p, t = torch.func.vmap(lambda v: torch.func.jvp(f, (z,), (v,)), out_dims=(None, 0))(tangents)
            primal = p if primal is None else primal
            cols.append(t)
        return primal, torch.cat(cols)
    except RuntimeError:  # an operation without a batching rule: one forward-mode pass per tangent
        pass
    cols, primal = [], None
    with fwAD.dual_level():
        for j in range(d):
            out = fwAD.unpack_dual(f(fwAD.make_dual(z, eye[j].expand(n, d))))
            primal = out.primal if primal is None else primal
            cols.append(out.tangent if out.tangent is not None else torch.zeros_like(out.primal))
    return primal, torch.stack(cols)


def _prior_terms(prior, z, need_hessian=True):
    """``log p(z)``, its gradient and Hessian, per row (exact, by double backward)."""
    n, d = z.shape
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        lp = prior.log_prob(zz)
        if not lp.requires_grad:  # a flat prior: no gradient, no curvature
            zeros = torch.zeros(n, d, dtype=z.dtype, device=z.device)
            return lp.detach(), zeros, torch.zeros(n, d, d, dtype=z.dtype, device=z.device)
        (g,) = torch.autograd.grad(lp.sum(), zz, create_graph=need_hessian)
        hess = torch.zeros(n, d, d, dtype=z.dtype, device=z.device)
        if need_hessian and g.requires_grad:
            for j in range(d):
                (row,) = torch.autograd.grad(g[:, j].sum(), zz, retain_graph=j < d - 1, allow_unused=True)
                if row is not None:
                    hess[:, j] = row
    return lp.detach(), g.detach(), hess.detach()


def flow_base_precision(prior):
    """``1 / sigma^2`` of a normalizing-flow prior's diagonal normal base, or None for any other prior.

    Parameters
    ----------
    prior : torch.distributions.Distribution

    Returns
    -------
    torch.Tensor or None
        The base's precision per coordinate (broadcastable to the latent dimension).
    """
    from torch.distributions import Independent, Normal
    from zuko.distributions import NormalizingFlow

    base = prior.base if isinstance(prior, NormalizingFlow) else None
    if isinstance(base, Independent) and isinstance(base.base_dist, Normal):
        return base.base_dist.scale ** -2
    return None


def prior_curvature(prior, z, exact: bool = False, upper: bool = False):
    """Positive semi-definite curvature of ``-log p(z)`` per row, for Laplace approximations.

    A normalizing flow's log density is not concave: its exact Hessian has negative
    eigenvalues (down to -80 at posterior modes of ``sdss-vae``), and a Laplace
    covariance built on it is floored to enormous widths in those directions. For a flow
    ``u = T(z)`` onto a diagonal normal base ``N(mu, sigma^2)`` this returns its
    Gauss-Newton matrix ``J^T diag(1 / sigma^2) J`` (``J = dT/dz``: the Fisher matrix of
    the base density seen through the flow, which leaves out the curvature of ``log
    |det J|`` and of ``T`` itself); for any other prior, or with ``exact``, minus its
    exact Hessian (for a normal prior the two agree).

    Parameters
    ----------
    prior : torch.distributions.Distribution
        The latent prior of the rows (a zuko ``NormalizingFlow`` such as
        :class:`~galgen.models.FlowDistribution`, or any distribution with a
        differentiable ``log_prob``).
    z : torch.Tensor
        ``(n, d)`` latent codes.
    exact : bool, optional
        Minus the exact Hessian (double backward) whatever the prior.
    upper : bool, optional
        For a flow prior (without ``exact``): the Gauss-Newton matrix ``G`` plus the
        positive part of ``E - G`` (``E`` minus the exact Hessian), a PSD matrix at least
        as large as both in every direction: it adds the directions where the flow is
        narrower than ``G`` says (``sdss-vae``: up to 1,250x in Laplace-whitened units at
        posterior modes). The metric of :func:`~galgen.inference.sample_posterior`'s NUTS
        fallback.

    Returns
    -------
    torch.Tensor
        ``(n, d, d)`` in the dtype of ``z``.

    Examples
    --------
    >>> from galgen.models import standard_normal
    >>> prior_curvature(standard_normal(2), torch.zeros(3, 2))[0]
    tensor([[1., 0.],
            [0., 1.]])
    """
    precision = None if exact else flow_base_precision(prior)
    if precision is None:
        return -_prior_terms(prior, z)[2]
    gn = _flow_gauss_newton(prior, z, precision)
    return _upper(gn, -_prior_terms(prior, z)[2]) if upper else gn


def _flow_gauss_newton(prior, z, precision):
    """``J^T diag(precision) J`` of a flow prior's transform ``J = dT/dz``, per row."""
    inv_var = precision.to(z).expand(z.shape[-1])
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        u = prior.transform(zz)
        jac = torch.stack([torch.autograd.grad(u[:, j].sum(), zz, retain_graph=j < u.shape[1] - 1)[0]
                           for j in range(u.shape[1])], 1)  # (n, d_u, d): rows are independent
    return torch.einsum("nji,j,njk->nik", jac, inv_var, jac).detach()


def _upper(gn, exact):
    """``gn`` plus the positive part of ``exact - gn`` (symmetrised), per row."""
    diff = exact - gn
    evals, evecs = torch.linalg.eigh(0.5 * (diff + diff.transpose(1, 2)))
    return gn + (evecs * evals.clamp(min=0)[:, None, :]) @ evecs.transpose(1, 2)


def gauss_newton(model, obs, data, z, s, cond, prior, fit_flux=True):
    """Log posterior, its exact gradient and its Gauss-Newton matrix at rows ``(z, s)``.

    The matrix is ``J_w^T J_w + C``: the Fisher matrix of the likelihood, from the model
    image's derivatives in noise units (``obs.noise.whiten``; forward mode, or central
    differences for models whose ``jacobian`` is ``"central"``), plus the prior's
    curvature ``C``: minus its exact Hessian (double backward), or for a normalizing-flow
    prior its positive semi-definite ``upper`` curvature (:func:`prior_curvature`; the
    exact Hessian of ``sdss-vae``'s flow has eigenvalues down to -80 at posterior modes,
    which made Levenberg-Marquardt damp its steps to nothing). The gradient is exact
    either way.

    Parameters
    ----------
    model : galgen.models.LatentModel
    obs : galgen.physics.Observation
        Of the rows.
    data : torch.Tensor
        ``(n, S, S)``.
    z : torch.Tensor
        ``(n, d)`` latent codes.
    s : torch.Tensor
        ``(n,)`` log flux scales.
    cond : torch.Tensor or None
    prior : torch.distributions.Distribution
        The latent prior of the rows.
    fit_flux : bool, optional
        Include the log flux scale as the last coordinate.

    Returns
    -------
    log_posterior : torch.Tensor
        ``(n,)`` float64.
    grad : torch.Tensor
        ``(n, k)`` float64, ``k = d + fit_flux``.
    fisher : torch.Tensor
        ``(n, k, k)`` float64.
    """
    scale = s.exp()[:, None, None]
    if _jacobian_method(model) == "central":  # the gradient by backward mode: exact, whatever the differences
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            mg = obs.noiseless(model.decode(zz, cond).float()) * scale
            loglike = obs.noise.log_prob(data, mg)
            (gzl, dl_dm) = torch.autograd.grad(loglike.sum(), (zz, mg))
        m = mg.detach()
        jac = _central_jacobian(model, obs, z, cond) * scale
    else:
        base, jac = _jacobian(model, obs, z, cond)
        m = base * scale
        jac = jac * scale
        with torch.enable_grad():
            mm = m.detach().requires_grad_(True)
            loglike = obs.noise.log_prob(data, mm)
            (dl_dm,) = torch.autograd.grad(loglike.sum(), mm)
        gzl = torch.einsum("inpq,npq->ni", jac, dl_dm)
    grad = torch.cat([gzl, (dl_dm * m).sum((1, 2))[:, None]], 1) if fit_flux else gzl.clone()
    lpz, gz, hz = _prior_terms(prior, z)
    precision = flow_base_precision(prior)
    # a flow's exact Hessian is indefinite (Cholesky fails, the damping grows, the steps shrink): its PSD
    # 'upper' curvature instead (on 64 sdss-vae fits, 20 steps from Adam's MAP raise the log posterior 360
    # nats more, and 38 rather than 25 galaxies converge)
    curvature = -hz if precision is None else _upper(_flow_gauss_newton(prior, z, precision), -hz)
    if fit_flux:
        jac = torch.cat([jac, m[None]])
    jw = obs.noise.whiten(jac, m)
    fisher = torch.einsum("inpq,jnpq->nij", jw, jw)
    d = z.shape[1]
    grad[:, :d] += gz
    fisher[:, :d, :d] += curvature
    return (loglike.detach() + lpz).double(), grad.double(), fisher.double()


def _log_posterior(model, obs, data, z, s, cond, prior):
    with torch.no_grad():
        return (obs.noise.log_prob(data, _model_images(model, obs, z, s, cond)) + prior.log_prob(z)).double()


def levenberg_marquardt(model, z, s, data, observation, cond, prior_of, *, fit_flux=True, max_iter=100,
                        tol=1e-6, damping=1e-3, return_fisher=False):
    """Maximise the log posterior of every row by Levenberg-Marquardt (the engine of ``fit_map(optimizer="lm")``).

    Parameters
    ----------
    model : galgen.models.LatentModel
    z : torch.Tensor
        ``(N, d)`` starting codes.
    s : torch.Tensor
        ``(N,)`` starting log flux scales (kept fixed unless ``fit_flux``).
    data : torch.Tensor
        ``(N, S, S)``.
    observation : galgen.physics.Observation
        Of the ``N`` rows.
    cond : torch.Tensor or None
        ``(N, C)`` conditions.
    prior_of : callable
        ``prior_of(rows)``: the latent prior distribution of those rows (a
        ``torch.distributions.Distribution`` of batch shape ``(len(rows),)`` or ``()``).
    fit_flux : bool, optional
    max_iter : int, optional
        Steps tried (accepted or not) per galaxy at most.
    tol : float, optional
        A galaxy has converged when the undamped Gauss-Newton step would raise its log
        posterior by less than ``tol * (1 + |log posterior|)`` (half the Newton
        decrement ``g^T H^-1 g``), or when its damping exceeds 1e10 (no step of any
        length improves it: an optimum to float precision).
    damping : float, optional
        Starting ``lambda``.
    return_fisher : bool, optional
        Also return the ``(N, k, k)`` Gauss-Newton matrix (float64) at each row's optimum.

    Returns
    -------
    z, s : torch.Tensor
        The optimum of each row.
    log_posterior : torch.Tensor
        ``(N,)`` float64.
    status : torch.Tensor
        ``(N,)`` 0 converged, 1 ``max_iter`` reached, 2 non-finite start.
    n_iter : torch.Tensor
        ``(N,)`` steps tried.
    fisher : torch.Tensor
        With ``return_fisher``: the Gauss-Newton matrix, ``(N, k, k)``.
    """
    N, d = z.shape
    dev = z.device
    z, s = z.detach().clone(), s.detach().clone()
    k = d + int(fit_flux)
    lam = torch.full((N,), float(damping), dtype=torch.float64, device=dev)
    nu = torch.full((N,), 2.0, dtype=torch.float64, device=dev)
    status = torch.ones(N, dtype=torch.long, device=dev)
    n_iter = torch.zeros(N, dtype=torch.long, device=dev)
    lp = torch.empty(N, dtype=torch.float64, device=dev)
    grad = torch.zeros(N, k, dtype=torch.float64, device=dev)
    fisher = torch.zeros(N, k, k, dtype=torch.float64, device=dev)

    def rows_of(idx):
        c = None if cond is None else cond[idx]
        return observation.select(idx), data[idx], c, prior_of(idx)

    def refresh(idx):
        obs, x, c, prior = rows_of(idx)
        lp[idx], grad[idx], fisher[idx] = gauss_newton(model, obs, x, z[idx], s[idx], c, prior, fit_flux)

    every = torch.arange(N, device=dev)
    refresh(every)
    active = torch.isfinite(lp) & torch.isfinite(grad).all(1) & torch.isfinite(fisher).flatten(1).all(1)
    status[~active] = 2
    for _ in range(max_iter):
        idx = every[active]
        if not len(idx):
            break
        n_iter[idx] += 1
        h, g, la = fisher[idx], grad[idx], lam[idx]
        diag = torch.diagonal(h, dim1=1, dim2=2)
        floor = 1e-9 * diag.amax(1, keepdim=True) + 1e-12
        # converged: the undamped Gauss-Newton step would gain less than the tolerance
        chol0, info0 = torch.linalg.cholesky_ex(h + torch.diag_embed(floor.expand_as(diag)))
        newton = 0.5 * (g[:, None, :] @ torch.cholesky_solve(g[:, :, None], chol0))[:, 0, 0]
        settled = (info0 == 0) & (newton < tol * (1 + lp[idx].abs()))
        status[idx[settled]] = 0
        active[idx[settled]] = False
        n_iter[idx[settled]] -= 1
        keep = ~settled
        idx, h, g, la, diag, floor = idx[keep], h[keep], g[keep], la[keep], diag[keep], floor[keep]
        if not len(idx):
            break
        a = h + la[:, None, None] * torch.diag_embed(diag.clamp(min=0) + floor)
        chol, info = torch.linalg.cholesky_ex(a)
        ok = info == 0
        step = torch.zeros_like(g)
        if bool(ok.any()):
            step[ok] = torch.cholesky_solve(g[ok, :, None], chol[ok])[..., 0]
        bad = ~ok | ~torch.isfinite(step).all(1)
        step[bad] = 0.0
        predicted = (step * g).sum(1) - 0.5 * torch.einsum("ni,nij,nj->n", step, h, step)
        obs, x, c, prior = rows_of(idx)
        z_new = z[idx] + step[:, :d].to(z.dtype)
        s_new = s[idx] + (step[:, d].to(s.dtype) if fit_flux else 0.0)
        lp_new = _log_posterior(model, obs, x, z_new, s_new, c, prior)
        gain = lp_new - lp[idx]
        rho = gain / predicted.clamp(min=1e-300)
        accept = ~bad & torch.isfinite(lp_new) & (gain > 0) & (rho > 1e-4)
        shrink = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3)
        lam[idx] = torch.where(accept, la * shrink, la * nu[idx])
        nu[idx] = torch.where(accept, torch.full_like(la, 2.0), nu[idx] * 2)
        done = lam[idx] > 1e10  # no step of any length improves it: an optimum to float precision
        moved = idx[accept]
        z[moved], s[moved] = z_new[accept], s_new[accept]
        lp[moved] = lp_new[accept]
        status[idx[done]] = 0
        active[idx[done]] = False
        again = idx[accept & ~done]
        if len(again):
            refresh(again)
    return (z, s, lp, status, n_iter, fisher) if return_fisher else (z, s, lp, status, n_iter)
