"""Auto-encoder of galaxy images, trained through the physics layer.

The encoder reads an observed cutout; the decoder gives the intrinsic (PSF-free)
galaxy; the loss is the physics layer's negative log-likelihood of the observation
given that galaxy (per-galaxy PSF, variance, mask). The per-galaxy reduced chi-square of
the reconstruction is an anomaly score, and the reconstruction a denoised image.
"""

from __future__ import annotations

import torch

from ..errors import GalgenInputError
from .base import Batch, FlatPrior, GenerativeModel, no_sync
from .networks import Decoder, Encoder

__all__ = ["AutoEncoder"]


class AutoEncoder(GenerativeModel):
    """Deterministic auto-encoder: observed stamp -> latent code -> intrinsic image.

    Parameters
    ----------
    stamp : int
        Detector stamp size of the observations.
    latent_dim : int, optional
        Latent size.
    oversampling : int, optional
        Intrinsic pixels per detector pixel of the decoded image.
    width : int, optional
        Base channel count of encoder and decoder.
    input_scale : float, optional
        Observations enter the encoder as ``asinh(x / input_scale)``; use about the sky
        noise rms (ADU), so that faint structure and bright cores are both visible.
    flux_scale : float, optional
        Initial output scale of the decoder (ADU per intrinsic pixel).

    Examples
    --------
    >>> ae = AutoEncoder(32, latent_dim=8, width=8)
    >>> ae(torch.zeros(2, 32, 32)).shape
    torch.Size([2, 32, 32])
    """

    kind = "ae"

    def __init__(self, stamp: int, latent_dim: int = 16, oversampling: int = 1, width: int = 32,
                 input_scale: float = 1.0, flux_scale: float = 1.0):
        super().__init__()
        if latent_dim < 1 or oversampling < 1 or not input_scale > 0:
            raise GalgenInputError("latent_dim and oversampling must be >= 1 and input_scale > 0")
        self.config = dict(kind="ae", stamp=stamp, latent_dim=latent_dim, oversampling=oversampling, width=width,
                           input_scale=float(input_scale), flux_scale=float(flux_scale))
        self.input_scale = float(input_scale)
        self.encoder_noise_rms = self.input_scale  # the training data's noise rms (galgen train)
        self.latent_dim = int(latent_dim)
        self.encoder = Encoder(stamp, latent_dim, width=width)
        self.decoder = Decoder(stamp * oversampling, latent_dim, width=width, flux_scale=flux_scale)

    def encode(self, observed: torch.Tensor, cond=None) -> torch.Tensor:
        """Latent codes of observed cutouts ``(B, S, S)``.

        Parameters
        ----------
        observed : torch.Tensor
        cond : None
            The auto-encoder is unconditional (values are an error).

        Returns
        -------
        torch.Tensor
            ``(B, latent_dim)``.
        """
        self.condition_features(cond, len(observed))
        return self.encoder(torch.asinh(observed / self.input_scale))

    def decode(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """Intrinsic images ``(B, S*k, S*k)`` of latent codes.

        Parameters
        ----------
        z : torch.Tensor
        cond : None
            The auto-encoder is unconditional (values are an error).

        Returns
        -------
        torch.Tensor
        """
        self.condition_features(cond, len(z))
        return self.decoder(z)

    def prior(self, cond=None) -> FlatPrior:
        """The auto-encoder has no prior: the improper flat one (MAP fits are maximum likelihood).

        Parameters
        ----------
        cond : None
            Unused.

        Returns
        -------
        FlatPrior
        """
        w = self.decoder.project.weight
        return FlatPrior(self.latent_dim, device=w.device, dtype=w.dtype)

    def forward(self, observed: torch.Tensor) -> torch.Tensor:
        """Reconstruct the intrinsic galaxy of observed cutouts.

        Parameters
        ----------
        observed : torch.Tensor

        Returns
        -------
        torch.Tensor
        """
        return self.decode(self.encode(observed))

    def loss(self, observed: torch.Tensor, observation) -> torch.Tensor:
        """Mean negative log-likelihood per galaxy (nats) of the reconstruction.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)`` data.
        observation : galgen.physics.Observation
            The batch's PSFs and noise.

        Returns
        -------
        torch.Tensor
            Scalar.
        """
        return -observation.log_likelihood(self(observed).float(), observed).mean()

    def reconstruct(self, observed: torch.Tensor, cond=None) -> torch.Tensor:
        """The intrinsic galaxy the auto-encoder sees in observed cutouts.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)``.
        cond : None
            Unused (the auto-encoder is unconditional).

        Returns
        -------
        torch.Tensor
        """
        return self(observed)

    def training_step(self, batch: Batch, optimizers: dict, step: int, sync=no_sync) -> dict:
        """One Adam step on the reconstruction NLL (see :meth:`GenerativeModel.training_step`).

        Parameters
        ----------
        batch : Batch
        optimizers : dict
            ``{"model": optimizer}``.
        step : int
        sync : callable, optional

        Returns
        -------
        dict
            ``loss``: mean NLL per galaxy (nats).
        """
        opt = optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss = self.loss(batch.observed, batch.observation)
        loss.backward()
        sync(self.parameters())
        opt.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict:
        """Per-galaxy NLL (``loss``) and reduced chi-square (``chi2_pixel``).

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        dict
        """
        recon = self(batch.observed).float()
        nll = -batch.observation.log_likelihood(recon, batch.observed)
        return {"loss": nll, "chi2_pixel": self.anomaly_score(batch.observed, batch.observation)}
