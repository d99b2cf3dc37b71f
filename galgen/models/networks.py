"""Convolutional building blocks for square galaxy stamps: encoder and decoder.

The encoder maps ``(B, H, W)`` images to a feature vector (the VAE puts a Gaussian on
it); the decoder maps latent codes to **non-negative** intrinsic images (softplus)
times a flux scale, on a grid of any size reachable by doubling from a small seed grid
(32, 48, 64, 128, ... pixels, optionally oversampled or padded).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import GalgenInputError

__all__ = ["Encoder", "Decoder", "halvings"]


def halvings(size: int, smallest: int = 4) -> tuple[int, int]:
    """How a grid of ``size`` pixels halves down to a seed grid.

    Parameters
    ----------
    size : int
        Grid size in pixels (>= ``smallest``).
    smallest : int, optional
        Stop when the grid would become smaller than this or odd.

    Returns
    -------
    n : int
        Number of halvings.
    seed : int
        Seed grid size, ``size / 2**n``.

    Examples
    --------
    >>> [halvings(s) for s in (32, 48, 64, 128, 96)]
    [(3, 4), (4, 3), (4, 4), (5, 4), (5, 3)]
    """
    if size < smallest:
        raise GalgenInputError(f"stamp: size {size} is smaller than {smallest} pixels")
    n = 0
    while size % 2 == 0 and size // 2 >= min(smallest, 3) and size > smallest:
        size //= 2
        n += 1
    return n, size


def _block(cin, cout, groups=8):
    g = math.gcd(groups, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU())


class Encoder(nn.Module):
    """Convolutional encoder of ``size x size`` stamps.

    Each level is a residual-free double 3x3 convolution (GroupNorm, SiLU) followed by a
    stride-2 convolution; channels double per level up to ``max_width``.

    Parameters
    ----------
    size : int
        Stamp size (e.g. 32, 48, 64, 128).
    out_features : int
        Size of the output vector (e.g. ``2 * latent_dim`` for a Gaussian posterior).
    width : int, optional
        Channels of the first level.
    max_width : int, optional
        Channel cap.
    in_channels : int, optional
        Input channels (1 for an image; more if, e.g., the variance map is an input).

    Examples
    --------
    >>> enc = Encoder(48, out_features=32)
    >>> enc(torch.zeros(5, 48, 48)).shape
    torch.Size([5, 32])
    """

    def __init__(self, size: int, out_features: int, width: int = 32, max_width: int = 256, in_channels: int = 1):
        super().__init__()
        n, seed = halvings(size)
        self.size, self.in_channels = size, in_channels
        layers, c = [], in_channels
        for i in range(n):
            cout = min(width * 2**i, max_width)
            layers += [_block(c, cout), nn.Conv2d(cout, cout, 4, stride=2, padding=1)]
            c = cout
        layers += [_block(c, c)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * seed * seed, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, H, W)`` (one channel) or ``(B, C, H, W)``.

        Returns
        -------
        torch.Tensor
            ``(B, out_features)``.
        """
        if x.ndim == 3:
            x = x[:, None]
        if x.shape[-1] != self.size or x.shape[-2] != self.size or x.shape[1] != self.in_channels:
            raise GalgenInputError(f"x: expected (B, {self.in_channels}, {self.size}, {self.size}), "
                                   f"got {tuple(x.shape)}")
        return self.head(self.features(x).flatten(1))


class Decoder(nn.Module):
    """Convolutional decoder: latent code to a non-negative ``size x size`` image.

    A linear layer makes a seed grid, each level doubles it (nearest upsampling, double
    3x3 convolution), and a final 1x1 convolution gives one channel mapped through
    softplus and multiplied by ``flux_scale`` (learned when ``learn_flux_scale``) and by
    a per-galaxy amplitude ``exp(a . z)`` read linearly from the latent code. The
    amplitude path matters: GroupNorm normalises every feature map per sample, so the
    convolutional body alone can hardly make one galaxy 30 times brighter than another
    (the flux range of a magnitude-limited sample); ``a`` starts at zero.

    Parameters
    ----------
    size : int
        Output grid size (the intrinsic grid: stamp x oversampling, padded if wanted).
    in_features : int
        Latent (plus conditioning) dimension.
    width : int, optional
        Channels of the last (finest) level; coarser levels double it up to ``max_width``.
    max_width : int, optional
        Channel cap.
    flux_scale : float, optional
        Initial output scale (image units), e.g. the median galaxy peak.
    learn_flux_scale : bool, optional
        Learn ``log(flux_scale)``.

    Examples
    --------
    >>> dec = Decoder(64, in_features=16, flux_scale=100.0)
    >>> img = dec(torch.randn(3, 16))
    >>> img.shape, bool((img >= 0).all())
    (torch.Size([3, 64, 64]), True)
    """

    def __init__(self, size: int, in_features: int, width: int = 32, max_width: int = 256,
                 flux_scale: float = 1.0, learn_flux_scale: bool = True):
        super().__init__()
        n, seed = halvings(size)
        if not flux_scale > 0:
            raise GalgenInputError(f"flux_scale: must be > 0, got {flux_scale!r}")
        self.size, self.seed, self.n_levels = size, seed, n
        widths = [min(width * 2**i, max_width) for i in range(n, -1, -1)]  # coarse -> fine
        self.seed_channels = widths[0]
        self.project = nn.Linear(in_features, widths[0] * seed * seed)
        layers = [_block(widths[0], widths[0])]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _block(cin, cout)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(widths[-1], 1, 1)
        # Start from an (almost) empty sky: softplus(-5) = 0.0067, so an untrained decoder
        # does not paint a pedestal of 0.69 x flux_scale over the whole stamp.
        nn.init.constant_(self.out.bias, -5.0)
        self.amplitude = nn.Linear(in_features, 1)
        nn.init.zeros_(self.amplitude.weight)
        nn.init.zeros_(self.amplitude.bias)
        log_scale = torch.tensor(math.log(flux_scale))
        if learn_flux_scale:
            self.log_flux_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_flux_scale", log_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latent codes into intrinsic images.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.

        Returns
        -------
        torch.Tensor
            ``(B, size, size)``, non-negative.
        """
        x = self.logits(z)
        with torch.autocast(device_type=x.device.type, enabled=False):
            log_amp = self.log_flux_scale + self.amplitude(z.float())[:, :, None]
            return nn.functional.softplus(x) * log_amp.exp()

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The output layer before the positivity map and the amplitude (float32).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.

        Returns
        -------
        torch.Tensor
            ``(B, size, size)`` float32.
        """
        h = self.project(z).view(-1, self.seed_channels, self.seed, self.seed)
        feats = self.body(h)
        # The output layer runs in float32 even under bf16 autocast: a bf16 image has ~0.4%
        # relative precision, tens of noise sigmas in the core of a bright galaxy.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return self.out(feats.float())[:, 0]
