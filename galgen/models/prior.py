"""A normalizing-flow density over latent codes (zuko), fitted to a VAE's aggregate posterior.

A VAE trained with a N(0, I) prior does not fill that prior: the codes of real galaxies
(the aggregate posterior, the mixture of q(z|x) over the data) occupy a smaller,
irregular region, and decoding draws from N(0, I) gives many implausible galaxies. A
flow fitted to the aggregate posterior after training puts samples where real galaxies
are, as in the best published galaxy VAEs (e.g. Lanusse et al. 2021). The flow is a
zuko neural spline flow (or MAF), optionally conditional on a context vector.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..errors import GalgenInputError

__all__ = ["LatentFlowPrior"]


class LatentFlowPrior(nn.Module):
    """Flow density ``p(z | context)`` over latent codes, built with zuko.

    The flow acts on standardised codes ``(z - mean) / std`` (the moments of the codes it
    was fitted to, stored as buffers), and :meth:`log_prob` includes the Jacobian of
    that standardisation, so it is a density over ``z`` itself.

    Parameters
    ----------
    features : int
        Latent dimension.
    context : int, optional
        Context (condition) dimension; 0 for an unconditional prior.
    kind : {"nsf", "maf"}, optional
        Neural spline flow (default) or masked autoregressive flow.
    transforms : int, optional
        Number of autoregressive transforms.
    hidden : sequence of int, optional
        Hidden layer sizes of each transform's network.

    Examples
    --------
    >>> prior = LatentFlowPrior(2)
    >>> z = torch.randn(512, 2) * torch.tensor([3.0, 0.5]) + 1.0
    >>> _ = prior.fit(z, epochs=5, generator=torch.Generator().manual_seed(0))
    >>> prior.sample(4, generator=torch.Generator().manual_seed(1)).shape
    torch.Size([4, 2])
    """

    def __init__(self, features: int, context: int = 0, kind: str = "nsf", transforms: int = 3,
                 hidden=(128, 128)):
        super().__init__()
        import zuko

        if features < 1 or context < 0 or transforms < 1:
            raise GalgenInputError("prior: features and transforms must be >= 1, context >= 0")
        kinds = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}
        if kind not in kinds:
            raise GalgenInputError(f"prior.kind: one of {sorted(kinds)}, got {kind!r}")
        self.config = {"features": int(features), "context": int(context), "kind": kind,
                       "transforms": int(transforms), "hidden": [int(h) for h in hidden]}
        self.features, self.context = int(features), int(context)
        self.flow = kinds[kind](features, context, transforms=transforms, hidden_features=tuple(hidden))
        self.register_buffer("z_mean", torch.zeros(features))
        self.register_buffer("z_std", torch.ones(features))
        self.register_buffer("fitted", torch.tensor(False))

    def _dist(self, context):
        if self.context:
            if context is None:
                raise GalgenInputError(f"context: this prior is conditional ({self.context} values)")
            return self.flow(context)
        return self.flow()

    def log_prob(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log density of latent codes.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, features)``.
        context : torch.Tensor, optional
            ``(B, context)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` in nats.
        """
        u = (z - self.z_mean) / self.z_std
        return self._dist(context).log_prob(u) - self.z_std.log().sum()

    def sample(self, n: int, context: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latent codes.

        Parameters
        ----------
        n : int
            Number of codes (with a context, ``n`` must equal its batch size, or the
            context is a single ``(context,)`` vector used for all).
        context : torch.Tensor, optional
        generator : torch.Generator, optional
            Makes the draw reproducible (the global random state is left untouched).

        Returns
        -------
        torch.Tensor
            ``(n, features)``.
        """
        dev = self.z_mean.device
        if context is not None and context.ndim == 1:
            context = context.expand(n, -1)
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                if self.context:
                    u = self._dist(context).sample()
                else:
                    u = self._dist(None).sample((n,))
        return u * self.z_std + self.z_mean

    def fit(self, z: torch.Tensor, context: torch.Tensor | None = None, *, epochs: int = 50,
            batch_size: int = 512, lr: float = 1e-3, val_fraction: float = 0.1, patience: int = 10,
            generator: torch.Generator | None = None) -> dict:
        """Fit the flow to samples by maximum likelihood (Adam), keeping the best validation weights.

        Parameters
        ----------
        z : torch.Tensor
            ``(N, features)`` codes.
        context : torch.Tensor, optional
            ``(N, context)``.
        epochs : int, optional
        batch_size : int, optional
        lr : float, optional
        val_fraction : float, optional
            Held-out share for early stopping.
        patience : int, optional
            Stop after this many epochs without validation improvement.
        generator : torch.Generator, optional
            Shuffling and split.

        Returns
        -------
        dict
            ``train_loss`` and ``val_loss`` per epoch (mean negative log density, nats),
            ``best_val_loss``, ``epochs``.
        """
        z = z.detach().to(self.z_mean.device, torch.float32)
        if z.ndim != 2 or z.shape[1] != self.features or len(z) < 10:
            raise GalgenInputError(f"z: expected (N >= 10, {self.features}) codes, got {tuple(z.shape)}")
        if self.context and (context is None or context.shape != (len(z), self.context)):
            raise GalgenInputError(f"context: expected ({len(z)}, {self.context})")
        ctx = None if not self.context else context.detach().to(z.device, torch.float32)
        g = generator or torch.Generator().manual_seed(0)
        perm = torch.randperm(len(z), generator=g).to(z.device)
        n_val = max(1, int(val_fraction * len(z)))
        vi, ti = perm[:n_val], perm[n_val:]
        with torch.no_grad():
            self.z_mean.copy_(z[ti].mean(0))
            self.z_std.copy_(z[ti].std(0).clamp(min=1e-6))
        opt = torch.optim.Adam(self.flow.parameters(), lr=lr)

        def nll(idx):
            return -self.log_prob(z[idx], None if ctx is None else ctx[idx]).mean()

        hist = {"train_loss": [], "val_loss": []}
        best, best_state, bad = math.inf, None, 0
        for _ in range(epochs):
            order = ti[torch.randperm(len(ti), generator=g).to(z.device)]
            total = 0.0
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                loss = nll(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            with torch.no_grad():
                val = float(nll(vi))
            hist["train_loss"].append(total / len(ti))
            hist["val_loss"].append(val)
            if val < best - 1e-4:
                best, best_state, bad = val, copy.deepcopy(self.flow.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
        if best_state is not None:
            self.flow.load_state_dict(best_state)
        self.fitted.fill_(True)
        hist["best_val_loss"] = best
        hist["epochs"] = len(hist["val_loss"])
        return hist
