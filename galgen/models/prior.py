"""Densities over latent codes fitted to a VAE's aggregate posterior: a normalizing flow (zuko), a code mixture.

A VAE trained with a N(0, I) prior does not fill that prior: the codes of real galaxies
(the aggregate posterior, the mixture of q(z|x) over the data) occupy a smaller,
irregular region, and decoding draws from N(0, I) gives many implausible galaxies. A
flow fitted to the aggregate posterior after training puts samples where real galaxies
are, as in the best published galaxy VAEs (e.g. Lanusse et al. 2021). The flow is a
zuko neural spline flow (or MAF), optionally conditional on a context vector.

:class:`CodeMixturePrior` is the aggregate posterior itself: a mixture of Gaussians, one
per training galaxy, at its code with its posterior's widths (Hoffman & Johnson 2016; the
VampPrior of Tomczak & Welling 2018 with every training galaxy as a pseudo-input), its
widths scaled so that its draws are as far from the training codes as new galaxies' codes
are. It keeps the joint structure of the codes that a flow smooths away.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers

import torch
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
from torch.distributions.transforms import AffineTransform, ComposeTransform
from zuko.distributions import NormalizingFlow

from ..errors import GalgenInputError
from .base import sample_latents

log = logging.getLogger("galgen.prior")

__all__ = ["LatentFlowPrior", "FlowDistribution", "CodeMixturePrior", "CodeMixture"]


class FlowDistribution(NormalizingFlow):
    """The density of a :class:`LatentFlowPrior` over codes ``z``, for one context: a zuko flow.

    Its transform maps ``z`` to the base noise: the standardisation ``(z - z_mean) /
    z_std``, then the flow. ``log_prob`` is :meth:`LatentFlowPrior.log_prob` (the flow's
    density of the standardised code plus the standardisation's Jacobian);
    ``rsample`` maps base noise through the inverse flow and back to the units of ``z``.

    Parameters
    ----------
    prior : LatentFlowPrior
    context : torch.Tensor, optional
        ``(B, context)`` (batch shape ``(B,)``), or None for an unconditional prior.
    """

    def __init__(self, prior: "LatentFlowPrior", context: torch.Tensor | None = None):
        flow = prior._dist(context)
        standardise = AffineTransform(prior.z_mean, prior.z_std, event_dim=1).inv
        super().__init__(ComposeTransform([standardise, flow.transform]), flow.base)
        self._prior, self._context = prior, context

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of codes (differentiable in ``z``).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, features)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` nats, in the dtype of ``z``.
        """
        return self._prior.log_prob(z, self._context)

_KINDS = ("maf", "nsf")


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or (
            isinstance(value, float) and value.is_integer())):
        raise GalgenInputError(f"{name}: expected an integer, got {value!r}")
    if int(value) < minimum:
        raise GalgenInputError(f"{name}: must be >= {minimum}, got {value!r}")
    return int(value)


class LatentFlowPrior(nn.Module):
    """Flow density ``p(z | context)`` over latent codes, built with zuko.

    The flow acts on standardised codes ``u = (z - z_mean) / z_std``, where ``z_mean``
    and ``z_std`` are the per-dimension moments of the training codes given to
    :meth:`fit` (buffers, zero and one before fitting). :meth:`log_prob` adds the
    Jacobian of that standardisation, ``-sum(log z_std)``, so it is a density over ``z``
    itself, and :meth:`sample` returns codes in the units of ``z``. The flow's weights,
    the standardisation and the boolean ``fitted`` flag are all in the module's
    ``state_dict``, so a checkpoint of a model holding the prior holds them too.

    Parameters
    ----------
    features : int
        Latent dimension.
    context : int, optional
        Context (condition) dimension; 0 for an unconditional prior.
    kind : {"nsf", "maf"}, optional
        Neural spline flow (default; :class:`zuko.flows.NSF`) or masked autoregressive
        flow (:class:`zuko.flows.MAF`).
    transforms : int, optional
        Number of autoregressive transforms.
    hidden : sequence of int, optional
        Hidden layer sizes of each transform's network.

    Attributes
    ----------
    config : dict
        The constructor arguments (JSON-serialisable).
    fitted : torch.Tensor
        Boolean scalar buffer, True once :meth:`fit` has run.

    Examples
    --------
    >>> prior = LatentFlowPrior(2, transforms=2, hidden=(32, 32))
    >>> z = torch.randn(512, 2) * torch.tensor([3.0, 0.5]) + 1.0
    >>> _ = prior.fit(z, epochs=5, generator=torch.Generator().manual_seed(0))
    >>> bool(prior.fitted)
    True
    >>> prior.sample(4, generator=torch.Generator().manual_seed(1)).shape
    torch.Size([4, 2])
    >>> prior.log_prob(z[:3]).shape
    torch.Size([3])
    """

    def __init__(self, features: int, context: int = 0, kind: str = "nsf", transforms: int = 3,
                 hidden=(128, 128)):
        super().__init__()
        import zuko

        features = _positive_int(features, "features")
        context = _positive_int(context, "context", minimum=0)
        transforms = _positive_int(transforms, "prior.transforms")
        if kind not in _KINDS:
            raise GalgenInputError(f"prior.kind: one of {list(_KINDS)}, got {kind!r}")
        if isinstance(hidden, (int, float)) and not isinstance(hidden, bool):
            hidden = (hidden,)
        try:
            hidden = [_positive_int(h, "prior.hidden") for h in hidden]
        except TypeError:
            raise GalgenInputError(f"prior.hidden: expected a list of layer sizes, got {hidden!r}") from None
        if not hidden:
            raise GalgenInputError("prior.hidden: needs at least one hidden layer size")
        self.config = {"features": features, "context": context, "kind": kind, "transforms": transforms,
                       "hidden": hidden}
        self.features, self.context = features, context
        flow_class = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}[kind]
        self.flow = flow_class(features, context, transforms=transforms, hidden_features=tuple(hidden))
        self.register_buffer("z_mean", torch.zeros(features))
        self.register_buffer("z_std", torch.ones(features))
        self.register_buffer("fitted", torch.tensor(False))

    # -- checks ---------------------------------------------------------------------------
    def _codes(self, z, name="z") -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.features:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise GalgenInputError(f"{name}: expected a tensor of shape (N, {self.features}), got {shape}")
        return z.to(device=self.z_mean.device, dtype=self.z_mean.dtype)

    def _context(self, context, n: int) -> torch.Tensor | None:
        if self.context == 0:
            if context is not None and torch.as_tensor(context).numel():
                raise GalgenInputError("context: this prior is unconditional (context=0)")
            return None
        if context is None:
            raise GalgenInputError(f"context: this prior is conditional, it needs ({n}, {self.context}) values")
        context = torch.as_tensor(context).to(device=self.z_mean.device, dtype=self.z_mean.dtype)
        if context.ndim == 1 and context.shape[0] == self.context:
            context = context.expand(n, -1)
        if context.shape != (n, self.context):
            raise GalgenInputError(f"context: expected shape ({n}, {self.context}) or ({self.context},), "
                                   f"got {tuple(context.shape)}")
        return context

    def _dist(self, context):
        return self.flow(context) if self.context else self.flow()

    def distribution(self, context: torch.Tensor | None = None) -> FlowDistribution:
        """The prior as a :class:`torch.distributions.Distribution` (a zuko flow) for a context.

        Parameters
        ----------
        context : torch.Tensor, optional
            ``(B, context)``: one distribution per row (batch shape ``(B,)``); required
            by a conditional prior.

        Returns
        -------
        FlowDistribution
            Event shape ``(features,)``; draw from it reproducibly with
            :func:`galgen.models.sample_latents`.
        """
        n = 1 if context is None or torch.as_tensor(context).ndim < 2 else len(context)
        return FlowDistribution(self, self._context(context, n))

    # -- density and sampling -------------------------------------------------------------
    def log_prob(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log density of latent codes (differentiable in ``z``).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, features)``.
        context : torch.Tensor, optional
            ``(B, context)`` or ``(context,)`` (shared); required by a conditional prior.

        Returns
        -------
        torch.Tensor
            ``(B,)`` log density of ``z`` in nats, in the dtype of ``z``.
        """
        dtype = z.dtype if isinstance(z, torch.Tensor) else None
        zz = self._codes(z)
        ctx = self._context(context, len(zz))
        u = (zz - self.z_mean) / self.z_std
        lp = self._dist(ctx).log_prob(u) - self.z_std.log().sum()
        return lp.to(dtype)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`log_prob`.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, features)``.
        context : torch.Tensor, optional
            ``(B, context)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` nats.
        """
        return self.log_prob(z, context)

    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Draw latent codes.

        The base noise ``eps ~ N(0, I)`` is drawn with ``generator`` (on the generator's
        device, then moved to the prior's) and mapped through the inverse flow, so a
        generator with the same seed gives the same codes and the global random state is
        neither used nor changed.

        Parameters
        ----------
        n : int
            Number of codes.
        context : torch.Tensor, optional
            ``(n, context)``, or ``(context,)`` used for all ``n`` codes; required by a
            conditional prior.
        generator : torch.Generator, optional
            Source of randomness (default: the global generator).
        temperature : float, optional
            Scale of the base noise (``< 1`` draws from the denser core of the density).

        Returns
        -------
        torch.Tensor
            ``(n, features)`` codes on the prior's device and dtype.
        """
        n = _positive_int(n, "n")
        if not temperature > 0:
            raise GalgenInputError(f"temperature: must be > 0, got {temperature!r}")
        ctx = self._context(context, n)
        dev, dtype = self.z_mean.device, self.z_mean.dtype
        gdev = generator.device if generator is not None else dev
        eps = torch.randn(n, self.features, generator=generator, device=gdev, dtype=dtype).to(dev)
        u = self._dist(ctx).transform.inv(temperature * eps)
        return u * self.z_std + self.z_mean

    # -- fitting --------------------------------------------------------------------------
    def fit(self, z: torch.Tensor, context: torch.Tensor | None = None, *, epochs: int = 50,
            batch_size: int = 512, lr: float = 1e-3, val_fraction: float = 0.1, patience: int = 10,
            generator: torch.Generator | None = None) -> dict:
        """Fit the flow to samples by maximum likelihood, keeping the best validation weights.

        The codes are first split (at random) into a training and a validation part;
        ``z_mean`` and ``z_std`` are set to the training part's moments (the flow models
        standardised codes); then Adam minimises the mean negative log density of
        mini-batches. After every epoch the validation NLL is computed; the weights of
        the best epoch are restored at the end, and training stops early after
        ``patience`` epochs without improvement. ``fitted`` is set to True.

        Parameters
        ----------
        z : torch.Tensor
            ``(N, features)`` codes, ``N >= 10``.
        context : torch.Tensor, optional
            ``(N, context)``; required by a conditional prior.
        epochs : int, optional
            Maximum number of passes over the training codes.
        batch_size : int, optional
            Mini-batch size.
        lr : float, optional
            Adam learning rate.
        val_fraction : float, optional
            Held-out share in ``[0, 1)`` for model selection and early stopping; with 0
            the full training NLL is used instead.
        patience : int, optional
            Stop after this many epochs without validation improvement.
        generator : torch.Generator, optional
            Split and shuffling (default: a generator seeded with 0).

        Returns
        -------
        dict
            ``train_loss`` and ``val_loss`` per epoch (mean negative log density of
            ``z``, nats per code), ``best_val_loss``, ``best_epoch`` (0-based) and
            ``epochs`` (number run).
        """
        z = self._codes(z).detach()
        if len(z) < 10:
            raise GalgenInputError(f"z: need at least 10 codes to fit the prior, got {len(z)}")
        if not bool(torch.isfinite(z).all()):
            raise GalgenInputError("z: codes must be finite")
        ctx = self._context(context, len(z))
        ctx = None if ctx is None else ctx.detach()
        epochs = _positive_int(epochs, "epochs")
        batch_size = _positive_int(batch_size, "batch_size")
        patience = _positive_int(patience, "patience")
        if not 0 <= val_fraction < 1:
            raise GalgenInputError(f"val_fraction: must be in [0, 1), got {val_fraction!r}")
        if not lr > 0:
            raise GalgenInputError(f"lr: must be > 0, got {lr!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        perm = torch.randperm(len(z), generator=g, device=g.device).to(z.device)
        n_val = int(round(val_fraction * len(z)))
        if val_fraction > 0:
            n_val = min(max(n_val, 1), len(z) - 2)
        vi, ti = perm[:n_val], perm[n_val:]
        if n_val == 0:
            vi = ti
        initial = copy.deepcopy(self.state_dict())
        with torch.no_grad():
            self.z_mean.copy_(z[ti].mean(0))
            self.z_std.copy_(z[ti].std(0).clamp(min=1e-6))

        def nll(idx):
            return -self.log_prob(z[idx], None if ctx is None else ctx[idx]).mean()

        def full_nll(idx):
            with torch.no_grad():
                parts = [float(nll(idx[s:s + 8192])) * len(idx[s:s + 8192]) for s in range(0, len(idx), 8192)]
            return sum(parts) / len(idx)

        hist = {"train_loss": [], "val_loss": []}
        best, best_state, best_epoch, bad = math.inf, None, -1, 0
        with torch.enable_grad():
            opt = torch.optim.Adam(self.flow.parameters(), lr=lr)
            for epoch in range(epochs):
                order = ti[torch.randperm(len(ti), generator=g, device=g.device).to(z.device)]
                total = 0.0
                for s in range(0, len(order), batch_size):
                    idx = order[s:s + batch_size]
                    loss = nll(idx)
                    if not bool(torch.isfinite(loss)):  # skip a bad step rather than poison Adam
                        continue
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(self.flow.parameters(), 10.0)
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                val = full_nll(vi)
                hist["train_loss"].append(total / len(ti))
                hist["val_loss"].append(val)
                log.info("flow prior epoch %d/%d: train nll %.4g, validation nll %.4g", epoch + 1, epochs,
                         hist["train_loss"][-1], val)
                bad = 0 if val < best - 1e-4 else bad + 1  # patience counts real improvements
                if val < best:
                    best, best_epoch = val, epoch
                    best_state = copy.deepcopy(self.flow.state_dict())
                if bad >= patience:
                    break
        if best_state is None:
            self.load_state_dict(initial)
            raise GalgenInputError("z: the flow fit gave no finite validation loss (diverged); "
                                   "check the codes or lower lr")
        self.flow.load_state_dict(best_state)
        self.fitted.fill_(True)
        hist.update(best_val_loss=best, best_epoch=best_epoch, epochs=len(hist["val_loss"]))
        return hist


#: Elements of the (batch, components) block of squared distances that CodeMixture.log_prob holds at once.
_MIXTURE_BLOCK = 1 << 22


class CodeMixture(MixtureSameFamily):
    """Equal-weight mixture of diagonal Gaussians over codes: the density of a :class:`CodeMixturePrior`.

    A :class:`torch.distributions.MixtureSameFamily` whose :meth:`log_prob` computes
    the components' squared distances as matrix products, over blocks of components, so
    that it holds ``B x block`` numbers at once (the parent's holds all ``B x N x D``),
    in float64 (the expanded square cancels). 1,000 codes against 16,000 components of
    17 dimensions, with the gradient: 0.47 s on 2 CPU threads against 4.0 s for the
    parent's (``benchmarks/bench_code_mixture.py``).
    :func:`galgen.models.sample_latents` draws from it reproducibly (a component per
    draw, then its Gaussian with standard normal noise scaled by the temperature).

    Parameters
    ----------
    centres : torch.Tensor
        ``(N, D)`` component means.
    scales : torch.Tensor
        ``(N, D)`` positive component standard deviations.
    """

    def __init__(self, centres: torch.Tensor, scales: torch.Tensor):
        n = len(centres)
        super().__init__(Categorical(logits=torch.zeros(n, device=centres.device, dtype=centres.dtype)),
                         Independent(Normal(centres, scales), 1), validate_args=False)
        self.centres, self.scales = centres, scales

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of codes (differentiable in ``z``).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, D)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` nats, in the dtype of ``z``.
        """
        zz = z.to(self.centres.dtype)
        flat = zz.reshape(-1, zz.shape[-1])
        d = flat.shape[1]
        block = max(1, _MIXTURE_BLOCK // max(1, len(flat)))
        const = -0.5 * d * math.log(2 * math.pi) - math.log(len(self.centres))
        parts = []
        flat = flat.double()  # the expanded square cancels: 0.1 nat errors in float32 at widths of 0.02
        for s in range(0, len(self.centres), block):  # |(z - c) / s|^2 as two matrix products
            c, prec = self.centres[s:s + block].double(), self.scales[s:s + block].double() ** -2
            quad = (flat * flat) @ prec.T - 2 * flat @ (c * prec).T + (c * c * prec).sum(-1)[None]
            parts.append(torch.logsumexp(-0.5 * quad.clamp_min(0) + 0.5 * prec.log().sum(-1)[None], 1))
        lp = torch.logsumexp(torch.stack(parts, 1), 1) + const
        return lp.reshape(zz.shape[:-1]).to(z.dtype)


def _match_bandwidth(codes, scales, val_fraction, generator, iterations: int = 40) -> dict:
    """The factor on ``scales`` at which draws are as far from the codes as held-out codes are."""
    perm = torch.randperm(len(codes), generator=generator, device=generator.device).to(codes.device)
    n_val = min(max(1, int(round(val_fraction * len(codes)))), len(codes) - 2)
    val, rest = codes[perm[:n_val]], perm[n_val:]
    centres, widths = codes[rest], scales[rest]
    unit = centres.std(0).clamp_min(1e-12)
    pick = torch.randint(len(rest), (n_val,), generator=generator, device=generator.device).to(codes.device)
    eps = torch.randn(n_val, codes.shape[1], generator=generator, device=generator.device).to(codes)

    def median_distance(x):
        d = torch.cat([torch.cdist(part.double() / unit, centres.double() / unit).min(1).values
                       for part in x.split(1024)])
        return float(d.median())

    target = median_distance(val)
    lo, hi = math.log(1e-3), math.log(1e3)
    for _ in range(iterations):  # the draws' distance grows with the factor
        mid = 0.5 * (lo + hi)
        if median_distance(centres[pick] + math.exp(mid) * widths[pick] * eps) < target:
            lo = mid
        else:
            hi = mid
    factor = math.exp(0.5 * (lo + hi))
    return {"bandwidth": factor, "held_out_distance": target,
            "draw_distance": median_distance(centres[pick] + factor * widths[pick] * eps)}


class CodeMixturePrior(nn.Module):
    """The aggregate posterior as a prior: one Gaussian per training galaxy's code.

    ``p(z) = (1/N) sum_n N(z; c_n, diag(s_n^2))``, with ``c_n`` a training galaxy's code
    (e.g. its MAP code, :func:`galgen.inference.map_codes`) and ``s_n`` its posterior's
    widths (e.g. the encoder's). It is the prior that maximises the ELBO of the training
    set (Hoffman & Johnson 2016) and keeps every joint structure of the codes (ellipticity
    with size and profile, a companion with its host). With the posterior widths alone its
    draws are the training galaxies again; :meth:`fit` widens them by a factor (the
    bandwidth of a kernel density estimate) at which the draws are as far from the
    training codes as new galaxies' codes are, in code space: decoded, they can still be
    far closer to a training galaxy than a new galaxy is (``benchmarks/diagnose_novelty.py``
    measures it; docs/models.md). The
    centres and scales are buffers whose size is set by :meth:`fit` (and by a loaded
    ``state_dict``); a module that was never fitted holds none (``fitted`` False).

    Parameters
    ----------
    features : int
        Latent dimension.

    Attributes
    ----------
    centres, scales : torch.Tensor
        ``(N, features)`` buffers (``N = 0`` before :meth:`fit`); ``scales`` are the
        components' widths, the bandwidth included.
    bandwidth : torch.Tensor
        Scalar buffer: the factor :meth:`fit` put on the given scales.
    fitted : torch.Tensor
        Boolean scalar buffer.

    Examples
    --------
    >>> prior = CodeMixturePrior(2)
    >>> prior.fit(torch.tensor([[0.0, 0.0], [4.0, 0.0]]), 0.5, bandwidth=1.0)
    {'bandwidth': 1.0}
    >>> prior.sample(3, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 2])
    >>> round(float(prior.log_prob(torch.zeros(1, 2))), 4)  # log(0.5 N(0; 0, 0.25 I))
    -1.1447
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = _positive_int(features, "features")
        self.register_buffer("centres", torch.zeros(0, self.features))
        self.register_buffer("scales", torch.ones(0, self.features))
        self.register_buffer("bandwidth", torch.tensor(1.0))
        self.register_buffer("fitted", torch.tensor(False))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the number of components is the checkpoint's; checkpoints from before the mixture hold none
        for name in ("centres", "scales", "bandwidth", "fitted"):
            key = prefix + name
            if key in state_dict:
                if name in ("centres", "scales"):
                    own = self._buffers[name]
                    self._buffers[name] = torch.empty(state_dict[key].shape, device=own.device, dtype=own.dtype)
            else:
                state_dict[key] = self._buffers[name].detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def fit(self, codes: torch.Tensor, scales, *, bandwidth="match", val_fraction: float = 0.1,
            max_components: int | None = None, generator: torch.Generator | None = None) -> dict:
        """Set the components: one per code, its widths ``bandwidth * scales``.

        With ``bandwidth="match"`` the factor is chosen so that the mixture's draws are as
        far from the nearest training code as new galaxies are, the data-copying test of
        Meehan, Chaudhuri & Dasgupta (2020) made neutral: a share ``val_fraction`` of the
        codes is held out, and the factor is set (by bisection in its logarithm) where the
        median distance of as many draws from the other codes' mixture to their nearest
        code equals the held-out codes' median distance to theirs (every coordinate divided
        by the codes' standard deviation). Narrower components would redraw the training
        galaxies; wider ones blur the codes' joint structure. The match is in code space,
        not in the image: where the decoder is most sensitive to the coordinates the
        posterior knows best, the decoded draws stay closer to their training galaxies
        than new galaxies are. All the codes are then the
        centres.

        Parameters
        ----------
        codes : torch.Tensor
            ``(N, features)`` finite codes, ``N >= 1`` (``N >= 10`` to match the bandwidth).
        scales : torch.Tensor or float
            ``(N, features)`` positive widths (each code's posterior standard deviations),
            or one positive number for all.
        bandwidth : "match" or float, optional
            The factor on ``scales``, or ``"match"`` to choose it as above.
        val_fraction : float, optional
            Share of the codes held out to match the bandwidth, in ``(0, 1)``.
        max_components : int, optional
            Keep at most this many components (a random subset, drawn with ``generator``).
        generator : torch.Generator, optional
            For the subset, the held-out share and the draws (default: seeded with 0).

        Returns
        -------
        dict
            ``bandwidth`` (the factor), and with ``"match"`` the matched median distances
            ``held_out_distance`` and ``draw_distance``.

        Raises
        ------
        GalgenInputError
            For codes or scales of the wrong shape, non-finite codes, non-positive scales
            or a bad ``bandwidth``.
        """
        if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.shape[1] != self.features \
                or not len(codes):
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise GalgenInputError(f"codes: expected a tensor of shape (N >= 1, {self.features}), got {shape}")
        codes = codes.detach().to(device=self.centres.device, dtype=self.centres.dtype)
        if not bool(torch.isfinite(codes).all()):
            raise GalgenInputError("codes: must be finite")
        scales = torch.as_tensor(scales).detach().to(device=codes.device, dtype=codes.dtype)
        if scales.ndim == 0:
            scales = scales.expand_as(codes)
        if scales.shape != codes.shape:
            raise GalgenInputError(f"scales: expected one number or shape {tuple(codes.shape)}, "
                                   f"got {tuple(scales.shape)}")
        if not bool((scales > 0).all()) or not bool(torch.isfinite(scales).all()):
            raise GalgenInputError("scales: must be finite and > 0")
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        if max_components is not None and _positive_int(max_components, "max_components") < len(codes):
            keep = torch.randperm(len(codes), generator=g, device=g.device)[:int(max_components)].to(codes.device)
            codes, scales = codes[keep], scales[keep]
        info = {}
        if isinstance(bandwidth, str) and bandwidth == "match":
            if not 0 < val_fraction < 1:
                raise GalgenInputError(f"val_fraction: must be in (0, 1), got {val_fraction!r}")
            if len(codes) < 10:
                raise GalgenInputError(f"codes: matching the bandwidth needs at least 10 codes, got {len(codes)} "
                                       "(pass a number as bandwidth)")
            info = _match_bandwidth(codes, scales, val_fraction, g)
            factor = info["bandwidth"]
        elif isinstance(bandwidth, numbers.Real) and not isinstance(bandwidth, bool) and math.isfinite(bandwidth) \
                and bandwidth > 0:
            factor = float(bandwidth)
        else:
            raise GalgenInputError(f"bandwidth: 'match' or a positive number, got {bandwidth!r}")
        self._buffers["centres"] = codes.clone()
        self._buffers["scales"] = (factor * scales).contiguous()
        self.bandwidth.fill_(factor)
        self.fitted.fill_(True)
        return {"bandwidth": factor, **{k: v for k, v in info.items() if k != "bandwidth"}}

    def _check_fitted(self):
        if not bool(self.fitted):
            raise GalgenInputError("the code mixture is not fitted (CodeMixturePrior.fit)")

    def distribution(self) -> CodeMixture:
        """The mixture as a :class:`torch.distributions.Distribution`.

        Returns
        -------
        CodeMixture
            Batch shape ``()``, event shape ``(features,)``.

        Raises
        ------
        GalgenInputError
            Before :meth:`fit`.
        """
        self._check_fitted()
        return CodeMixture(self.centres, self.scales)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of codes (differentiable in ``z``).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, features)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` nats.
        """
        return self.distribution().log_prob(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Draw codes: a component each (uniformly), then its Gaussian.

        Parameters
        ----------
        n : int
            Number of codes.
        generator : torch.Generator, optional
            Source of randomness (the same seed, the same codes).
        temperature : float, optional
            Scale of the components' widths.

        Returns
        -------
        torch.Tensor
            ``(n, features)``.
        """
        return sample_latents(self.distribution(), n, generator=generator, temperature=temperature)
