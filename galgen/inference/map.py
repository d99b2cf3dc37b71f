"""Batched maximum-a-posteriori fits of latent codes: which galaxy explains each observation?

For every observed cutout ``x`` with its own PSF and noise, :func:`fit_map` maximises

    log p(x | z, s) + log p(z)

over the latent code ``z`` (and, optionally, a per-galaxy log flux scale ``s`` that
multiplies the decoded galaxy), for a whole batch at once. The objective is a sum of
independent per-galaxy terms, so one optimiser serves all galaxies; each galaxy stops
moving when its own objective has converged. The fit starts from the encoder's posterior
mean (amortised initialisation) where the model has an encoder, plus optional random
restarts drawn from the prior, and keeps each galaxy's best solution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import GalgenInputError

__all__ = ["MAPResult", "fit_map", "latent_log_prior", "STATUS"]

#: Status codes of a fit: 0 converged, 1 stopped at ``max_iter``, 2 non-finite objective.
STATUS = {0: "converged", 1: "max-iterations", 2: "diverged"}


@dataclass
class MAPResult:
    """Per-galaxy results of :func:`fit_map` (tensors on the CPU, first axis = galaxy).

    Parameters
    ----------
    z : torch.Tensor
        ``(B, d)`` MAP latent codes.
    log_scale : torch.Tensor
        ``(B,)`` log flux scale (0 when not fitted).
    intrinsic : torch.Tensor
        ``(B, S*k, S*k)`` model intrinsic images.
    model : torch.Tensor
        ``(B, S, S)`` model observed (noise-free) images.
    residual : torch.Tensor
        ``data - model``.
    normalized_residual : torch.Tensor
        ``(data - model) / sigma``, 0 on masked pixels.
    chi2 : torch.Tensor
        ``(B,)`` over good pixels.
    dof : torch.Tensor
        ``(B,)`` good pixels minus fitted parameters.
    log_posterior : torch.Tensor
        ``(B,)`` the maximised objective (nats).
    status : torch.Tensor
        ``(B,)`` codes of :data:`STATUS`.
    n_iter : torch.Tensor
        ``(B,)`` iterations until the galaxy converged (or stopped).
    wall_time : float
        Seconds for the whole batch.
    """

    z: torch.Tensor
    log_scale: torch.Tensor
    intrinsic: torch.Tensor
    model: torch.Tensor
    residual: torch.Tensor
    normalized_residual: torch.Tensor
    chi2: torch.Tensor
    dof: torch.Tensor
    log_posterior: torch.Tensor
    status: torch.Tensor
    n_iter: torch.Tensor
    wall_time: float

    @property
    def reduced_chi2(self) -> torch.Tensor:
        """``chi2 / dof`` per galaxy."""
        return self.chi2 / self.dof.clamp(min=1)


def latent_log_prior(model, z: torch.Tensor, cond=None, prior: str | None = None) -> torch.Tensor:
    """Log prior density of latent codes under a model (nats per galaxy).

    Parameters
    ----------
    model : GenerativeModel or parametric model
        A VAE uses its flow prior (or N(0, I)); a WGAN-GP draws z from N(0, I); a model
        with ``log_prior(theta)`` (parametric) uses it; an auto-encoder has no prior (0).
    z : torch.Tensor
        ``(B, d)``.
    cond : torch.Tensor, optional
    prior : {"flow", "normal"}, optional
        VAE only.

    Returns
    -------
    torch.Tensor
        ``(B,)``.
    """
    if hasattr(model, "latent_log_prob"):
        return model.latent_log_prob(z, cond, prior=prior)
    if hasattr(model, "log_prior"):
        return model.log_prior(z)
    if getattr(model, "kind", None) == "wgan-gp":
        return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
    return torch.zeros(len(z), dtype=z.dtype, device=z.device)


def _decode(model, z, cond):
    if hasattr(model, "generate"):
        return model.generate(z, cond)
    if getattr(model, "cond_dim", 0):
        return model.decode(z, cond)
    return model.decode(z)


def _latent_dim(model) -> int:
    for attr in ("latent_dim", "dim"):
        if hasattr(model, attr):
            return int(getattr(model, attr))
    return int(model.config["latent_dim"])


def _initial_codes(model, observed, cond, restarts, generator, prior):
    B, d = len(observed), _latent_dim(model)
    inits = []
    if hasattr(model, "encode"):
        with torch.no_grad():
            enc = model.encode(observed, cond) if getattr(model, "cond_dim", 0) else model.encode(observed)
        inits.append((enc[0] if isinstance(enc, tuple) else enc).float())
    elif hasattr(model, "initial_guess"):
        inits.append(model.initial_guess(observed))
    n_random = restarts + (0 if inits else 1)
    for _ in range(n_random):
        if hasattr(model, "prior") and getattr(model.prior, "fitted", False) and prior != "normal":
            c = model.condition_features(cond, B) if getattr(model, "cond_dim", 0) else None
            inits.append(model.prior.sample(B, c, generator=generator).float())
        else:
            inits.append(torch.randn(B, d, generator=generator, device=observed.device))
    return torch.stack(inits)  # (R, B, d)


def fit_map(model, observed: torch.Tensor, observation, *, cond=None, restarts: int = 0,
            optimizer: str = "adam", lr: float = 0.05, max_iter: int = 500, tol: float = 1e-4,
            patience: int = 10, fit_flux: bool = True, prior: str | None = None,
            generator: torch.Generator | None = None) -> MAPResult:
    """MAP latent codes (and flux scales) of a batch of observed galaxies.

    Parameters
    ----------
    model : GenerativeModel or parametric model
        Anything with ``decode(z[, cond])`` (VAE, AE), ``generate(z[, cond])``
        (WGAN-GP) or a parametric model, in eval mode.
    observed : torch.Tensor
        ``(B, S, S)`` data.
    observation : galgen.physics.Observation
        The galaxies' PSFs and noise (variance, mask).
    cond : torch.Tensor, optional
        Raw conditions of a conditional model.
    restarts : int, optional
        Random starts drawn from the prior in addition to the encoder's guess; each
        galaxy keeps its best solution.
    optimizer : {"adam", "lbfgs"}, optional
        Adam with per-galaxy convergence, or L-BFGS (strong Wolfe line search) on the
        summed, separable objective.
    lr : float, optional
        Step size (Adam) or initial step (L-BFGS).
    max_iter : int, optional
    tol : float, optional
        A galaxy has converged when its objective improved by less than
        ``tol * (1 + |objective|)`` over ``patience`` iterations.
    patience : int, optional
    fit_flux : bool, optional
        Also fit a per-galaxy log flux scale, starting from ``model.initial_log_scale(observed)``
        where the model has it (parametric models render unit flux), else from 0.
    prior : {"flow", "normal"}, optional
        VAE latent prior.
    generator : torch.Generator, optional
        Randomness of the restarts.

    Returns
    -------
    MAPResult

    Raises
    ------
    GalgenInputError
        Mismatched shapes, or a stamp size other than the model's.
    """
    t0 = time.perf_counter()
    if observed.ndim != 3:
        raise GalgenInputError(f"observed: expected (B, S, S), got {tuple(observed.shape)}")
    stamp = getattr(model, "config", {}).get("stamp")
    if stamp is not None and observed.shape[-1] != stamp:
        raise GalgenInputError(f"observed: stamp {observed.shape[-1]} but the model was trained on {stamp}")
    if optimizer not in ("adam", "lbfgs"):
        raise GalgenInputError(f"optimizer: 'adam' or 'lbfgs', got {optimizer!r}")
    for p in getattr(model, "parameters", lambda: [])():
        p.requires_grad_(False)
    B = len(observed)
    inits = _initial_codes(model, observed, cond, restarts, generator, prior)
    R = inits.shape[0]
    z = inits.reshape(R * B, -1).clone().requires_grad_(True)
    s0 = model.initial_log_scale(observed).float() if hasattr(model, "initial_log_scale") and fit_flux else None
    s = (torch.zeros(R * B, device=observed.device) if s0 is None else s0.repeat(R)).requires_grad_(fit_flux)
    data = observed.repeat(R, 1, 1)
    obs = observation.select(torch.arange(B).repeat(R)) if R > 1 else observation
    c = None if cond is None else torch.as_tensor(cond).repeat(R, *([1] * (torch.as_tensor(cond).ndim - 1)))

    def objective():
        intr = _decode(model, z, c).float() * s.exp()[:, None, None]
        return obs.log_likelihood(intr, data) + latent_log_prior(model, z, c, prior)

    params = [z] + ([s] if fit_flux else [])
    n_iter = torch.full((R * B,), max_iter, dtype=torch.long)
    status = torch.ones(R * B, dtype=torch.long)
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
        active = torch.ones(R * B, dtype=torch.bool, device=observed.device)
        history = []
        for it in range(max_iter):
            opt.zero_grad()
            lp = objective()
            bad = ~torch.isfinite(lp)
            (-lp[~bad].sum()).backward()
            frozen = [p.detach().clone() for p in params]
            opt.step()
            with torch.no_grad():  # converged or diverged galaxies stop moving
                for p, f in zip(params, frozen):
                    p[~active] = f[~active]
            history.append(lp.detach())
            newly_bad = bad & active
            status[newly_bad.cpu()] = 2
            n_iter[newly_bad.cpu()] = it + 1
            active &= ~bad
            if len(history) > patience:
                old = history[-patience - 1]
                done = active & ((lp.detach() - old).abs() < tol * (1 + lp.detach().abs()))
                status[done.cpu()] = 0
                n_iter[done.cpu()] = it + 1
                active &= ~done
            if not bool(active.any()):
                break
    else:
        opt = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_change=tol, history_size=20)

        def closure():
            opt.zero_grad()
            loss = -objective().sum()
            loss.backward()
            return loss

        opt.step(closure)
        n_iter[:] = opt.state[opt._params[0]].get("n_iter", max_iter)
        status[:] = 0 if n_iter[0] < max_iter else 1
    with torch.no_grad():
        lp = objective()
        status[(~torch.isfinite(lp)).cpu()] = 2
        lp_pick = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -math.inf)).view(R, B)
        best = lp_pick.argmax(0)
        pick = best * B + torch.arange(B, device=best.device)
        z_best, s_best = z.detach()[pick], s.detach()[pick]
        intr = _decode(model, z_best, cond).float() * s_best.exp()[:, None, None]
        noiseless = observation.noiseless(intr)
        resid = observed - noiseless
        var = observation.noise.variance(noiseless)
        mask = getattr(observation.noise, "mask", None)
        good = torch.ones_like(resid, dtype=torch.bool) if mask is None else ~mask
        norm = torch.where(good, resid / var.sqrt(), torch.zeros_like(resid))
        chi2 = (norm**2).sum((1, 2))
        k = z_best.shape[1] + int(fit_flux)
        dof = good.sum((1, 2)) - k
    return MAPResult(z=z_best.cpu(), log_scale=s_best.cpu(), intrinsic=intr.cpu(), model=noiseless.cpu(),
                     residual=resid.cpu(), normalized_residual=norm.cpu(), chi2=chi2.cpu(), dof=dof.cpu(),
                     log_posterior=lp.view(R, B).gather(0, best[None])[0].cpu(), status=status[pick.cpu()],
                     n_iter=n_iter[pick.cpu()], wall_time=time.perf_counter() - t0)
