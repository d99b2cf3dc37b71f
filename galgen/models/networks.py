"""Convolutional building blocks for square galaxy stamps: encoder and decoders.

The encoder maps ``(B, H, W)`` images to a feature vector (the VAE puts a Gaussian on
it); the decoder maps latent codes to **non-negative** intrinsic images (softplus)
times a flux scale, on a grid of any size reachable by doubling from a small seed grid
(32, 48, 64, 128, ... pixels, optionally oversampled or padded).
:class:`FluxShapeGenerator` is a decoder whose image is a flux times a softmax shape
seeded by a parametric (Gaussian, Sersic or bulge + disk) profile: the GAN's generator,
and the VAE's decoder with ``decoder="flux-shape"``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..errors import GalgenInputError
from ..physics.sersic import render_sersic, sersic_b

__all__ = ["Encoder", "CompanionLocator", "Decoder", "FluxShapeGenerator", "SeedCoordinates", "TEMPLATE_PROFILES",
           "COMPANION_COORDINATES", "halvings", "log_flux_start"]


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


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the normalisation also written out in elementwise operations.

    torch's forward-mode derivative of ``group_norm`` (<= 2.13) fails on channels-last
    maps and is slow under ``vmap``; :meth:`elementwise` computes the same numbers (up to
    rounding) on a ``(B, H*W, G, C/G)`` view, in any memory layout, and its jvp is 1.4x
    faster (16 batched tangents of the sdss-vae decoder: 95 ms per image against 136).
    """

    def elementwise(self, x: torch.Tensor) -> torch.Tensor:
        """The group normalisation of ``(B, C, H, W)`` maps by elementwise operations.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, C, H, W)``, any memory layout.

        Returns
        -------
        torch.Tensor
            ``(B, C, H, W)``.
        """
        B, C, H, W = x.shape
        y = x.permute(0, 2, 3, 1).reshape(B, H * W, self.num_groups, C // self.num_groups)
        mean = y.mean((1, 3), keepdim=True)
        var = (y - mean).square().mean((1, 3), keepdim=True)
        y = ((y - mean) * torch.rsqrt(var + self.eps)).reshape(B, H, W, C)
        if self.affine:
            y = y * self.weight + self.bias
        return y.permute(0, 3, 1, 2)


def _elementwise_body(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``body(x)`` with every :class:`_GroupNorm` computed by :meth:`_GroupNorm.elementwise`."""
    for layer in body.children():
        if isinstance(layer, nn.Sequential):
            x = _elementwise_body(layer, x)
        elif isinstance(layer, _GroupNorm):
            x = layer.elementwise(x)
        else:
            x = layer(x)
    return x


def _block(cin, cout, groups=8):
    g = math.gcd(groups, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _GroupNorm(g, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), _GroupNorm(g, cout), nn.SiLU())


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


class CompanionLocator(nn.Module):
    """Where in a stamp a second galaxy lies: a soft-argmax over a per-pixel score map.

    Three full-resolution 3 x 3 convolutions (dilations 1, 2, 4: a 15-pixel receptive
    field; GroupNorm, SiLU) read the image and each pixel's coordinates; a 1 x 1
    convolution scores every pixel, and the softmax of the scores weights the pixel
    offsets (the position) and the features (a summary of what lies there); the scores
    are multiplied by a learned gain (from 5). A position
    regressed by a soft-argmax moves with the source by construction (translation
    equivariance), which a flattening encoder has to learn: a width-8 one taught the
    positions of 20,000 galaxies' companions for 1,900 steps still missed them by a
    median 3.8 pixels.

    Parameters
    ----------
    size : int
        Stamp size.
    width : int, optional
        Channels.
    in_channels : int, optional
        Image channels.

    Examples
    --------
    >>> loc = CompanionLocator(32)
    >>> position, features = loc(torch.zeros(2, 32, 32))
    >>> position.shape, features.shape
    (torch.Size([2, 2]), torch.Size([2, 8]))
    """

    def __init__(self, size: int, width: int = 8, in_channels: int = 1):
        super().__init__()
        self.size, self.width = int(size), int(width)
        layers, c = [], in_channels + 2
        for d in (1, 2, 4):
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), _GroupNorm(math.gcd(8, width), width), nn.SiLU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.score = nn.Conv2d(width, 1, 1)
        # scores times a learned gain, from 5: a softmax of the unit-scale scores of a fresh
        # layer is nearly uniform over the stamp (entropy 8.28 of 8.32 nats after 2,500 steps)
        self.log_gain = nn.Parameter(torch.tensor(math.log(5.0)))
        d = torch.arange(self.size, dtype=torch.float32) - self.size // 2
        yy, xx = torch.meshgrid(d, d, indexing="ij")
        self.register_buffer("offsets", torch.stack([xx, yy]).flatten(1), persistent=False)  # (2, S*S): x, y

    def forward(self, x: torch.Tensor):
        """Position and features of the source each stamp's scores pick.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, S, S)`` or ``(B, C, S, S)`` (the encoder's input scaling).

        Returns
        -------
        position : torch.Tensor
            ``(B, 2)``: ``(dx, dy)`` offset from the centre pixel, pixels.
        features : torch.Tensor
            ``(B, width)``: the features averaged with the same weights.
        """
        if x.ndim == 3:
            x = x[:, None]
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise GalgenInputError(f"x: expected (B, C, {self.size}, {self.size}), got {tuple(x.shape)}")
        grid = (self.offsets / (self.size / 2)).to(x.dtype).view(1, 2, self.size, self.size)
        h = self.body(torch.cat([x, grid.expand(len(x), -1, -1, -1)], 1))
        w = torch.softmax(self.log_gain.exp() * self.score(h).flatten(1), dim=1)  # (B, S*S)
        return w @ self.offsets.to(w.dtype).T, torch.einsum("bp,bcp->bc", w, h.flatten(2))


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
        try:  # channels-last feature maps: 1.5-2x faster on CPUs (nearest upsampling above all)
            feats = self.body(h.contiguous(memory_format=torch.channels_last))
        except RuntimeError:  # under vmap or forward-mode AD (group_norm's jvp needs contiguous maps)
            feats = _elementwise_body(self.body, h)
        # The output layer runs in float32 even under bf16 autocast: a bf16 image has ~0.4%
        # relative precision, tens of noise sigmas in the core of a bright galaxy.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return self.out(feats.float())[:, 0]


def bilinear_sample(img: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of images at pixel coordinates, zero outside the grid.

    ``torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=False)`` in pixel units, written with ``gather``: it has forward-mode
    derivatives (``grid_sample`` has none) and a ``vmap`` rule.

    Parameters
    ----------
    img : torch.Tensor
        ``(B, H, W)``.
    xs, ys : torch.Tensor
        ``(B, h, w)`` column and row coordinates (pixel centres at integers).

    Returns
    -------
    torch.Tensor
        ``(B, h, w)``.
    """
    H, W = img.shape[-2:]
    x0, y0 = xs.detach().floor(), ys.detach().floor()
    fx, fy = xs - x0, ys - y0
    flat = img.flatten(1)
    out = torch.zeros_like(xs)
    for ox, wx in ((0, 1 - fx), (1, fx)):
        for oy, wy in ((0, 1 - fy), (1, fy)):
            xi, yi = x0 + ox, y0 + oy
            inside = ((xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)).to(img.dtype)
            idx = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long().flatten(1)
            out = out + wx * wy * inside * flat.gather(1, idx).view(xs.shape)
    return out


def log_flux_start(log_flux, flux_scale: float, size: int) -> list:
    """The ``(mean, std)`` of log flux a :class:`FluxShapeGenerator` starts from.

    Parameters
    ----------
    log_flux : sequence of 2 floats or None
        The data's values (``galgen train`` fills them in); None for the fallback: a
        Gaussian galaxy of peak ``flux_scale`` and sigma ``size / 16``, one e-fold of spread.
    flux_scale : float
        Typical peak (image units).
    size : int
        Intrinsic grid size.

    Returns
    -------
    list of float
        ``[mean, std]``.

    Raises
    ------
    GalgenInputError
        If ``log_flux`` is not a pair.
    """
    if log_flux is None:
        log_flux = (math.log(float(flux_scale) * 2 * math.pi * (size / 16.0) ** 2), 1.0)
    if len(log_flux) != 2:
        raise GalgenInputError(f"log_flux: expected (mean, std), got {log_flux!r}")
    return [float(v) for v in log_flux]


class SeedCoordinates(nn.Module):
    """The seed parameters of a :class:`FluxShapeGenerator` as latent coordinates.

    ``h_j = loc_j + exp(log_scale_j) z_j`` for the first ``k`` coordinates of ``z``
    (``k`` = 3, 4 or 9 for the Gaussian, Sersic and bulge + disk seeds), ``loc`` and
    ``log_scale`` learned, starting from a population of seeds about ``s0`` in size, round
    to ``|g| ~ 0.4``, with B/T spread over (0.05, 0.8) and centres within half a pixel.
    With ``profile="companion"``, the seven parameters of :class:`FluxShapeGenerator`'s
    companion from the coordinates ``start`` to ``start + 7``, starting faint (flux
    fraction about 0.03) and anywhere within about 8 pixels of the centre. With
    ``profile="bulge-index"``, the one parameter of a bulge + disk seed's bulge Sersic
    index, starting at ``n = 4`` for ``z = 0``.

    Parameters
    ----------
    profile : {"gaussian", "sersic", "bulge-disk", "companion", "bulge-index"}
        The seed profile (:data:`TEMPLATE_PROFILES`), the companion, or the bulge's index.
    start : int, optional
        The first coordinate read.

    Examples
    --------
    >>> SeedCoordinates("bulge-disk")(torch.zeros(2, 16)).shape
    torch.Size([2, 9])
    """

    def __init__(self, profile: str, start: int = 0):
        super().__init__()
        k = _MOMENTS[profile]
        loc, scale = torch.zeros(k), torch.full((k,), 0.5)  # log size, shear h1, h2 (| t_n | t_bt, ...)
        if profile == "sersic":
            loc[3], scale[3] = 0.0, 1.0
        elif profile == "bulge-disk":
            loc[3:5], scale[3:5] = torch.tensor([-1.0, -0.7]), torch.tensor([1.5, 0.7])  # t_bt, log size of the bulge
        elif profile == "companion":  # t_f, x, y (pixels), log size, shear h1, h2, t_n: faint (f ~ 0.03), anywhere
            loc = torch.tensor([-3.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            scale = torch.tensor([1.0, 8.0, 8.0, 0.7, 0.5, 0.5, 1.0])
        elif profile == "bulge-index":  # t_n of n = 1 + 5 sigmoid(t_n): n = 4 at z = 0, 2.8 / 5.0 at z = -1 / +1
            loc, scale = torch.tensor([math.log(1.5)]), torch.tensor([1.0])
        self.k, self.start = k, int(start)
        self.loc = nn.Parameter(loc)
        self.log_scale = nn.Parameter(scale.log())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Seed parameters ``h`` of latent codes.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, d)``, ``d >= k``.

        Returns
        -------
        torch.Tensor
            ``(B, k)``.
        """
        return self.loc + self.log_scale.exp() * z[:, self.start:self.start + self.k]


#: Radial profiles of :class:`FluxShapeGenerator`'s seed.
TEMPLATE_PROFILES = ("gaussian", "sersic", "bulge-disk")
#: Outputs of the moments network per seed profile.
_MOMENTS = {"gaussian": 3, "sersic": 4, "bulge-disk": 9, "companion": 7, "bulge-index": 1}
#: Latent coordinates of :class:`FluxShapeGenerator`'s companion (``companion=True``).
COMPANION_COORDINATES = _MOMENTS["companion"]


def _companion_coordinates(companion, start, in_features, seed, gate) -> list:
    """The input coordinates that a :class:`FluxShapeGenerator`'s companion reads alone
    (none for a network companion), after checking that they fit beside the ``seed``'s
    first coordinates and the gate's."""
    if start is None:
        return []
    k = COMPANION_COORDINATES
    if not companion:
        raise GalgenInputError("companion_coordinate: given without companion=True")
    if isinstance(start, bool) or not isinstance(start, int) or not seed <= start <= in_features - k:
        raise GalgenInputError(f"companion_coordinate: the companion's {k} coordinates must start in "
                               f"[{seed}, {in_features - k}] (after the seed's {seed}), got {start!r}")
    if gate is not None and start <= gate < start + k:
        raise GalgenInputError(f"companion_coordinate: the gate's coordinate {gate} lies in the companion's "
                               f"({start}-{start + k - 1})")
    return list(range(start, start + k))


def _bounded_shear(h: torch.Tensor) -> torch.Tensor:
    """Reduced shear ``g = 0.9 h / sqrt(1 + |h|^2)`` (``|g| < 0.9``) of ``(B, 2)`` network outputs."""
    return 0.9 * h / torch.sqrt(1 + h.square().sum(1, keepdim=True))


_GATE_GAIN = 40.0
#: ``w = sigmoid(LATENT_GATE_GAIN z_k)``: the ``"latent"`` symmetry gate of :class:`FluxShapeGenerator`.
LATENT_GATE_GAIN = 4.0
#: Kinds of :class:`FluxShapeGenerator`'s ``symmetry_gate``.
SYMMETRY_GATES = (None, "network", "latent")


def point_reflect(images: torch.Tensor) -> torch.Tensor:
    """Images rotated by 180 degrees about pixel ``(H//2, W//2)``, the package's centre.

    Pixel ``(i, j)`` of the result is pixel ``(2 c_y - i, 2 c_x - j)`` of the input; on an
    even grid the first row and column have no partner inside the stamp and wrap onto
    themselves.

    Parameters
    ----------
    images : torch.Tensor
        ``(..., H, W)``.

    Returns
    -------
    torch.Tensor
        Same shape.

    Examples
    --------
    >>> x = torch.zeros(4, 4); x[2, 3] = 1.0
    >>> point_reflect(x).nonzero().tolist()
    [[2, 1]]
    """
    h, w = images.shape[-2:]
    return torch.roll(images.flip(-2, -1), shifts=(1 - h % 2, 1 - w % 2), dims=(-2, -1))


class FluxShapeGenerator(nn.Module):
    """Generator whose output is a total flux times a shape: ``F * softmax(logits)``.

    The shape logits come from a convolutional :class:`Decoder` body minus
    :meth:`template`, a centred elliptical Gaussian whose size and ellipticity come from a
    small network of ``z`` (centre at pixel ``(size//2, size//2)``, the package's
    convention): an untrained generator draws blobs of about the typical size rather
    than noise spread over the stamp, and sizes spanning a decade and ellipticities are
    three scalars rather than a task for the convolutions. The log flux is
    ``log_flux_mean + log_flux_std * h(z)`` with ``h`` a two-layer network; the image
    sums to ``F`` exactly (the flux falling outside the intrinsic grid is zero).

    Parameters
    ----------
    size : int
        Intrinsic grid size (stamp x oversampling).
    in_features : int
        Latent (plus conditioning) dimension.
    width : int, optional
        Channels of the decoder's finest level.
    max_width : int, optional
        Channel cap.
    log_flux : tuple of float, optional
        ``(mean, std)`` of the natural log of the total flux (image units) that the
        flux head starts from (the data's values: :meth:`galgen.train.TrainingData.statistics`).
    template_sigma : float, optional
        ``s0`` in intrinsic pixels; default ``size / 16``.
    profile : {"gaussian", "sersic", "bulge-disk"}, optional
        Radial profile of the seed: a Gaussian, a Sersic profile whose index is a fourth
        output of the moments network (cusps and wings of bulges without asking the body),
        or a pixel-integrated de Vaucouleurs bulge plus exponential disk
        (:func:`~galgen.physics.render_sersic`), each with its own size and shear, the
        bulge-to-total ratio a seventh output and their common centre offset the eighth
        and ninth: the parametric bulge + disk galaxy of
        :class:`~galgen.models.SersicModel`, so the body's output only has to hold what
        that model cannot draw (arms, bars, clumps, companions).
    softening : float, optional
        Squared radius (intrinsic pixels^2) added to ``r^2`` in the Sersic seed: its cusp
        is that of ``sqrt(r^2 + softening)`` (the profile is within 1% of the Sersic from
        about 6 pixels out at 0.25, from 1 pixel at 1e-4).
    warp_body : bool, optional
        Resample the body's logits by the seed's shear before adding them, so that every
        feature the body draws (a concentrated core included) takes the galaxy's
        ellipticity and orientation. Without it a round core drawn by the body made the
        sdss-gan galaxies rounder than their seeds (HSM ``|e|`` 0.31 against 0.50).
    seed_latents : bool, optional
        The seed's parameters are the first latent coordinates through a learned
        per-coordinate affine map (:class:`SeedCoordinates`) instead of a network of
        the whole code: every seed galaxy is reachable, and a fit moves its parameters as
        directly as a parametric fit does (a network's seeds lie on the manifold it
        learned: matching the bulge + disk fits of 32 plain galaxies needed ``|z|`` up to
        63 and still missed their shears by 0.05).
    symmetry_gate : {None, "network", "latent"}, optional
        Split each image into its part point-symmetric about the centre pixel and the
        rest, and weight the rest by a gate ``w`` in ``(0, 1)`` (:meth:`asymmetry_gate`):
        ``image = S + w (I - S)``, ``S = (I + R I) / 2``, ``R`` the point reflection. The
        flux is unchanged and the image stays non-negative; at ``w -> 0`` the galaxy is
        exactly point-symmetric, which a body of shared convolutions does not draw by
        itself (the bulges of ``sdss-vae-bd``'s reconstructions had a median asymmetry of
        0.02 where the real ones have 1e-4, and symmetrising them raised their likelihood
        on 94% of 381 held-out bulges). ``"network"``: ``w = sigmoid(gate_gain h(z))``, ``h`` a
        two-layer network starting at ``w = 0.5`` (the factor 40 makes Adam's steps on it
        40 times larger: with a factor 4 and lr 1e-4 it moved by 0.005 in 1,000 steps).
        ``"latent"``: ``w = sigmoid(4 z_k)``, ``z_k`` the input coordinate
        ``gate_coordinate``, which no other part of the generator reads (the body, the
        flux and the seed see it as zero) and which a MAP fit moves, as the seed's
        coordinates (``seed_latents``).
    gate_coordinate : int, optional
        The input coordinate of the ``"latent"`` gate.
    gate_gain : float, optional
        The ``"network"`` gate's factor: ``w = sigmoid(gate_gain h(z))``.
    companion : bool, optional
        Add a second galaxy (:meth:`companion_parameters`): a pixel-integrated Sersic profile
        with its own flux fraction ``f``, centre anywhere on the grid, size, shear and
        index, outside the body and the gate: ``image = F ((1 - f) shape + f C)``, ``C``
        its unit-flux image. The body's shared convolutions draw a blob only where the
        code's features put one, and the decoders of ``sdss-vae-bd`` reconstructed held-out
        galaxies with companions at a median asymmetry of 0.09 where the noisy stamps have
        0.21 (docs/models.md); it also takes the brightest off-centre knot of an irregular.
    companion_coordinate : int, optional
        With ``companion=True``: the first of the :data:`COMPANION_COORDINATES` input
        coordinates that the companion reads through a per-coordinate affine map
        (:class:`SeedCoordinates`) and that no other part of the generator reads (a fit
        moves them as a parametric fit moves a second galaxy); ``None``: a two-layer
        network of the whole input, starting at the faint companion of ``h = 0``.
    bulge_index_coordinate : int, optional
        With ``profile="bulge-disk"`` and ``seed_latents``: the input coordinate that sets
        the bulge's Sersic index, ``n = 1 + 5 sigmoid(h)`` with ``h`` its per-coordinate
        affine map (:class:`SeedCoordinates`, ``n = 4`` at 0), read by nothing else;
        ``None``: a de Vaucouleurs bulge (``n = 4``). Simulated and real bulges span
        ``n`` of about 2-6; at the MAP codes of 1,000 rich training galaxies the
        fixed-index decoder's bulge-dominated galaxies are less concentrated than their
        truth by 0.008 for n in [3, 3.7) and by 0.041 for n >= 5 (docs/models.md, where
        the free index is measured too: at SDSS depth the fits hardly move it).

    Examples
    --------
    >>> g = FluxShapeGenerator(32, in_features=8, width=8, log_flux=(math.log(500.0), 1.0))
    >>> img = g(torch.zeros(2, 8))
    >>> img.shape, bool((img >= 0).all())
    (torch.Size([2, 32, 32]), True)
    """

    def __init__(self, size: int, in_features: int, width: int = 32, max_width: int = 256,
                 log_flux=(0.0, 1.0), template_sigma: float | None = None, profile: str = "gaussian",
                 warp_body: bool = False, softening: float = 0.25, seed_latents: bool = False,
                 symmetry_gate: str | None = None, gate_coordinate: int | None = None,
                 gate_gain: float = _GATE_GAIN, companion: bool = False, companion_coordinate: int | None = None,
                 bulge_index_coordinate: int | None = None):
        super().__init__()
        if symmetry_gate not in SYMMETRY_GATES:
            raise GalgenInputError(f"symmetry_gate: one of {list(SYMMETRY_GATES)}, got {symmetry_gate!r}")
        if symmetry_gate == "latent" and not (isinstance(gate_coordinate, int) and 0 <= gate_coordinate < in_features):
            raise GalgenInputError(f"gate_coordinate: the latent gate needs an input coordinate in [0, {in_features}), "
                                   f"got {gate_coordinate!r}")
        if profile not in TEMPLATE_PROFILES:
            raise GalgenInputError(f"profile: one of {list(TEMPLATE_PROFILES)}, got {profile!r}")
        own = _companion_coordinates(companion, companion_coordinate, in_features,
                                     _MOMENTS[profile] if seed_latents else 0, gate_coordinate)
        self.bulge_index = None
        if bulge_index_coordinate is not None:
            b = bulge_index_coordinate
            if profile != "bulge-disk" or not seed_latents:
                raise GalgenInputError("bulge_index_coordinate: an option of the bulge-disk seed with seed_latents")
            if isinstance(b, bool) or not isinstance(b, int) or not _MOMENTS[profile] <= b < in_features \
                    or b in own or (symmetry_gate == "latent" and b == gate_coordinate):
                raise GalgenInputError(f"bulge_index_coordinate: a coordinate in [{_MOMENTS[profile]}, {in_features}) "
                                       f"that neither the companion nor the gate reads, got {b!r}")
            self.bulge_index = SeedCoordinates("bulge-index", start=b)
            own = own + [b]
        self.profile, self.warp_body, self.softening = profile, bool(warp_body), float(softening)
        mean, std = (float(v) for v in log_flux)
        if not (math.isfinite(mean) and std > 0):
            raise GalgenInputError(f"log_flux: needs a finite mean and a positive std, got {log_flux!r}")
        self.size = int(size)
        self.shape = Decoder(self.size, in_features, width=width, max_width=max_width, learn_flux_scale=False)
        # The body starts switched off (zero output layer, as a zero-initialised residual
        # branch): training begins from the parametric galaxy (flux, size, ellipticity)
        # and the body adds morphology as the critic asks for it. With a random output
        # layer, the first 500 steps drew satellite blobs around every galaxy.
        nn.init.zeros_(self.shape.out.weight)
        nn.init.zeros_(self.shape.out.bias)
        self.flux = nn.Sequential(nn.Linear(in_features, 64), nn.SiLU(), nn.Linear(64, 1))
        if seed_latents:
            if in_features < _MOMENTS[profile]:
                raise GalgenInputError(f"seed_latents: the {profile!r} seed needs {_MOMENTS[profile]} latent "
                                       f"dimensions, got {in_features}")
            if symmetry_gate == "latent" and gate_coordinate < _MOMENTS[profile]:
                raise GalgenInputError(f"gate_coordinate: {gate_coordinate} is one of the seed's coordinates "
                                       f"(0-{_MOMENTS[profile] - 1})")
            self.moments = SeedCoordinates(profile)
        else:
            self.moments = nn.Sequential(nn.Linear(in_features, 64), nn.SiLU(),
                                         nn.Linear(64, _MOMENTS[profile]))
        s0 = float(template_sigma) if template_sigma is not None else self.size / 16.0
        self.template_sigma = s0
        r = (torch.arange(self.size, dtype=torch.float32) - self.size // 2) / s0
        y, x = torch.meshgrid(r, r, indexing="ij")
        # the three quadratic forms the template combines: x^2 + y^2, x^2 - y^2, 2xy (in units of s0)
        self.register_buffer("quadratics", torch.stack([x**2 + y**2, x**2 - y**2, 2 * x * y]), persistent=False)
        # pixel offsets (dy, dx) from the centre pixel, for the warp
        d = torch.arange(self.size, dtype=torch.float32) - self.size // 2
        self.register_buffer("offsets", torch.stack(torch.meshgrid(d, d, indexing="ij")), persistent=False)
        self.register_buffer("log_flux_mean", torch.tensor(mean))
        self.register_buffer("log_flux_std", torch.tensor(std))
        self.symmetry_gate, self.gate_coordinate, self.gate_gain = symmetry_gate, gate_coordinate, float(gate_gain)
        # the coordinates read by the latent gate alone and by the companion alone
        own = own + ([gate_coordinate] if symmetry_gate == "latent" else [])
        keep = torch.ones(in_features)
        keep[own] = 0.0
        self.register_buffer("_network_mask", keep if own else None, persistent=False)
        self.companion = None
        if companion and companion_coordinate is not None:
            self.companion = SeedCoordinates("companion", start=companion_coordinate)
        elif companion:
            self.companion = nn.Sequential(nn.Linear(in_features, 64), nn.SiLU(), nn.Linear(64, COMPANION_COORDINATES))
            nn.init.zeros_(self.companion[2].weight)
            with torch.no_grad():
                self.companion[2].bias.copy_(SeedCoordinates("companion").loc)
        self.gate = None
        if symmetry_gate == "network":
            self.gate = nn.Sequential(nn.Linear(in_features, 64), nn.SiLU(), nn.Linear(64, 1))
            nn.init.zeros_(self.gate[2].weight)
            nn.init.zeros_(self.gate[2].bias)  # w = 0.5

    def log_flux(self, z: torch.Tensor) -> torch.Tensor:
        """Natural log of the total flux of each generated galaxy.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` float32.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.log_flux_mean + self.log_flux_std * self.flux(self._networks_input(z).float())[:, 0]

    def shape_parameters(self, z: torch.Tensor) -> dict:
        """Size, reduced shear and (for the Sersic template) index of each galaxy's seed.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.

        Returns
        -------
        dict of torch.Tensor
            ``log_size`` (``ln(s / s0)``), ``g1``, ``g2`` and, with ``profile="sersic"``,
            ``n`` (in ``[0.5, 6]``, about 1 at initialisation); with
            ``profile="bulge-disk"`` the first three are the disk's, and ``bt``
            (bulge-to-total flux ratio, ``sigmoid(h_3)``), ``log_size_bulge``,
            ``g1_bulge``, ``g2_bulge`` the bulge's, ``dx``, ``dy`` the common centre's
            offset from the centre pixel (intrinsic pixels, ``h_7``, ``h_8``), and with a
            ``bulge_index_coordinate`` the bulge's Sersic index ``n_bulge``; each
            ``(B,)`` float32.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.moments(self._networks_input(z).float())
            g = _bounded_shear(h[:, 1:3])
            out = {"log_size": h[:, 0], "g1": g[:, 0], "g2": g[:, 1]}
            if self.profile == "sersic":
                out["n"] = 0.5 + 5.5 * torch.sigmoid(h[:, 3] - 2.2)
            elif self.profile == "bulge-disk":
                gb = _bounded_shear(h[:, 5:7])
                out.update(bt=torch.sigmoid(h[:, 3]), log_size_bulge=h[:, 4], g1_bulge=gb[:, 0], g2_bulge=gb[:, 1],
                           dx=h[:, 7], dy=h[:, 8])
                if self.bulge_index is not None:
                    out["n_bulge"] = 1.0 + 5.0 * torch.sigmoid(self.bulge_index(z.float())[:, 0])
            return out

    def template(self, z: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """``-log`` of each galaxy's elliptical seed profile, up to a constant.

        With ``r^2 = x^T M x``, ``M = S(g)^T S(g) / s^2``, ``S(g) = [[1 - g1, -g2], [-g2,
        1 + g1]] / sqrt(1 - |g|^2)`` the unit-determinant shear matrix (GalSim's
        convention), the size ``s = s0 exp(h_0)`` and the reduced shear
        ``g = 0.9 h / sqrt(1 + |h|^2)``, ``h = (h_1, h_2)``, all from the moments network:
        ``r^2 / 2`` for the Gaussian profile (``s`` its sigma); ``b_n (r^2 + eps)^(1/2n)``
        for the Sersic profile (``s`` its half-light radius, ``n`` from ``h_3``, ``eps``
        the ``softening`` that keeps the cusp's gradient finite); for the bulge + disk
        profile ``-log(bt B + (1 - bt) D)``, ``B`` and ``D`` the pixel-integrated unit-flux
        n = 4 (or ``n_bulge``) and n = 1 Sersic images of half-light radii ``s0 exp(h_4)`` and ``s0 exp(h_0)``
        about the centre pixel plus ``(h_7, h_8)`` (floored at 1e-30 of the flux per pixel).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.
        params : dict, optional
            :meth:`shape_parameters` of ``z``, if already computed.

        Returns
        -------
        torch.Tensor
            ``(B, size, size)`` float32.
        """
        p = self.shape_parameters(z) if params is None else params
        if self.profile == "bulge-disk":
            s0 = self.template_sigma
            centre = torch.stack([p["dx"], p["dy"]], 1) + float(self.size // 2)
            kw = dict(size=self.size, scale=1.0, centre=centre, check=False)  # |g| < 0.9 by construction
            bulge = render_sersic(s0 * p["log_size_bulge"].exp(), p.get("n_bulge", 4.0), p["g1_bulge"],
                                  p["g2_bulge"], flux=p["bt"], **kw)
            disk = render_sersic(s0 * p["log_size"].exp(), 1.0, p["g1"], p["g2"], flux=1 - p["bt"], **kw)
            return -torch.log((bulge + disk).clamp_min(1e-30))
        g1, g2 = p["g1"], p["g2"]
        gg = g1 * g1 + g2 * g2
        # S^T S = [[(1-g1)^2 + g2^2, -2 g2], [-2 g2, (1+g1)^2 + g2^2]] / (1 - |g|^2)
        c_r2 = (1 + gg) / (1 - gg)          # coefficient of x^2 + y^2
        c_diff = -2 * g1 / (1 - gg)         # coefficient of x^2 - y^2
        c_xy = -2 * g2 / (1 - gg)           # coefficient of 2xy
        coef = torch.stack([c_r2, c_diff, c_xy], dim=1) * torch.exp(-2 * p["log_size"])[:, None]
        r2 = torch.einsum("bk,kyx->byx", coef, self.quadratics)  # (r / s)^2
        if self.profile == "gaussian":
            return r2 / 2
        n = p["n"][:, None, None]
        eps = self.softening * torch.exp(-2 * p["log_size"])[:, None, None] / self.template_sigma ** 2
        return sersic_b(n) * (r2 + eps).pow(1 / (2 * n))

    def _networks_input(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` as the body, flux and seed networks read it: without the coordinates of a
        latent gate and of a companion."""
        return z if self._network_mask is None else z * self._network_mask.to(z.dtype)

    def companion_parameters(self, z: torch.Tensor) -> dict:
        """The companion of each galaxy (``companion=True``).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.

        Returns
        -------
        dict of torch.Tensor
            Each ``(B,)`` float32: ``fraction`` of the total flux (``sigmoid(h_0)``),
            ``dx``, ``dy`` its centre's offset from the centre pixel (intrinsic pixels,
            ``a tanh(h / a)`` with ``a = size / 2 - 1``: on the grid), ``log_size``
            (``ln(hlr / s0)``), reduced shear ``g1``, ``g2`` and Sersic index ``n``
            (``0.5 + 3.5 sigmoid(h_6)``).

        Raises
        ------
        GalgenInputError
            If the generator has no companion.
        """
        if self.companion is None:
            raise GalgenInputError("companion_parameters: this generator has no companion (companion=False)")
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.companion(z.float())
            a = self.size / 2 - 1
            g = _bounded_shear(h[:, 4:6])
            return {"fraction": torch.sigmoid(h[:, 0]), "dx": a * torch.tanh(h[:, 1] / a),
                    "dy": a * torch.tanh(h[:, 2] / a), "log_size": h[:, 3], "g1": g[:, 0], "g2": g[:, 1],
                    "n": 0.5 + 3.5 * torch.sigmoid(h[:, 6])}

    def companion_image(self, z: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """Unit-flux image of each galaxy's companion (the light on the grid, renormalised).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.
        params : dict, optional
            :meth:`companion_parameters` of ``z``, if already computed.

        Returns
        -------
        torch.Tensor
            ``(B, size, size)`` float32, each summing to 1.
        """
        p = self.companion_parameters(z) if params is None else params
        centre = torch.stack([p["dx"], p["dy"]], 1) + float(self.size // 2)
        img = render_sersic(self.template_sigma * p["log_size"].exp(), p["n"], p["g1"], p["g2"], size=self.size,
                            scale=1.0, centre=centre, check=False)  # |g| < 0.9 by construction
        return img / img.sum((1, 2), keepdim=True).clamp_min(1e-30)

    def asymmetry_gate(self, z: torch.Tensor) -> torch.Tensor:
        """Weight of the part of each image that is not point-symmetric (``symmetry_gate``).

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` float32 in ``(0, 1)``; ones without a gate.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            if self.symmetry_gate == "network":
                return torch.sigmoid(self.gate_gain * self.gate(z.float())[:, 0])
            if self.symmetry_gate == "latent":
                return torch.sigmoid(LATENT_GATE_GAIN * z[:, self.gate_coordinate].float())
            return torch.ones(len(z), device=z.device)

    def _warp(self, logits: torch.Tensor, p: dict) -> torch.Tensor:
        """The body's logits resampled so that a round feature takes the seed's shear ``p``.

        Output pixel ``x`` reads the body at ``S(g) (x - c) + c`` (``c`` the centre pixel),
        bilinearly, zero outside: what ``grid_sample`` does, written with ``gather`` so
        that forward-mode derivatives (the Levenberg-Marquardt fitter's Jacobians) exist.
        """
        g1, g2 = (p[k][:, None, None] for k in ("g1", "g2"))
        k = torch.rsqrt(1 - g1 * g1 - g2 * g2)
        dy, dx = self.offsets[0], self.offsets[1]
        c = float(self.size // 2)
        xs = k * ((1 - g1) * dx - g2 * dy) + c
        ys = k * (-g2 * dx + (1 + g1) * dy) + c
        return bilinear_sample(logits.float(), xs, ys)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Intrinsic images.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, in_features)``.

        Returns
        -------
        torch.Tensor
            ``(B, size, size)`` float32, non-negative, each summing to its flux.
        """
        logits = self.shape.logits(self._networks_input(z))
        with torch.autocast(device_type=logits.device.type, enabled=False):
            params = self.shape_parameters(z)  # once: the warp and the seed share them
            if self.warp_body:
                logits = self._warp(logits, params)
            logits = (logits - self.template(z, params)).flatten(1)
            shape = torch.softmax(logits, dim=1).view(-1, self.size, self.size)
            if self.symmetry_gate is not None:
                symmetric = 0.5 * (shape + point_reflect(shape))
                shape = symmetric + self.asymmetry_gate(z)[:, None, None] * (shape - symmetric)
            if self.companion is not None:
                p = self.companion_parameters(z)
                f = p["fraction"][:, None, None]
                shape = (1 - f) * shape + f * self.companion_image(z, p)
            return shape * self.log_flux(z).exp()[:, None, None]


@functools.lru_cache(maxsize=16)
def _rings(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H*W, rings)`` one-hot membership of each pixel in its ring about ``(H//2, W//2)``, and
    the same divided by each ring's size: built once per grid, device and dtype (the rings
    found in float64, whatever the images' precision), never written to."""
    with torch.inference_mode(False):  # usable by autograd even if first built under inference mode
        y = torch.arange(h, dtype=torch.float64) - h // 2
        x = torch.arange(w, dtype=torch.float64) - w // 2
        ring = torch.sqrt(y[:, None] ** 2 + x[None, :] ** 2).round().long().flatten()
        member = torch.nn.functional.one_hot(ring).to(torch.float64)
        return member.to(device=device, dtype=dtype), (member / member.sum(0)).to(device=device, dtype=dtype)


def ring_profile(images: torch.Tensor) -> torch.Tensor:
    """Each image's azimuthal average about pixel ``(H//2, W//2)``, as a radial profile.

    Pixels are grouped by their distance to the centre rounded to whole pixels; ring ``k``
    holds the pixels at distance ``k`` (ring 0 is the centre pixel alone), out to the
    corners.

    Parameters
    ----------
    images : torch.Tensor
        ``(..., H, W)``.

    Returns
    -------
    torch.Tensor
        ``(..., rings)``, the mean of each ring; ``rings`` is the largest rounded
        distance plus one (46 on a 64 x 64 stamp).

    Examples
    --------
    >>> x = torch.zeros(5, 5); x[2, 3] = 4.0
    >>> ring_profile(x)
    tensor([0.0000, 0.5000, 0.0000, 0.0000])
    """
    return images.flatten(-2) @ _rings(*images.shape[-2:], images.device, images.dtype)[1]


def azimuthal_mean(images: torch.Tensor) -> torch.Tensor:
    """Each image's azimuthal average about pixel ``(H//2, W//2)``, as an image.

    Pixels are grouped by their distance to the centre rounded to whole pixels; every pixel
    receives the mean of its ring (:func:`ring_profile`). ``images - azimuthal_mean(images)``
    keeps what is not round (arms, bars, clumps, companions, ellipticity) and drops the
    radial profile (size, concentration). The map is an orthogonal projection of the pixel
    space: applied twice it changes nothing, and what it keeps is orthogonal to what it drops.

    Parameters
    ----------
    images : torch.Tensor
        ``(..., H, W)``.

    Returns
    -------
    torch.Tensor
        Same shape.

    Examples
    --------
    >>> x = torch.zeros(5, 5); x[2, 3] = 4.0
    >>> azimuthal_mean(x)[2, 1].item(), azimuthal_mean(x)[2, 2].item()  # ring 1: 8 pixels
    (0.5, 0.0)
    """
    member, share = _rings(*images.shape[-2:], images.device, images.dtype)
    return ((images.flatten(-2) @ share) @ member.T).view(images.shape)


def gini_coefficient(values: torch.Tensor, use: torch.Tensor | None = None) -> torch.Tensor:
    """Gini coefficient of ``|values|`` over the ``use`` entries of each galaxy (Lotz et al. 2004).

    ``G = sum_i (2 i - n - 1) |x|_(i) / ((n - 1) sum_i |x|_i)`` over the ``n`` used pixels
    sorted by ``|x|``: 0 when the light is spread evenly, 1 when one pixel holds it all.
    Differentiable in ``values`` (through the sort); the unused entries are pushed to the
    end of each sorted row and counted out.

    Parameters
    ----------
    values : torch.Tensor
        ``(B, ...)``: each galaxy's pixels (flattened from dimension 1).
    use : torch.Tensor, optional
        Boolean, ``values``' shape: the pixels that count (default: all).

    Returns
    -------
    torch.Tensor
        ``(B,)``; NaN where fewer than two pixels count or their light is zero.

    Examples
    --------
    >>> gini_coefficient(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]]))
    tensor([0., 1.])
    """
    values = values.flatten(1)
    use = torch.ones_like(values, dtype=torch.bool) if use is None else use.flatten(1)
    m = values.shape[1]
    vals = torch.where(use, values.abs(), torch.full_like(values, float("inf"))).sort(1).values
    vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
    cnt = use.sum(1).to(values.dtype)
    idx = torch.arange(1, m + 1, dtype=values.dtype, device=values.device)[None]
    tot = vals.sum(1)
    g = ((2 * idx - cnt[:, None] - 1) * vals).sum(1) / ((cnt - 1) * tot).clamp_min(torch.finfo(values.dtype).tiny)
    return torch.where((cnt > 1) & (tot > 0), g, torch.full_like(g, float("nan")))


def detection_mask(images: torch.Tensor, nsigma: float = 2.0, border: int = 4) -> torch.Tensor:
    """The pixels of noisy stamps that hold a galaxy's light, without a variance map.

    A pixel counts where its 3 x 3 mean exceeds ``nsigma`` times the noise of such a mean,
    the noise being each stamp's robust rms (1.4826 x the median absolute deviation) over
    a frame of ``border`` pixels along the edges, divided by 3. The 3 x 3 pixels about
    the centre ``(H//2, W//2)`` always count. Not differentiable (a selection).

    Parameters
    ----------
    images : torch.Tensor
        ``(B, H, W)`` detector images, background-subtracted.
    nsigma : float, optional
        Threshold in units of the noise of a 3 x 3 mean.
    border : int, optional
        Width of the edge frame the noise is measured on.

    Returns
    -------
    torch.Tensor
        ``(B, H, W)`` boolean.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(1, 32, 32, generator=g); x[0, 12:20, 12:20] += 5.0
    >>> m = detection_mask(x)
    >>> bool(m[0, 12:20, 12:20].all()), int(m[0, :8].sum()) < 10
    (True, True)
    """
    x = images.detach()
    b, h, w = x.shape
    rms = _frame_rms(x, border)
    smooth = torch.nn.functional.avg_pool2d(x[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    mask = smooth > nsigma * (rms / 3.0)[:, None, None]
    mask[:, h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2] = True
    return mask


def _frame_rms(images: torch.Tensor, border: int = 4) -> torch.Tensor:
    """``(B,)`` robust rms (1.4826 x the median absolute deviation) of each stamp's edge frame
    of ``border`` pixels: the noise of a pixel where the galaxy's light does not reach."""
    x = images.detach()
    frame = torch.cat([x[:, :border].flatten(1), x[:, -border:].flatten(1),
                       x[:, border:-border, :border].flatten(1), x[:, border:-border, -border:].flatten(1)], 1)
    med = frame.median(1, keepdim=True).values
    return 1.4826 * (frame - med).abs().median(1).values


@functools.lru_cache(maxsize=16)
def _radial_order(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Pixel indices of an ``(H, W)`` grid sorted by distance to ``(H//2, W//2)``."""
    with torch.inference_mode(False):
        y = torch.arange(h, dtype=torch.float64) - h // 2
        x = torch.arange(w, dtype=torch.float64) - w // 2
        return torch.argsort((y[:, None] ** 2 + x[None, :] ** 2).flatten(), stable=True).to(device)


def growth_radii(images: torch.Tensor, use: torch.Tensor | None = None, fractions=(0.2, 0.5, 0.8)) -> torch.Tensor:
    """Radii about ``(H//2, W//2)`` holding given fractions of the light of ``use`` (pixels).

    The curve of growth adds the used pixels in order of distance to the centre; after
    ``k`` pixels it stands at the radius of a circle of ``k`` pixels' area,
    ``sqrt(k / pi)``, and each radius is where it crosses its fraction of the used light
    (linear interpolation). Differentiable in ``images``.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, H, W)``.
    use : torch.Tensor, optional
        ``(B, H, W)`` boolean, the pixels that count (default: all), e.g.
        :func:`detection_mask`.
    fractions : sequence of float, optional
        Fractions of the used light, each in (0, 1).

    Returns
    -------
    torch.Tensor
        ``(B, len(fractions))``; NaN where the used light is not positive.

    Examples
    --------
    >>> import galsim
    >>> im = galsim.Exponential(half_light_radius=4.0).drawImage(nx=64, ny=64, scale=1.0).array
    >>> round(float(growth_radii(torch.from_numpy(im)[None], fractions=(0.5,))[0, 0]), 1)
    4.1
    """
    b, h, w = images.shape
    order = _radial_order(h, w, images.device)
    x = images.flatten(1) if use is None else torch.where(use, images, torch.zeros_like(images)).flatten(1)
    grow = x[:, order].cumsum(1)
    total = grow[:, -1:]
    k = torch.arange(1, h * w + 1, dtype=images.dtype, device=images.device)
    radius = torch.sqrt(k / math.pi)[None].expand(b, -1)
    radii = []
    for frac in fractions:
        target = float(frac) * total
        j = (grow >= target).to(torch.int8).argmax(1, keepdim=True)
        prev = (j - 1).clamp_min(0)
        g0 = torch.where(j > 0, grow.gather(1, prev), torch.zeros_like(target))
        r0 = torch.where(j > 0, radius.gather(1, prev), torch.zeros_like(target))
        g1, r1 = grow.gather(1, j), radius.gather(1, j)
        t = ((target - g0) / (g1 - g0).clamp_min(torch.finfo(images.dtype).tiny)).clamp(0, 1)
        radii.append((r0 + t * (r1 - r0))[:, 0])
    out = torch.stack(radii, 1)
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def light_concentration(images: torch.Tensor, use: torch.Tensor | None = None) -> torch.Tensor:
    """Concentration ``5 log10(r80 / r20)`` of the light of ``use`` about ``(H//2, W//2)``.

    ``r20`` and ``r80`` from :func:`growth_radii`. Differentiable in ``images``: a
    surrogate of Conselice's (2003) concentration on the stamp's pixels, for training
    (the evaluation's is :func:`galgen.evaluation.morphology_statistics`'s, within 1.5
    Petrosian radii of the asymmetry centre). An exponential disk has about 2.7 on either.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, H, W)``.
    use : torch.Tensor, optional
        ``(B, H, W)`` boolean, the pixels that count (default: all), e.g.
        :func:`detection_mask`.

    Returns
    -------
    torch.Tensor
        ``(B,)``; NaN where the used light is not positive.

    Examples
    --------
    >>> import galsim
    >>> im = galsim.Exponential(half_light_radius=3.0).drawImage(nx=64, ny=64, scale=1.0).array
    >>> round(float(light_concentration(torch.from_numpy(im)[None])[0]), 2)
    2.75
    """
    r = growth_radii(images, use, (0.2, 0.8))
    return 5 * torch.log10(r[:, 1] / r[:, 0].clamp_min(torch.finfo(images.dtype).tiny))


def gini_mask(images: torch.Tensor, eta: float = 0.2, sub: int = 3, max_grow: int = 64,
              detected: torch.Tensor | None = None) -> torch.Tensor:
    """The pixels the Gini coefficient is measured on: statmorph's Gini segmentation map.

    As :func:`galgen.evaluation.morphology_statistics` (Lotz et al. 2004; Rodriguez-Gomez
    et al. 2019), about the centroid of the detected light (:func:`detection_mask`)
    instead of the centre of minimum asymmetry, with ``sub x sub`` sub-pixels instead of
    7 x 7: the elliptical Petrosian radius ``r_p`` (axis ratio and angle from the second
    moments of the detected light; first root of the mean brightness of the annulus
    ``r +- 0.5`` over the mean within ``r`` minus ``eta``), the image smoothed by a
    Gaussian of ``0.2 r_p`` and kept where it is at least its mean over the elliptical
    annulus ``r_p +- 0.5``, in the 8-connected region of the brightest smoothed pixel.
    Not differentiable (a selection); the Gini of these pixels follows the evaluation's
    (Spearman 0.96 on 500 noisy simulated SDSS galaxies, median difference 0.000, rms 0.012).

    Parameters
    ----------
    images : torch.Tensor
        ``(B, H, W)`` detector images, background-subtracted.
    eta : float, optional
        Petrosian ratio.
    sub : int, optional
        Sub-pixels per side of the apertures.
    max_grow : int, optional
        Dilation steps of the connected region (64 reach any pixel of a 64 x 64 stamp).
    detected : torch.Tensor, optional
        ``(B, H, W)`` boolean: :func:`detection_mask` of ``images`` where the caller has
        it already (computed here otherwise).

    Returns
    -------
    torch.Tensor
        ``(B, H, W)`` boolean.

    Examples
    --------
    >>> import galsim
    >>> im = galsim.Exponential(half_light_radius=3.0).drawImage(nx=64, ny=64, scale=1.0).array
    >>> m = gini_mask(torch.from_numpy(im)[None])
    >>> 100 < int(m.sum()) < 450, bool(m[0, 32, 32])
    (True, True)
    """
    x = images.detach()
    b, h, w = x.shape
    dt, dev = x.dtype, x.device
    yy = torch.arange(h, dtype=dt, device=dev)[:, None].expand(h, w)
    xx = torch.arange(w, dtype=dt, device=dev)[None, :].expand(h, w)
    tiny = torch.finfo(dt).tiny
    light = torch.where(detection_mask(x) if detected is None else detected, x, torch.zeros_like(x))
    tot = light.sum((1, 2)).clamp_min(tiny)
    cx, cy = (light * xx).sum((1, 2)) / tot, (light * yy).sum((1, 2)) / tot
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    mxx, myy, mxy = ((light * v).sum((1, 2)) / tot for v in (dx * dx, dy * dy, dx * dy))
    theta = 0.5 * torch.atan2(2 * mxy, mxx - myy)
    half = torch.sqrt(((mxx - myy) / 2) ** 2 + mxy ** 2)
    major, minor = ((mxx + myy) / 2 + half).abs(), ((mxx + myy) / 2 - half).abs()
    elong = torch.sqrt(major / minor.clamp_min(1.0 / 144)).clamp(1.0, 10.0)[:, None, None]
    c, s_ = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    offs = ((torch.arange(sub, dtype=dt, device=dev) + 0.5) / sub - 0.5).tolist()
    dists = [torch.sqrt(((dx + ox) * c + (dy + oy) * s_) ** 2 + ((-(dx + ox) * s_ + (dy + oy) * c) * elong) ** 2)
             for oy in offs for ox in offs]
    # curves of growth of flux and area in bins of 0.25 pixel
    delta = 0.25
    nb = int(math.ceil(math.hypot(h, w) * 10.0 / delta)) + 2
    base = (torch.arange(b, device=dev) * nb)[:, None, None]
    flux = torch.zeros(b * nb, dtype=dt, device=dev)
    area = torch.zeros(b * nb, dtype=dt, device=dev)
    for d in dists:
        idx = (base + (d / delta).floor().long().clamp(0, nb - 1)).flatten()
        flux.scatter_add_(0, idx, (x / sub ** 2).flatten())
        area.scatter_add_(0, idx, torch.full_like(idx, 1, dtype=dt) / sub ** 2)
    zero = torch.zeros(b, 1, dtype=dt, device=dev)
    grow = torch.cat([zero, flux.view(b, nb).cumsum(1)], 1)
    cover = torch.cat([zero, area.view(b, nb).cumsum(1)], 1)
    hw, k1 = int(round(0.5 / delta)), int(round(1.0 / delta))
    ks = torch.arange(k1, grow.shape[1] - hw, device=dev)
    ann = (grow[:, ks + hw] - grow[:, ks - hw]) / (cover[:, ks + hw] - cover[:, ks - hw]).clamp_min(tiny)
    inside = grow[:, ks] / cover[:, ks].clamp_min(tiny)
    fval = ann.abs() / inside.abs().clamp_min(tiny) - eta
    below = fval <= 0
    j = torch.where(below.any(1), below.to(torch.int8).argmax(1), torch.full_like(ks[:1], len(ks) - 1).expand(b))
    jm = (j - 1).clamp_min(0)
    f0, f1 = fval.gather(1, jm[:, None])[:, 0], fval.gather(1, j[:, None])[:, 0]
    frac = torch.where(f0 - f1 > 0, f0 / (f0 - f1).clamp_min(tiny), torch.zeros_like(f0)).clamp(0, 1)
    rp = (ks[jm].to(dt) + frac * (j - jm).to(dt)) * delta
    # the smoothed image above its mean on the annulus r_p +- 0.5, connected to its peak
    sigma = (0.2 * rp).clamp_min(1e-3)
    i = torch.arange(max(h, w), dtype=dt, device=dev)
    kern = torch.exp(-0.5 * ((i[None, :] - i[:, None])[None] / sigma[:, None, None]) ** 2)
    kern = kern / kern.sum(-1, keepdim=True)
    smooth = kern[:, :h, :h] @ x @ kern[:, :w, :w].transpose(1, 2)
    r_in, r_out = (rp - 0.5)[:, None, None], (rp + 0.5)[:, None, None]
    ring = sum(((d >= r_in) & (d < r_out)).to(dt) for d in dists) / sub ** 2
    thresh = (ring * smooth).sum((1, 2)) / ring.sum((1, 2)).clamp_min(tiny)
    above = smooth >= thresh[:, None, None]
    flat = smooth.flatten(1)
    peak = torch.zeros_like(flat, dtype=torch.bool)
    peak[torch.arange(b, device=dev), flat.argmax(1)] = True
    return connected_region(peak.view_as(above), above, int(max_grow))


MORPHOLOGY_VECTOR: tuple[str, ...] = ("gini", "m20", "concentration", "log_r50", "log_flux", "e1", "e2",
                                      "log_size", "asymmetry")
"""Names of the columns of :func:`morphology_vector`, in order."""


def morphology_vector(images: torch.Tensor) -> torch.Tensor:
    """Differentiable morphology statistics of noisy detector stamps, one row per galaxy.

    Surrogates, for training, of the statistics :func:`galgen.evaluation.morphology_statistics`
    measures: the Gini coefficient (:func:`gini_coefficient`) and M20 (Lotz et al. 2004:
    ``log10`` of the second moment of the brightest 20% of the light over the total,
    about the light's centroid) on statmorph's Gini segmentation (:func:`gini_mask`); the
    concentration (:func:`light_concentration`), half-light radius (:func:`growth_radii`)
    and flux of the detected pixels (:func:`detection_mask`); the ellipticity ``e1, e2``
    (``(Mxx - Myy) / (Mxx + Myy)``, ``2 Mxy / (Mxx + Myy)``) and size
    (``sqrt((Mxx + Myy) / 2)``) of second moments weighted by a round Gaussian of twice the
    half-light radius about the centre pixel; the asymmetry
    ``(sum |x - R x| - B) / (2 sum |x|)`` over the Gini segmentation and its mirror image
    (``R``: :func:`point_reflect`; ``B`` the noise's expected share, from the rms of the
    stamp's edge frame). The pixel sets and the moments' weight are chosen without
    gradient; the values are differentiable in ``images``. On 500 noisy simulated SDSS
    galaxies of the rich-morphology set their Spearman correlations with the evaluation's
    statistics are 0.93-1.0 (Gini, M20, concentration, half-light radius, flux, ``e1``,
    ``e2``), 0.84 (size against the HSM size) and 0.64 (asymmetry, which the evaluation
    measures about the centre that minimises it); on 120 noisy GalSim Sersic galaxies
    0.90-1.0, 0.86 for the size and 0.73 for the concentration (tested).

    Parameters
    ----------
    images : torch.Tensor
        ``(B, H, W)`` detector images, background-subtracted (excluded pixels 0).

    Returns
    -------
    torch.Tensor
        ``(B, 9)``, columns :data:`MORPHOLOGY_VECTOR`; NaN where a statistic is undefined
        (no light detected).

    Examples
    --------
    >>> import galsim
    >>> im = galsim.Exponential(half_light_radius=3.0).shear(e1=0.3, e2=0.0).drawImage(
    ...     nx=64, ny=64, scale=1.0, use_true_center=False).array  # centred on pixel (32, 32)
    >>> v = morphology_vector(torch.from_numpy(im)[None])[0]
    >>> bool(v[5] > 0.15), abs(float(v[6])) < 0.01, abs(float(v[8])) < 0.01  # e1, e2, asymmetry
    (True, True, True)
    """
    b, h, w = images.shape
    x = images
    dt, dev = x.dtype, x.device
    tiny = torch.finfo(dt).tiny
    nan = torch.full((b,), float("nan"), dtype=dt, device=dev)
    det = detection_mask(x)
    seg = gini_mask(x, detected=det)
    gini = gini_coefficient(x, seg)
    yy = torch.arange(h, dtype=dt, device=dev)[:, None].expand(h, w)
    xx = torch.arange(w, dtype=dt, device=dev)[None, :].expand(h, w)
    # M20 about the light's centroid in the segmentation (the centre chosen without gradient)
    gim = torch.where(seg, x, torch.zeros_like(x))
    g0 = gim.detach().sum((1, 2))
    gx = (gim.detach() * xx).sum((1, 2)) / g0.clamp_min(tiny)
    gy = (gim.detach() * yy).sum((1, 2)) / g0.clamp_min(tiny)
    r2 = (xx - gx[:, None, None]) ** 2 + (yy - gy[:, None, None]) ** 2
    mtot = (gim * r2).sum((1, 2))
    order = gim.detach().flatten(1).argsort(1, descending=True)
    bright = gim.flatten(1).gather(1, order)
    before = bright.detach().cumsum(1) - bright.detach()  # light of the brighter pixels
    top = (before < 0.2 * g0[:, None]).to(dt)
    m_20 = (bright * r2.flatten(1).gather(1, order) * top).sum(1)
    m20 = torch.where((g0 > 0) & (m_20 > 0) & (mtot > 0),
                      torch.log10(m_20.clamp_min(tiny) / mtot.clamp_min(tiny)), nan)
    conc = light_concentration(x, det)
    r50 = growth_radii(x, det, (0.5,))[:, 0]
    light = torch.where(det, x, torch.zeros_like(x))
    flux = light.sum((1, 2))
    # second moments under a round Gaussian of twice the half-light radius about the centre
    dx, dy = xx - w // 2, yy - h // 2
    s = (2 * r50.detach()).nan_to_num(2.0).clamp(1.5, float(min(h, w)) / 2)[:, None, None]
    wl = light * torch.exp(-0.5 * (dx * dx + dy * dy) / (s * s))
    m0 = wl.sum((1, 2))
    mxx, myy, mxy = ((wl * v).sum((1, 2)) / m0.abs().clamp_min(tiny) for v in (dx * dx, dy * dy, dx * dy))
    trace = (mxx + myy).clamp_min(tiny)
    both = seg | point_reflect(seg)
    xb = torch.where(both, x, torch.zeros_like(x))
    noise = both.sum((1, 2)) * (2 / math.sqrt(math.pi)) * _frame_rms(x)  # E|n - n'| summed over the pixels
    asym = ((xb - point_reflect(xb)).abs().sum((1, 2)) - noise) / (2 * xb.abs().sum((1, 2))).clamp_min(tiny)
    ok = flux > 0
    cols = [gini, m20, conc, torch.log(r50.clamp_min(tiny)), torch.log(flux.clamp_min(tiny)),
            (mxx - myy) / trace, 2 * mxy / trace, 0.5 * torch.log(trace / 2), asym]
    return torch.stack([torch.where(ok & (m0 > 0), c, nan) for c in cols], 1)


def _dilate3(mask: torch.Tensor) -> torch.Tensor:
    """3 x 3 binary dilation of ``(B, H, W)`` booleans, as two separable passes of shifted ORs
    (what a 3 x 3 max-pool gives, 25 times faster on a CPU)."""
    rows = mask.clone()
    rows[..., 1:] |= mask[..., :-1]
    rows[..., :-1] |= mask[..., 1:]
    out = rows.clone()
    out[..., 1:, :] |= rows[..., :-1, :]
    out[..., :-1, :] |= rows[..., 1:, :]
    return out


def connected_region(seed: torch.Tensor, allowed: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """The 8-connected region of ``allowed`` pixels reachable from ``seed`` (a flood fill).

    Grown by iterated 3 x 3 dilations within ``allowed`` until it stops changing.

    Parameters
    ----------
    seed : torch.Tensor
        ``(B, H, W)`` boolean, where each region starts.
    allowed : torch.Tensor
        ``(B, H, W)`` boolean, the pixels a region may hold.
    max_iter : int, optional
        At most this many dilations (default ``H * W``, enough for any region).

    Returns
    -------
    torch.Tensor
        ``(B, H, W)`` boolean.

    Examples
    --------
    >>> allowed = torch.tensor([[[1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0]]], dtype=torch.bool)
    >>> seed = torch.zeros_like(allowed); seed[0, 0, 0] = True
    >>> connected_region(seed, allowed).int()
    tensor([[[1, 1, 0, 1],
             [0, 1, 0, 1],
             [0, 0, 1, 0]]], dtype=torch.int32)
    """
    region = seed & allowed
    for _ in range(seed.shape[-2] * seed.shape[-1] if max_iter is None else int(max_iter)):
        grown = _dilate3(region) & allowed
        if torch.equal(grown, region):
            break
        region = grown
    return region
