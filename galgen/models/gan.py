"""A GAN recipe that learns galaxies on a CPU: non-saturating (or hinge) loss, spectral-norm critic.

WGAN-GP (:class:`galgen.models.WGANGP`) is slow by design: five critic updates per
generator update, a double backward every step, and published 64x64 runs of 200k
generator iterations. The recipe here follows what converges in far fewer steps on
galaxy images seen through a PSF and noise (the AmbientGAN-style set-up of Lanusse et
al. 2021, ``deep_galaxy_models``; SNGAN, Miyato et al. 2018; StyleGAN2's lazy R1 and
generator averaging, Karras et al. 2020):

- **loss**: the non-saturating GAN loss (critic ``softplus(-D(real)) + softplus(D(fake))``,
  generator ``softplus(-D(fake))``) or the hinge loss, one critic update per generator
  update;
- **critic**: a DCGAN-like convolutional network with spectral normalisation on every
  layer (Lipschitz control without a gradient penalty) and a projection head for the
  conditions, looking at ``asinh(x / input_scale)`` detector images as the WGAN-GP's;
- **generator head**: flux and shape separated, ``image = F * softmax(logits)`` over the
  intrinsic pixels, with ``log F = mu + sd * h(z, c)`` from a small network ``h`` and the
  data's log-flux mean ``mu`` and spread ``sd``; the logits start from a centred
  Gaussian (``-r^2 / 2 s0^2``). A convolutional body cannot easily make one galaxy 1,000
  times brighter than another (three decades of flux in a magnitude-limited sample),
  and a softmax cannot make a pedestal: the shape is a distribution over pixels;
- **EMA** of the generator's weights (``ema``, with the usual warm-up
  ``min(ema, (1 + t) / (10 + t))``), which is what :meth:`GAN.sample`,
  :meth:`GAN.decode` and validation use;
- optional **lazy R1** penalty ``r1_gamma / 2 * E ||grad D(real)||^2``, applied every
  ``r1_every`` steps with its weight multiplied by ``r1_every``;
- optionally a **generator taken from a trained VAE** (``head="vae"``,
  :meth:`GAN.from_vae`): its flow prior maps ``z ~ N(0, I)`` to a code and its decoder
  draws the galaxy (:class:`PriorDecoder`); the game then trains both (adversarial
  fine-tuning of a likelihood-trained generator, as in VAE-GAN, Larsen et al. 2016).

As for every galgen GAN, the critic never sees an intrinsic image: each generated
galaxy is observed with the PSF, pixels and noise of a real galaxy of the batch, so
the generator learns PSF-free galaxies from observations.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from ..errors import GalgenInputError
from .adversarial import AdversarialModel
from .base import Batch, make_optimizer, no_sync
from .networks import (MORPHOLOGY_VECTOR, Decoder, FluxShapeGenerator, azimuthal_mean, detection_mask,
                       gini_coefficient, gini_mask, growth_radii, halvings, light_concentration, log_flux_start,
                       morphology_vector, point_reflect, ring_profile)
from .vae import VAE

__all__ = ["GAN", "FluxShapeGenerator", "SNCritic", "PriorDecoder", "DetailModulation", "LatentKnots",
           "GAN_LOSSES", "quantile_distance"]

#: Generator heads the :class:`GAN` accepts.
GAN_HEADS = ("flux-shape", "softplus", "vae")
#: Loss names the :class:`GAN` accepts.
GAN_LOSSES = ("non-saturating", "hinge")


def _lrelu():
    return nn.LeakyReLU(0.1)


def _group_std(f: torch.Tensor, group: int) -> torch.Tensor:
    """Minibatch standard deviation (Karras et al. 2018): one feature map per group of images.

    The batch is cut into consecutive groups of ``group`` images (the largest divisor of
    the batch size not above ``group``); every image receives the mean over channels and
    pixels of the standard deviation across its group, as a constant extra channel. A
    generator whose samples all look alike (mode collapse) is then told apart from the
    data by the critic.
    """
    b = f.shape[0]
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    if g < 2:
        return torch.zeros_like(f[:, :1])
    y = f.float().view(g, b // g, *f.shape[1:])
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (b // g,)
    return std.repeat(g)[:, None, None, None].expand(b, 1, *f.shape[2:]).to(f.dtype)


class SNCritic(nn.Module):
    """Spectrally normalised convolutional critic with a projection head for conditions.

    Per halving level a 3x3 convolution and a 4x4 stride-2 convolution, LeakyReLU(0.1),
    no normalisation layer; channels double per level from ``width`` up to
    ``max_width``; then a 3x3 convolution, a linear layer to ``features`` and the score
    ``w . h + b + (E c) . h`` (Miyato & Koyama 2018). Every weight is spectrally
    normalised (one power iteration per training forward pass) when ``spectral_norm``.

    Parameters
    ----------
    stamp : int
        Detector stamp size.
    width : int, optional
        Channels of the first level.
    features : int, optional
        Size of the feature vector ``h``.
    cond_dim : int, optional
        Number of conditioning quantities (0: unconditional).
    spectral_norm : bool, optional
        Spectral normalisation of every layer.
    max_width : int, optional
        Channel cap.
    minibatch_std : int, optional
        Group size of the minibatch standard-deviation channel (1: none).
    symmetry_channel : bool, optional
        Give the first layer a second channel, ``u - R u``, the input's part that is not
        point-symmetric about the centre pixel (``R`` the rotation by 180 degrees,
        :func:`~galgen.models.networks.point_reflect`). Point symmetry relates pixels a
        galaxy apart, which a stack of 3x3 convolutions of width 8 does not compare: the
        GANs drew galaxies with a median CAS asymmetry of 0.14-0.17 where the simulated
        ones have 0.014. In this channel a lopsided galaxy is a local feature.
    highpass : bool, optional
        Replace the input by its part that is not round, ``u - A u``
        (:func:`~galgen.models.networks.azimuthal_mean`): the critic sees arms, bars,
        clumps, companions and ellipticity, not the radial profile, so that it cannot
        take "less concentrated" for "has features".
    profile : bool, optional
        With ``highpass``, a second, separate critic of what the first does not see: a
        multilayer perceptron (two hidden layers of ``features``) on the input's radial
        profile (:func:`~galgen.models.networks.ring_profile`, ring means out to the
        corners). ``forward(u, cond, parts=True)`` returns both scores, ``(B, 2)``, which a
        GAN trains as two critics, each on its own loss, so that each matches its own
        marginal (the profiles, the non-round parts) and neither can trade one for the
        other; ``forward(u, cond)`` returns their sum, the critic's log-odds for a
        logistic loss. The two inputs are orthogonal projections of ``u``, so the R1
        penalty of the sum is the sum of the two critics' penalties.
    statistics : bool, optional
        One more separate critic: a multilayer perceptron on the morphology statistics of
        the detector image (:func:`~galgen.models.networks.morphology_vector` of
        ``sinh(u)``: Gini, M20, concentration, half-light radius, flux, ellipticity, size,
        asymmetry), standardised by :meth:`fit_statistics_scale`. It sees what the
        evaluation's two-sample test sees, jointly, and learns the data's distribution of
        it over many batches (a batch of 64 cannot resolve a shift of 0.2 of a statistic's
        spread; a critic trained on thousands of them can). Its score is a further column
        of ``forward(u, cond, parts=True)``.
    image : bool, optional
        The convolutional critic of the image. ``False`` (with ``statistics``): the
        statistics critic alone, which sees only what the morphology statistics measure.

    Examples
    --------
    >>> critic = SNCritic(32, width=8, features=16, cond_dim=1)
    >>> critic(torch.zeros(3, 32, 32), torch.zeros(3, 1)).shape
    torch.Size([3])
    """

    def __init__(self, stamp: int, width: int = 32, features: int = 128, cond_dim: int = 0,
                 spectral_norm: bool = True, max_width: int = 256, minibatch_std: int = 4,
                 symmetry_channel: bool = False, highpass: bool = False, profile: bool = False,
                 statistics: bool = False, image: bool = True):
        super().__init__()
        if profile and not highpass:
            raise GalgenInputError("profile: a critic of the radial profile beside a highpass one; set highpass too")
        if not image and (not statistics or highpass or profile or symmetry_channel):
            raise GalgenInputError("image: a critic without the convolutional one must be the statistics critic "
                                   "alone (statistics=True; no highpass, profile or symmetry_channel)")
        self.image = bool(image)
        self.highpass, self.profile = bool(highpass), bool(profile)
        sn = _sn if spectral_norm else (lambda m: m)
        n, seed = halvings(stamp)
        self.stamp, self.cond_dim = int(stamp), int(cond_dim)
        self.symmetry_channel = bool(symmetry_channel)
        self.minibatch_std = int(minibatch_std)
        self.features = self.final = self.head = self.out = self.embed = None
        if self.image:
            layers, c = [], 2 if self.symmetry_channel else 1
            for i in range(n):
                cout = min(width * 2**i, max_width)
                layers += [sn(nn.Conv2d(c, cout, 3, padding=1)), _lrelu(),
                           sn(nn.Conv2d(cout, cout, 4, stride=2, padding=1)), _lrelu()]
                c = cout
            self.features = nn.Sequential(*layers)
            extra = 1 if self.minibatch_std > 1 else 0
            self.final = nn.Sequential(sn(nn.Conv2d(c + extra, c, 3, padding=1)), _lrelu())
            self.head = sn(nn.Linear(c * seed * seed, features))
            self.out = sn(nn.Linear(features, 1))
            self.embed = sn(nn.Linear(self.cond_dim, features, bias=False)) if self.cond_dim else None
        self.profile_net = self.profile_out = self.profile_embed = None
        if self.profile:
            rings = ring_profile(torch.zeros(self.stamp, self.stamp)).shape[-1]
            self.profile_net = nn.Sequential(sn(nn.Linear(rings, features)), _lrelu(),
                                             sn(nn.Linear(features, features)), _lrelu())
            self.profile_out = sn(nn.Linear(features, 1))
            self.profile_embed = sn(nn.Linear(self.cond_dim, features, bias=False)) if self.cond_dim else None
        self.statistics = bool(statistics)
        self.stats_net = self.stats_out = self.stats_embed = None
        if self.statistics:
            k = len(MORPHOLOGY_VECTOR)
            self.stats_net = nn.Sequential(sn(nn.Linear(k, features)), _lrelu(),
                                           sn(nn.Linear(features, features)), _lrelu())
            self.stats_out = sn(nn.Linear(features, 1))
            self.stats_embed = sn(nn.Linear(self.cond_dim, features, bias=False)) if self.cond_dim else None
            self.register_buffer("stats_centre", torch.zeros(k))
            self.register_buffer("stats_scale", torch.ones(k))
            self.register_buffer("stats_fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit_statistics_scale(self, u: torch.Tensor) -> None:
        """Set the standardisation of the statistics critic's input from real critic inputs.

        Each statistic's median and 1.4826 x median absolute deviation over ``u``'s
        galaxies (a robust centre and spread; stored with the weights). Under
        ``torch.distributed`` every replica takes rank 0's, so that all critics stay one.

        Parameters
        ----------
        u : torch.Tensor
            ``(B, S, S)`` critic inputs of real galaxies (``B`` of 64 or more).
        """
        if not self.statistics:
            raise GalgenInputError("fit_statistics_scale: this critic has no statistics critic (statistics=False)")
        v = morphology_vector(torch.sinh(u.detach()).float())
        centre = v.nanmedian(0).values
        scale = 1.4826 * (v - centre).abs().nanmedian(0).values
        ok = torch.isfinite(centre) & torch.isfinite(scale) & (scale > 0)
        self.stats_centre.copy_(torch.where(ok, centre, torch.zeros_like(centre)))
        self.stats_scale.copy_(torch.where(ok, scale, torch.ones_like(scale)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.stats_centre, self.stats_scale):
                torch.distributed.broadcast(t, src=0)
        self.stats_fitted.fill_(True)

    def statistics_input(self, u: torch.Tensor) -> torch.Tensor:
        """The statistics critic's input: standardised, clipped statistics of ``sinh(u)``.

        Parameters
        ----------
        u : torch.Tensor
            ``(B, S, S)`` critic inputs.

        Returns
        -------
        torch.Tensor
            ``(B, 9)``, undefined statistics at 0 (the data's median), each within +-8
            spreads; differentiable in ``u``.
        """
        v = (morphology_vector(torch.sinh(u).float()) - self.stats_centre) / self.stats_scale
        return torch.where(torch.isfinite(v), v, torch.zeros_like(v)).clamp(-8.0, 8.0).to(u.dtype)

    def forward(self, u: torch.Tensor, cond: torch.Tensor | None = None, parts: bool = False,
                statistics: torch.Tensor | None = None) -> torch.Tensor:
        """Score critic inputs.

        Parameters
        ----------
        u : torch.Tensor
            ``(B, S, S)`` critic inputs (stretched detector images).
        cond : torch.Tensor, optional
            ``(B, cond_dim)`` standardised conditions (required when ``cond_dim > 0``).
        parts : bool, optional
            With ``profile`` or ``statistics``, return each critic's score (image or
            non-round part, radial profile, statistics) instead of their sum.
        statistics : torch.Tensor, optional
            ``(B, 9)``: the statistics critic's input (:meth:`statistics_input`), where the
            caller has it (its R1 penalty takes gradients with respect to it); computed
            from ``u`` otherwise.

        Returns
        -------
        torch.Tensor
            ``(B,)`` scores, or ``(B, k)`` with ``parts``, one column per critic.
        """
        if u.ndim != 3 or u.shape[-1] != self.stamp or u.shape[-2] != self.stamp:
            raise GalgenInputError(f"u: expected (B, {self.stamp}, {self.stamp}), got {tuple(u.shape)}")
        if self.cond_dim and cond is None:
            raise GalgenInputError("cond: this critic needs conditions")
        scores = [self._score(u - azimuthal_mean(u) if self.highpass else u, cond)] if self.image else []
        if self.profile:
            scores.append(self._mlp_score(ring_profile(u), self.profile_net, self.profile_out, self.profile_embed,
                                          cond))
        if self.statistics:
            s = self.statistics_input(u) if statistics is None else statistics
            scores.append(self._mlp_score(s, self.stats_net, self.stats_out, self.stats_embed, cond))
        if len(scores) == 1:
            return scores[0]
        return torch.stack(scores, 1) if parts else sum(scores)

    @staticmethod
    def _mlp_score(v, net, out, embed, cond):
        """Score of a perceptron critic on the vectors ``v`` (with a projection head for conditions)."""
        h = net(v)
        score = out(h)[:, 0]
        if embed is not None:
            score = score + (embed(cond.to(h.dtype)) * h).sum(dim=1)
        return score

    def _score(self, u, cond):
        """The convolutional critic's score of ``u``."""
        x = torch.stack([u, u - point_reflect(u)], 1) if self.symmetry_channel else u[:, None]
        f = self.features(x)
        if self.minibatch_std > 1:
            f = torch.cat([f, _group_std(f, self.minibatch_std)], dim=1)
        h = nn.functional.leaky_relu(self.head(self.final(f).flatten(1)), 0.1)
        score = self.out(h)[:, 0]
        if self.embed is not None:
            score = score + (self.embed(cond.to(h.dtype)) * h).sum(dim=1)
        return score


class DetailModulation(nn.Module):
    """Small-scale structure drawn on a galaxy: ``x * exp(m)``, rescaled to ``x``'s flux.

    ``m`` is a map from a small convolutional network that sees the galaxy (on a
    logarithmic stretch about its peak) and a coarse field made from its latent code (so
    that where clumps and arms fall depends on the code), bounded to ``|m| < 2``. The
    light is redistributed, never created: the flux, and a pixel's sign, are the
    galaxy's. The last layer starts at zero, so the module starts as the identity: on a
    trained VAE's galaxies it adds only what a game teaches it (the clumps, arms and
    lopsidedness the decoder draws too smooth, ``benchmarks/diagnose_generation_misses.py``).

    Parameters
    ----------
    latent_dim : int
        Size of the codes.
    width : int, optional
        Channels of the hidden layers.
    coarse : int, optional
        Side of the code's field before it is upsampled to the stamp.
    channels : int, optional
        Channels of the code's field.

    Examples
    --------
    >>> detail = DetailModulation(4)
    >>> x = torch.rand(2, 16, 16)
    >>> torch.equal(detail(x, torch.randn(2, 4)), x)  # the identity until trained
    True
    """

    def __init__(self, latent_dim: int, width: int = 16, coarse: int = 8, channels: int = 4):
        super().__init__()
        self.coarse, self.channels = int(coarse), int(channels)
        self.field = nn.Linear(int(latent_dim), self.channels * self.coarse**2)
        self.net = nn.Sequential(nn.Conv2d(1 + self.channels, width, 3, padding=1), _lrelu(),
                                 nn.Conv2d(width, width, 3, padding=2, dilation=2), _lrelu(),
                                 nn.Conv2d(width, width, 3, padding=1), _lrelu(),
                                 nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The galaxies with their modulation.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, S, S)`` intrinsic images.
        z : torch.Tensor
            ``(B, latent_dim)`` their codes.

        Returns
        -------
        torch.Tensor
            ``(B, S, S)``, with each image's flux.
        """
        peak = images.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        stretch = torch.asinh(images / (1e-2 * peak))[:, None] / 5.0
        field = self.field(z.to(images.dtype)).view(-1, self.channels, self.coarse, self.coarse)
        field = nn.functional.interpolate(field, size=images.shape[-2:], mode="bilinear", align_corners=False)
        m = self.net(torch.cat([stretch, field], 1))[:, 0]
        m = 2.0 * torch.tanh(m / 2.0)
        out = images * torch.exp(m)
        flux = images.sum(dim=(1, 2), keepdim=True)
        return out * (flux / out.sum(dim=(1, 2), keepdim=True).where(flux != 0, torch.ones_like(flux)))


#: Half-light radius of a circular Gaussian in units of its sigma, ``sqrt(2 ln 2)``.
_GAUSSIAN_HLR = math.sqrt(2 * math.log(2))


class LatentKnots(nn.Module):
    """Star-forming knots drawn on a galaxy, their positions latent coordinates.

    A decoder whose code has a few dozen coordinates cannot hold where a galaxy's
    dozens of knots are, so a likelihood-trained decoder draws their mean, a smooth
    galaxy. Here each galaxy gets ``knots`` point
    sources whose positions are latent coordinates of their own: ``2 * knots`` standard
    normal numbers ``u``, placed as GalSim's :class:`galsim.RandomKnots` places the
    simulator's knots, a Gaussian cloud with the half-light radius of the galaxy's disk,
    sheared with the disk (GalSim's shear matrix) about its centre. A fraction ``f`` of
    the galaxy's light moves into them, each knot ``f / knots`` of it:
    ``out = (1 - f) x + f F k``, ``F`` the galaxy's flux and ``k`` the knots' unit-flux
    image (each point shared bilinearly among its four nearest pixels, so that the
    image is differentiable in the positions; light falling off the grid is lost). The
    fraction is ``sigmoid(gain h(z))``, ``h`` a two-layer network of the code whose last
    layer starts at zero and at ``init_fraction`` (the knots start almost invisible: a
    game then learns how much light each galaxy has in knots). Measured on SDSS-like rich
    galaxies (docs/models.md, "Where the Gini goes"): below the noise at a 1.4" PSF, knots
    raise the asymmetry but lower the Gini and the concentration (the light they take
    leaves the bulge + disk profile for a Gaussian cloud), so they are not what that
    decoder's Gini lacks there.

    Parameters
    ----------
    code_dim : int
        Size of the codes ``h`` reads.
    knots : int, optional
        Knots per galaxy (the simulator's star-forming disks have a median of 34).
    gain : float, optional
        The factor on ``h`` (Adam's steps on the fraction's logit are this much larger).
    init_fraction : float, optional
        The fraction every galaxy starts with.

    Examples
    --------
    >>> knots = LatentKnots(4, knots=8)
    >>> x = torch.rand(2, 32, 32)
    >>> disk = {"log_size": torch.zeros(2), "g1": torch.zeros(2), "g2": torch.zeros(2),
    ...         "dx": torch.zeros(2), "dy": torch.zeros(2)}
    >>> out = knots(x, torch.randn(2, 4), torch.randn(2, 16), disk, size_unit=2.0)
    >>> out.shape, torch.allclose(out.sum((1, 2)), x.sum((1, 2)))
    (torch.Size([2, 32, 32]), True)
    """

    def __init__(self, code_dim: int, knots: int = 32, gain: float = 40.0, init_fraction: float = 1e-3):
        super().__init__()
        if int(knots) < 1:
            raise GalgenInputError(f"knots: at least one knot per galaxy, got {knots!r}")
        if not 0.0 < float(init_fraction) < 1.0:
            raise GalgenInputError(f"init_fraction: in (0, 1), got {init_fraction!r}")
        if not float(gain) > 0:
            raise GalgenInputError(f"gain: must be > 0, got {gain!r}")
        self.knots, self.gain = int(knots), float(gain)
        self.net = nn.Sequential(nn.Linear(int(code_dim), 64), nn.SiLU(), nn.Linear(64, 1))
        nn.init.zeros_(self.net[2].weight)
        with torch.no_grad():
            f0 = float(init_fraction)
            self.net[2].bias.fill_(math.log(f0 / (1.0 - f0)) / self.gain)

    @property
    def latent_dim(self) -> int:
        """Latent coordinates of the knots' positions, ``2 * knots``."""
        return 2 * self.knots

    def fraction(self, z: torch.Tensor) -> torch.Tensor:
        """Fraction of each galaxy's light in its knots.

        Parameters
        ----------
        z : torch.Tensor
            ``(B, code_dim)``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` float32 in ``(0, 1)``.
        """
        return torch.sigmoid(self.gain * self.net(z.float())[:, 0])

    def positions(self, u: torch.Tensor, disk: dict, size: int, size_unit: float) -> torch.Tensor:
        """Pixel positions ``(x, y)`` of the knots of latent coordinates ``u``.

        Parameters
        ----------
        u : torch.Tensor
            ``(B, 2 * knots)`` standard normal coordinates.
        disk : dict of torch.Tensor
            The disk's ``log_size`` (``ln(hlr / size_unit)``), reduced shear ``g1``,
            ``g2`` and centre offset ``dx``, ``dy`` from the centre pixel (pixels), each
            ``(B,)``: :meth:`FluxShapeGenerator.shape_parameters`.
        size : int
            Grid side (the centre pixel is ``size // 2``).
        size_unit : float
            Pixels per unit of ``exp(log_size)`` (the generator's ``template_sigma``).

        Returns
        -------
        torch.Tensor
            ``(B, knots, 2)``.
        """
        sigma = size_unit * disk["log_size"].float().exp() / _GAUSSIAN_HLR
        w = u.float().view(len(u), self.knots, 2) * sigma[:, None, None]
        g1, g2 = disk["g1"].float()[:, None], disk["g2"].float()[:, None]
        k = torch.rsqrt(1 - g1 * g1 - g2 * g2)
        x = k * ((1 + g1) * w[..., 0] + g2 * w[..., 1]) + disk["dx"].float()[:, None]
        y = k * (g2 * w[..., 0] + (1 - g1) * w[..., 1]) + disk["dy"].float()[:, None]
        return torch.stack([x, y], -1) + float(size // 2)

    def image(self, pos: torch.Tensor, size: int) -> torch.Tensor:
        """Unit-flux image of each galaxy's knots (bilinear deposits; off-grid light lost).

        Parameters
        ----------
        pos : torch.Tensor
            ``(B, K, 2)`` pixel positions ``(x, y)``.
        size : int
            Grid side.

        Returns
        -------
        torch.Tensor
            ``(B, size, size)`` float32, summing to at most 1.
        """
        B, K, _ = pos.shape
        x0, y0 = pos[..., 0].floor(), pos[..., 1].floor()
        fx, fy = pos[..., 0] - x0, pos[..., 1] - y0
        x0, y0 = x0.long(), y0.long()
        out = pos.new_zeros(B, size * size)
        for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            index = (yi.clamp(0, size - 1) * size + xi.clamp(0, size - 1))
            out = out.scatter_add(1, index, torch.where(inside, w, torch.zeros_like(w)) / K)
        return out.view(B, size, size)

    def forward(self, images: torch.Tensor, z: torch.Tensor, u: torch.Tensor, disk: dict,
                size_unit: float) -> torch.Tensor:
        """The galaxies with their knots.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, S, S)`` intrinsic images.
        z : torch.Tensor
            ``(B, code_dim)`` their codes.
        u : torch.Tensor
            ``(B, 2 * knots)`` the knots' latent coordinates.
        disk : dict of torch.Tensor
            The disks' parameters (:meth:`positions`).
        size_unit : float
            As in :meth:`positions`.

        Returns
        -------
        torch.Tensor
            ``(B, S, S)`` float32.
        """
        if u.shape != (len(images), self.latent_dim):
            raise GalgenInputError(f"u: expected ({len(images)}, {self.latent_dim}) knot coordinates, "
                                   f"got {tuple(u.shape)}")
        size = images.shape[-1]
        x = images.float()
        f = self.fraction(z)[:, None, None]
        flux = x.sum((1, 2), keepdim=True)
        return (1 - f) * x + f * flux * self.image(self.positions(u, disk, size, size_unit), size)


class PriorDecoder(nn.Module):
    """A VAE's flow prior and decoder as one generator: noise -> latent code -> intrinsic galaxy.

    ``forward(eps)`` maps ``eps ~ N(0, I)`` through the inverse of the flow (the map
    :meth:`LatentFlowPrior.sample` draws codes with, here differentiable in the flow's
    weights) to a code ``z``, and decodes it. With the VAE's weights it draws exactly
    the galaxies of the VAE's flow prior (``vae.sample``), so a GAN built on it starts
    where the VAE is and the adversarial game trains both parts.

    Parameters
    ----------
    flow : LatentFlowPrior
        An unconditional, fitted flow prior.
    decoder : torch.nn.Module
        Maps ``(B, latent_dim)`` codes to ``(B, S, S)`` intrinsic images.
    detail : DetailModulation, optional
        Small-scale structure drawn on the decoder's galaxies (starts as the identity).
    knots : LatentKnots, optional
        Star-forming knots drawn on the decoder's galaxies (a :class:`FluxShapeGenerator`
        of the bulge + disk profile, whose disk places them): ``eps``'s last
        ``knots.latent_dim`` coordinates are their positions, the first go through the flow.

    Examples
    --------
    >>> from galgen.models import VAE
    >>> vae = VAE(32, latent_dim=4, width=8)
    >>> _ = vae.fit_prior(torch.randn(64, 4), epochs=1)
    >>> PriorDecoder(vae.latent_flow, vae.decoder)(torch.randn(2, 4)).shape
    torch.Size([2, 32, 32])
    """

    def __init__(self, flow: nn.Module, decoder: nn.Module, detail: nn.Module | None = None,
                 knots: nn.Module | None = None):
        super().__init__()
        if flow.context:
            raise GalgenInputError("flow: a conditional flow prior cannot be a GAN's generator input")
        if knots is not None and getattr(decoder, "profile", None) != "bulge-disk":
            raise GalgenInputError("knots: drawn on the disk of a flux-shape decoder of the bulge-disk profile")
        self.flow, self.decoder = flow, decoder
        self.detail, self.knots = detail, knots

    def codes(self, eps: torch.Tensor) -> torch.Tensor:
        """Latent codes of base noise (differentiable in ``eps`` and the flow's weights).

        Parameters
        ----------
        eps : torch.Tensor
            ``(B, latent_dim)``.

        Returns
        -------
        torch.Tensor
            ``(B, latent_dim)`` codes in the decoder's units.
        """
        return self.flow.distribution().transform.inv(eps)

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        """Intrinsic images of base noise.

        Parameters
        ----------
        eps : torch.Tensor
            ``(B, latent_dim)`` (with ``knots``, ``(B, latent_dim + knots.latent_dim)``).

        Returns
        -------
        torch.Tensor
            ``(B, S, S)`` non-negative images.
        """
        u = None
        if self.knots is not None:
            eps, u = eps[:, :-self.knots.latent_dim], eps[:, -self.knots.latent_dim:]
        z = self.codes(eps)
        images = self.decoder(z)
        if self.detail is not None:
            images = self.detail(images, z)
        if u is not None:
            disk = self.decoder.shape_parameters(z)
            images = self.knots(images, z, u, disk, self.decoder.template_sigma)
        return images


class GAN(AdversarialModel):
    """GAN with a non-saturating or hinge loss and a spectral-norm critic, seen through the physics layer.

    Parameters
    ----------
    stamp : int
        Detector stamp size of the observations.
    latent_dim : int, optional
        Size of the latent vector ``z ~ N(0, I)``.
    oversampling : int, optional
        Intrinsic pixels per detector pixel of the generated images.
    width : int, optional
        Base channel count of the generator body and of the critic.
    input_scale : float, optional
        Detector images enter the critic as ``asinh(x / input_scale)`` (about the sky rms).
    flux_scale : float, optional
        Typical peak (image units per intrinsic pixel); with ``head="softplus"`` the
        decoder's initial scale; with ``head="flux-shape"`` and no ``log_flux``, sets the
        initial log flux as a Gaussian of ``stamp * oversampling / 16`` pixels rms.
    log_flux : sequence of float, optional
        ``(mean, std)`` of ln(total flux) of the data (the trainer fills it in from the
        training set).
    loss : {"non-saturating", "hinge"}, optional
    spectral_norm : bool, optional
        Spectral normalisation of the critic.
    head : {"flux-shape", "softplus", "vae"}, optional
        Generator output: ``F * softmax(logits)`` (:class:`FluxShapeGenerator`), the
        VAE's softplus decoder (:class:`Decoder`), or a VAE's flow prior and decoder
        (:class:`PriorDecoder`, with ``vae``; see :meth:`from_vae`).
    vae : dict, optional
        With ``head="vae"``: the ``config`` of the unconditional VAE whose flow prior and
        decoder form the generator (its weights come from :meth:`from_vae` or a
        checkpoint); ``latent_dim``, ``stamp`` and ``oversampling`` must equal its own.
    ema : float, optional
        Decay of the generator's weight average (0: none; sampling uses the generator).
    r1_gamma : float, optional
        Weight of the R1 penalty on real images (0: none).
    r1_every : int, optional
        Lazy regularisation period of R1.
    n_critic : int, optional
        Critic updates per generator update.
    conditions : sequence of str, optional
        Catalog columns generator and critic are conditioned on.
    profile : {"gaussian", "sersic", "bulge-disk"}, optional
        Seed profile of the flux-shape head (see :class:`FluxShapeGenerator`).
    warp_body : bool, optional
        Shear the flux-shape head's body with its seed (see :class:`FluxShapeGenerator`).
    train_parts : {"all", "flow", "detail", "knots"}, optional
        With ``head="vae"``: the game trains the flow prior and the decoder (and
        ``detail`` and ``knots``), the flow alone (the decoder keeps the VAE's weights; only the
        distribution of codes moves), ``detail`` alone (the VAE's galaxies stay; the
        game draws only their small-scale structure), or ``knots`` alone (the VAE's
        galaxies stay; the game learns how much of their light is in knots).
    detail : bool, optional
        With ``head="vae"``: a :class:`DetailModulation` redistributes the light of each
        of the VAE's galaxies (flux kept), starting as the identity: structure smaller
        than the decoder draws (clumps, arms, lopsidedness). Measured (run 12 of
        docs/models.md, ``train_parts="detail"``): flux, size and ellipticity stay and the
        game learns lopsidedness, but it also spreads the light (lower Gini).
    knots : int, optional
        With ``head="vae"`` and a bulge + disk flux-shape decoder: this many star-forming
        knots per galaxy (:class:`LatentKnots`), their positions ``2 * knots`` latent
        coordinates of their own after the VAE's (``latent_dim`` is the VAE's plus
        ``2 * knots``), the fraction of light in them learnt by the game from about 0.001.
        0: none.
    fake_noise : {"variance-map", "own"}, optional
        Noise of the fakes observed like a batch: drawn from the real galaxies' variance
        maps, or the Poisson noise of the fakes' own light over each galaxy's background
        (:meth:`AdversarialModel.fake_observation`; for variance maps that hold their
        galaxy's Poisson term, as simulated files do).
    anchor : float, optional
        With ``head="vae"``: weight of a trust region around the generator the game
        starts from (the VAE's flow prior and decoder, kept frozen as
        ``generator_anchor``). Each generator step adds
        ``anchor / 2 * mean_i chi2_i``, where ``chi2_i`` is the chi-square between the
        generated galaxy and the start's galaxy of the same ``z``, both observed
        noise-free like galaxy ``i`` of the batch, in units of its noise (the
        negative log-likelihood of the new galaxy's observation under the start's): the
        critic can move the galaxies only by what it gains over a few chi-square per
        galaxy (KL-regularised fine-tuning). 0: none.
    critic_symmetry : bool, optional
        The critic also sees each image's part that is not point-symmetric about the
        centre pixel (:class:`SNCritic` ``symmetry_channel``).
    critic_highpass : bool, optional
        The critic sees each image's part that is not round about the centre pixel, not its
        radial profile (:class:`SNCritic` ``highpass``).
    critic_profile : bool, optional
        With ``critic_highpass``, a second critic scores the radial profiles, each critic
        on its own loss (:class:`SNCritic` ``profile``); the generator's loss is the sum
        of both critics' losses. Trained on the profiles alone, this one can only ask for
        the profiles of the data, not read "less concentrated" as "has arms". Measured
        (run 10 of docs/models.md, from a VAE): the concentration stays, but the Gini
        still falls (W1 2.53x its floor on 1,000 galaxies against the start's 1.46x).
    critic_warmup : int, optional
        Steps in which only the critic trains before the generator's first update. A
        generator started from a trained VAE otherwise moves from the first steps on,
        under a critic that cannot yet tell its galaxies from the data, by Adam's
        whole steps. Measured (run 11 of docs/models.md): a game begun against a critic
        at 0.56-0.61 batch accuracy moves the galaxies the same way as without.
    match_statistics : float, optional
        Weight of a statistics-matching term beside the critic (feature matching on
        physical statistics): each generator step adds ``match_statistics`` times the sum,
        over the Gini coefficient, the concentration and the half-light radius of the
        observed fakes and of the batch's galaxies (:meth:`matched_statistics`), of the
        Wasserstein-1 distance between their batch distributions in units of the data's spread
        (:func:`quantile_distance`), so that the critic cannot pay the generator in
        light concentration. 0: none. Measured (runs 13-18 of docs/models.md, from a
        VAE): with the Gini of the evaluation's segmentation the galaxies shrink unless the
        Gini's gradient is kept off the radial profile (as it now is), and even then the
        Gini falls as without matching (0.491-0.493 against the data's 0.503, at weights 1
        and 10: a batch of 64 cannot resolve the shift); no run beat its VAE start.
    critic_statistics : bool, optional
        One more critic, on its own loss: a perceptron on the morphology statistics of each
        observed image (:class:`SNCritic` ``statistics``;
        :func:`~galgen.models.networks.morphology_vector`: Gini, M20, concentration,
        half-light radius, flux, ellipticity, size, asymmetry). Where ``match_statistics``
        compares each batch's marginals, this critic learns the data's joint distribution
        of the statistics over the whole run, so that a shift smaller than a batch's
        sampling noise still moves the generator. Its R1 penalty is taken with respect to
        the statistics.
    critic_image : bool, optional
        ``False`` (with ``critic_statistics``): no convolutional critic; the statistics
        critic alone plays the game (:class:`SNCritic` ``image``).
    symmetry_gate : {None, "network"}, optional
        Weight the part of each generated image that is not point-symmetric about the
        centre pixel by ``w = sigmoid(gate_gain h(z))`` (:class:`FluxShapeGenerator`, flux-shape
        head only), learnt by the adversarial game: the generator can draw exactly
        point-symmetric bulges and lopsided irregulars from one body. (The VAE's
        ``"latent"`` gate is set by each galaxy's likelihood, which a GAN has not.)
    gate_gain : float, optional
        ``w = sigmoid(gate_gain h(z))`` (the VAE's network gate uses 40, which a GAN's
        training drove to w = 1 for every galaxy by step 1,000: 0.996-1.0 over 400 draws).

    Examples
    --------
    >>> gan = GAN(32, latent_dim=8, width=8, log_flux=(6.0, 1.0))
    >>> gan.sample(2, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 32, 32])
    """

    kind = "gan"

    def __init__(self, stamp: int, latent_dim: int = 64, oversampling: int = 1, width: int = 32,
                 input_scale: float = 1.0, flux_scale: float = 1.0, log_flux=None, loss: str = "non-saturating",
                 spectral_norm: bool = True, head: str = "flux-shape", ema: float = 0.999, r1_gamma: float = 0.0,
                 r1_every: int = 16, n_critic: int = 1, conditions=(), profile: str = "gaussian",
                 warp_body: bool = False, symmetry_gate: str | None = None, gate_gain: float = 4.0,
                 critic_symmetry: bool = False, vae: dict | None = None, fake_noise: str = "variance-map",
                 train_parts: str = "all", anchor: float = 0.0, critic_highpass: bool = False,
                 critic_profile: bool = False, critic_warmup: int = 0, detail: bool = False,
                 match_statistics: float = 0.0, critic_statistics: bool = False, critic_image: bool = True,
                 knots: int = 0):
        super().__init__(conditions)
        for name, value, ok in (("latent_dim", latent_dim, int(latent_dim) >= 1),
                                ("oversampling", oversampling, int(oversampling) >= 1),
                                ("width", width, int(width) >= 1),
                                ("input_scale", input_scale, float(input_scale) > 0),
                                ("flux_scale", flux_scale, float(flux_scale) > 0),
                                ("ema", ema, 0.0 <= float(ema) < 1.0),
                                ("r1_gamma", r1_gamma, float(r1_gamma) >= 0),
                                ("r1_every", r1_every, int(r1_every) >= 1),
                                ("n_critic", n_critic, int(n_critic) >= 1),
                                ("gate_gain", gate_gain, float(gate_gain) > 0),
                                ("anchor", anchor, float(anchor) >= 0),
                                ("match_statistics", match_statistics, float(match_statistics) >= 0),
                                ("critic_warmup", critic_warmup, int(critic_warmup) >= 0),
                                ("knots", knots, int(knots) >= 0)):
            if not ok:
                raise GalgenInputError(f"{name}: out of range, got {value!r}")
        if loss not in GAN_LOSSES:
            raise GalgenInputError(f"loss: must be one of {list(GAN_LOSSES)}, got {loss!r}")
        if detail and head != "vae":
            raise GalgenInputError(f"detail: small-scale structure on a VAE's galaxies, an option of head='vae', "
                                   f"not of head={head!r}")
        if int(knots) and head != "vae":
            raise GalgenInputError(f"knots: star-forming knots on a VAE's galaxies, an option of head='vae', "
                                   f"not of head={head!r}")
        if train_parts not in ("all", "flow", "detail", "knots") or (train_parts != "all" and head != "vae") \
                or (train_parts == "detail" and not detail) or (train_parts == "knots" and not int(knots)):
            raise GalgenInputError(f"train_parts: 'all', 'flow' with head='vae', 'detail' with detail=True or "
                                   f"'knots' with knots > 0, got {train_parts!r}")
        if float(anchor) > 0 and head != "vae":
            raise GalgenInputError(f"anchor: a trust region around a VAE's generator, an option of head='vae', "
                                   f"not of head={head!r}")
        if fake_noise not in ("variance-map", "own"):
            raise GalgenInputError(f"fake_noise: 'variance-map' or 'own', got {fake_noise!r}")
        if head not in GAN_HEADS:
            raise GalgenInputError(f"head: one of {list(GAN_HEADS)}, got {head!r}")
        source = _generator_vae(vae, head, stamp, int(latent_dim) - 2 * int(knots), oversampling, self.cond_dim)
        if symmetry_gate not in (None, "network"):
            raise GalgenInputError(f"symmetry_gate: None or 'network' for a GAN, got {symmetry_gate!r}")
        if symmetry_gate and head != "flux-shape":
            raise GalgenInputError("symmetry_gate: an option of the flux-shape head, not of head='softplus'")
        size = int(stamp) * int(oversampling)
        log_flux = log_flux_start(log_flux, flux_scale, size)
        self.config = dict(kind=self.kind, stamp=int(stamp), latent_dim=int(latent_dim),
                           oversampling=int(oversampling), width=int(width), input_scale=float(input_scale),
                           flux_scale=float(flux_scale), log_flux=log_flux, loss=loss,
                           spectral_norm=bool(spectral_norm), head=head, ema=float(ema), r1_gamma=float(r1_gamma),
                           r1_every=int(r1_every), n_critic=int(n_critic), conditions=list(self.conditions),
                           profile=profile, warp_body=bool(warp_body))
        if source is not None:
            self.config.update(vae=dict(source.config))
        if fake_noise != "variance-map":  # older checkpoints' configs stay as they were
            self.config.update(fake_noise=fake_noise)
        if train_parts != "all":
            self.config.update(train_parts=train_parts)
        self.anchor, self.critic_profile = float(anchor), bool(critic_profile)
        self.match_statistics = float(match_statistics)
        if self.match_statistics > 0:
            self.config.update(match_statistics=self.match_statistics)
        self.critic_warmup = int(critic_warmup)
        if detail:
            self.config.update(detail=True)
        if int(knots):
            self.config.update(knots=int(knots))
        if self.critic_warmup:
            self.config.update(critic_warmup=self.critic_warmup)
        if self.anchor > 0:
            self.config.update(anchor=self.anchor)
        self.fake_noise = fake_noise
        if symmetry_gate is not None:  # older checkpoints' configs stay as they were
            self.config.update(symmetry_gate=symmetry_gate, gate_gain=float(gate_gain))
        if critic_symmetry:
            self.config.update(critic_symmetry=True)
        if critic_highpass:
            self.config.update(critic_highpass=True)
        if critic_profile:
            if not critic_highpass:
                raise GalgenInputError("critic_profile: a critic of the radial profile beside the high-pass one; "
                                       "set critic_highpass too")
            self.config.update(critic_profile=True)
        self.critic_statistics = bool(critic_statistics)
        if self.critic_statistics:
            self.config.update(critic_statistics=True)
        if not critic_image:
            self.config.update(critic_image=False)
        self.stamp, self.latent_dim, self.oversampling = int(stamp), int(latent_dim), int(oversampling)
        self.input_scale, self.loss, self.ema = float(input_scale), loss, float(ema)
        self.r1_gamma, self.r1_every, self.n_critic = float(r1_gamma), int(r1_every), int(n_critic)
        nin = self.latent_dim + self.cond_dim
        if head == "flux-shape":
            self.generator = FluxShapeGenerator(size, nin, width=int(width), log_flux=log_flux, profile=profile,
                                                warp_body=warp_body, symmetry_gate=symmetry_gate,
                                                gate_gain=float(gate_gain))
        elif head == "vae":
            code_dim = source.latent_dim
            self.generator = PriorDecoder(source.latent_flow, source.decoder,
                                          DetailModulation(code_dim) if detail else None,
                                          LatentKnots(code_dim, int(knots)) if int(knots) else None)
        else:
            self.generator = Decoder(size, nin, width=int(width), flux_scale=float(flux_scale))
        self.critic = SNCritic(self.stamp, width=int(width), features=min(8 * int(width), 256),
                               cond_dim=self.cond_dim, spectral_norm=bool(spectral_norm),
                               symmetry_channel=bool(critic_symmetry), highpass=bool(critic_highpass),
                               profile=bool(critic_profile), statistics=self.critic_statistics,
                               image=bool(critic_image))
        if train_parts == "flow":  # the decoder stays the VAE's: the game moves which codes are drawn
            for p in self.generator.decoder.parameters():
                p.requires_grad_(False)
        if train_parts in ("detail", "knots"):  # the VAE's galaxies stay; the game draws their small scales
            for p in list(self.generator.decoder.parameters()) + list(self.generator.flow.parameters()):
                p.requires_grad_(False)
            if train_parts == "knots" and detail:
                for p in self.generator.detail.parameters():
                    p.requires_grad_(False)
        self.generator_anchor = None
        if self.anchor > 0:  # the generator the game starts from (from_vae or a checkpoint fills its weights)
            self.generator_anchor = copy.deepcopy(self.generator)
            for p in self.generator_anchor.parameters():
                p.requires_grad_(False)
        self.generator_ema = None
        if self.ema > 0:
            self.generator_ema = copy.deepcopy(self.generator)
            for p in self.generator_ema.parameters():
                p.requires_grad_(False)

    @property
    def sampling_generator(self) -> nn.Module:
        """The weight-averaged generator when ``ema > 0`` (what sampling and validation use)."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    @classmethod
    def from_vae(cls, vae: VAE, **options) -> "GAN":
        """A GAN whose generator is a trained VAE's flow prior and decoder, with a fresh critic.

        Its samples are the VAE's flow-prior samples (same ``z``, same galaxy) until the
        adversarial game moves the generator: a likelihood-trained generator that a critic
        looking through the physics layer then fine-tunes (VAE-GAN, Larsen et al. 2016).

        Parameters
        ----------
        vae : galgen.models.VAE
            Unconditional, with a fitted flow prior.
        **options
            GAN options (:class:`GAN`) other than ``stamp``, ``latent_dim``,
            ``oversampling``, ``head`` and ``vae``; ``input_scale`` defaults to the VAE's.

        Returns
        -------
        GAN
            On the VAE's device and dtype.

        Raises
        ------
        GalgenInputError
            A conditional VAE, one whose flow is not fitted, or an option fixed by the VAE.
        """
        if not isinstance(vae, VAE):
            raise GalgenInputError(f"vae: expected a galgen VAE, got {type(vae).__name__}")
        if not bool(vae.latent_flow.fitted):
            raise GalgenInputError("vae: its flow prior is not fitted (pipelines/refit_prior.py, VAE.fit_prior)")
        fixed = sorted({"stamp", "latent_dim", "oversampling", "head", "vae"} & set(options))
        if fixed:
            raise GalgenInputError(f"options: {fixed} come from the VAE")
        options.setdefault("input_scale", vae.input_scale)
        w = vae.head[1].weight
        latent_dim = vae.latent_dim + 2 * int(options.get("knots", 0))
        gan = cls(vae.config["stamp"], latent_dim=latent_dim, oversampling=vae.config["oversampling"],
                  head="vae", vae=vae.config, **options).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for generator in (gan.generator, gan.generator_ema, gan.generator_anchor):
                if generator is not None:
                    generator.flow.load_state_dict(vae.latent_flow.state_dict())
                    generator.decoder.load_state_dict(vae.decoder.state_dict())
        return gan

    @torch.no_grad()
    def update_ema(self, t: int) -> float:
        """Move the averaged generator towards the trained one.

        ``avg <- beta * avg + (1 - beta) * current`` with ``beta = min(ema, (1 + t) / (10 + t))``
        (so early averages do not remember the random initialisation).

        Parameters
        ----------
        t : int
            Number of generator updates so far (0-based).

        Returns
        -------
        float
            The ``beta`` used (0 without an average).
        """
        if self.generator_ema is None:
            return 0.0
        beta = min(self.ema, (1.0 + t) / (10.0 + t))
        for avg, cur in zip(self.generator_ema.parameters(), self.generator.parameters()):
            avg.lerp_(cur.detach(), 1.0 - beta)
        for avg, cur in zip(self.generator_ema.buffers(), self.generator.buffers()):
            avg.copy_(cur)
        return beta

    # -- losses ------------------------------------------------------------------------------

    def critic_loss(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
        """The critic's loss on the scores of real and fake images.

        Parameters
        ----------
        d_real, d_fake : torch.Tensor
            ``(B,)`` scores, or ``(B, k)``: the scores of ``k`` critics, each on its own
            loss (summed over critics).

        Returns
        -------
        torch.Tensor
            Scalar: ``mean softplus(-d_real) + mean softplus(d_fake)`` (non-saturating;
            the binary cross-entropy of a logistic discriminator) or
            ``mean relu(1 - d_real) + mean relu(1 + d_fake)`` (hinge).
        """
        if self.loss == "hinge":
            return _per_galaxy(torch.relu(1 - d_real)).mean() + _per_galaxy(torch.relu(1 + d_fake)).mean()
        return (_per_galaxy(nn.functional.softplus(-d_real)).mean()
                + _per_galaxy(nn.functional.softplus(d_fake)).mean())

    def generator_loss(self, d_fake: torch.Tensor) -> torch.Tensor:
        """The generator's loss on the critic's scores of its observed fakes.

        Parameters
        ----------
        d_fake : torch.Tensor
            ``(B,)`` scores, or ``(B, k)`` of ``k`` critics (summed over critics).

        Returns
        -------
        torch.Tensor
            Scalar: ``mean softplus(-d_fake)`` (non-saturating) or ``-mean d_fake`` (hinge).
        """
        if self.loss == "hinge":
            return -_per_galaxy(d_fake).mean()
        return _per_galaxy(nn.functional.softplus(-d_fake)).mean()

    def r1_penalty(self, u_real: torch.Tensor, feats=None) -> torch.Tensor:
        """``E ||grad_u D(u)||^2`` at real critic inputs (Mescheder et al. 2018), differentiable.

        Parameters
        ----------
        u_real : torch.Tensor
            ``(B, S, S)`` critic inputs of real images.
        feats : torch.Tensor, optional
            Standardised conditions.

        Returns
        -------
        torch.Tensor
            Scalar, float32.
        """
        u = u_real.detach().requires_grad_(True)
        inputs, stats = [u], None
        if self.critic_statistics:  # the statistics critic's gradient with respect to its own input
            with torch.no_grad():
                stats = self.critic.statistics_input(u_real.detach())
            inputs.append(stats.requires_grad_(True))
        with torch.enable_grad():
            score = self.critic(u, feats) if stats is None else self.critic(u, feats, statistics=stats)
            grads = torch.autograd.grad(score.float().sum(), inputs, create_graph=True, allow_unused=True)
        return sum(g.float().square().flatten(1).sum(dim=1).mean() for g in grads if g is not None)

    # -- training ----------------------------------------------------------------------------

    def make_optimizers(self, lr: float = 1e-4, betas=(0.5, 0.999), critic_lr_scale: float = 1.0,
                        **options) -> dict:
        """Adam optimisers of the critic and of the generator.

        Parameters
        ----------
        lr : float, optional
            Learning rate of the generator, and of the critic times ``critic_lr_scale``
            (1e-4 for both as in the SN galaxy GAN of Lanusse et al.).
        betas : tuple of float, optional
            Adam betas (the DCGAN value ``(0.5, 0.999)``).
        critic_lr_scale : float, optional
            The critic's learning rate over the generator's (the two time-scale update
            rule, Heusel et al. 2017: a critic that learns faster than a pretrained
            generator moves).
        **options
            ``name`` (``adam`` or ``adamw``) and options of the optimiser.

        Returns
        -------
        dict
            ``{"critic": ..., "generator": ...}``.
        """
        betas = tuple(float(b) for b in betas)
        name = options.pop("name", "adam")
        if name == "sgd":
            raise GalgenInputError("optimizer.name: the GAN trains with Adam (or AdamW), not SGD")
        if not (isinstance(critic_lr_scale, (int, float)) and critic_lr_scale > 0):
            raise GalgenInputError(f"optimizer.critic_lr_scale: must be a positive number, got {critic_lr_scale!r}")
        return {"critic": make_optimizer(self.critic.parameters(), lr * float(critic_lr_scale), name, betas=betas,
                                         **options),
                "generator": make_optimizer([p for p in self.generator.parameters() if p.requires_grad], lr, name,
                                            betas=betas, **options)}

    def training_step(self, batch: Batch, optimizers: dict, step: int, sync=no_sync) -> dict:
        """One critic update and, every ``n_critic`` steps, one generator update and EMA step.

        The critic minimises :meth:`critic_loss` on the batch's galaxies and on fakes made
        without gradient and observed with the batch's PSFs, noise and conditions, plus
        ``r1_gamma / 2 * r1_every * R1`` when ``step % r1_every == 0``; the generator
        then minimises :meth:`generator_loss` on fresh fakes through the physics layer,
        the critic's weights frozen, and the weight average follows (from step
        ``critic_warmup`` on: before, the critic trains alone).

        Parameters
        ----------
        batch : Batch
        optimizers : dict
            ``{"critic": ..., "generator": ...}`` from :meth:`make_optimizers`.
        step : int
            Global step (0-based).
        sync : callable, optional
            Gradient synchronisation (data parallel).

        Returns
        -------
        dict of str to torch.Tensor
            Detached scalars: ``loss`` (the critic's), ``d_real``, ``d_fake`` (mean
            scores), ``accuracy`` (the fraction of real scores above 0 and fake ones
            below, over both), ``r1`` on R1 steps, ``generator_loss`` (and with
            ``anchor``, ``anchor_chi2``, the mean chi-square to the start) on generator
            steps.
        """
        opt_c, opt_g = optimizers["critic"], optimizers["generator"]
        torch.clear_autocast_cache()
        n = len(batch)
        obs = self.fake_observation(batch)
        feats = self.condition_features(batch.cond, n)
        both = None if feats is None else torch.cat([feats, feats])
        mask = getattr(batch.observation.noise, "mask", None)

        with torch.no_grad():
            _, fake = self._observe_fakes(obs, feats, n, raw=True)
            u_real, u_fake = self.critic_input(batch.observed, mask), self.critic_input(fake, mask)
            if self.critic_statistics and not bool(self.critic.stats_fitted):
                self.critic.fit_statistics_scale(u_real)
        opt_c.zero_grad(set_to_none=True)
        scores = self.critic_terms(torch.cat([u_real, u_fake]), both).float()
        d_real, d_fake = scores[:n], scores[n:]
        loss = self.critic_loss(d_real, d_fake)
        total = scores.detach().sum(1) if scores.ndim == 2 else scores.detach()
        metrics = {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach(),
                   "accuracy": ((total[:n] > 0).float().mean() + (total[n:] < 0).float().mean()) / 2}
        if scores.ndim == 2:  # the other critics' own scores (critic_profile, critic_statistics)
            names = (["profile"] if self.critic_profile else []) + (["statistics"] if self.critic_statistics else [])
            for j, name in enumerate(names, 1):
                metrics.update({f"d_real_{name}": d_real[:, j].mean().detach(),
                                f"d_fake_{name}": d_fake[:, j].mean().detach()})
        if self.r1_gamma > 0 and int(step) % self.r1_every == 0:
            r1 = self.r1_penalty(u_real, feats)
            loss = loss + 0.5 * self.r1_gamma * self.r1_every * r1
            metrics["r1"] = r1.detach()
        loss.backward()
        critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        sync(critic_params)
        opt_c.step()
        metrics["loss"] = loss.detach()

        game = int(step) - self.critic_warmup
        if game >= 0 and (game + 1) % self.n_critic == 0:
            targets = None
            if self.match_statistics > 0:
                with torch.no_grad():
                    targets = self.matched_statistics(batch.observed, mask)
            penalty = self._penalty(targets, mask) if (self.anchor or self.match_statistics) else None
            metrics.update(self._generator_update(obs, feats, n, mask, opt_g, critic_params, sync,
                                                  self.generator_loss, penalty))
            self.update_ema(game // self.n_critic)
        return metrics

    def critic_terms(self, u: torch.Tensor, feats=None) -> torch.Tensor:
        """The scores the losses see: ``(B,)``, or ``(B, k)``, one column per critic, with
        ``critic_profile`` or ``critic_statistics``.

        Parameters
        ----------
        u : torch.Tensor
            ``(B, S, S)`` critic inputs.
        feats : torch.Tensor, optional
            Standardised conditions.

        Returns
        -------
        torch.Tensor
        """
        several = self.critic_profile or self.critic_statistics
        return self.critic(u, feats, parts=True) if several else self.critic(u, feats)

    def _anchor_penalty(self, z, feats, observation, noiseless, observed=None):
        """``anchor / 2 * mean chi2`` of the fakes against the start's galaxies of the same ``z``
        (``feats`` is None: a ``head="vae"`` GAN is unconditional)."""
        with torch.no_grad():
            start = observation.noiseless(self.generator_anchor(z).to(noiseless.dtype))
        chi2 = observation.noise.chi2(noiseless, start)
        return 0.5 * self.anchor * chi2.float().mean(), {"anchor_chi2": chi2.detach().float().mean()}

    def matched_statistics(self, observed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The morphology statistics ``match_statistics`` matches, of detector images.

        Gini coefficient (:func:`~galgen.models.networks.gini_coefficient`) on statmorph's
        Gini segmentation map (:func:`~galgen.models.networks.gini_mask`; Spearman 0.96
        with the evaluation's Gini on 500 noisy simulated SDSS galaxies, where the Gini of
        all detected pixels has -0.14), concentration
        (:func:`~galgen.models.networks.light_concentration`, 0.93) and half-light radius
        (:func:`~galgen.models.networks.growth_radii`, pixels) of the detected pixels
        (:func:`~galgen.models.networks.detection_mask`) about the centre pixel;
        differentiable in ``observed``. The Gini's gradient reaches only the part of each
        image that is not round about the centre (``x - azimuthal_mean(x)``): raising a
        smooth galaxy's Gini by brightening its brightest pixels, its centre, would
        shrink it (measured: runs 14-16 of docs/models.md), so the Gini can be raised
        only by clumps, arms and other structure; the radial profile is left to the
        concentration and the half-light radius.

        Parameters
        ----------
        observed : torch.Tensor
            ``(B, S, S)`` detector images (ADU), noisy.
        mask : torch.Tensor, optional
            ``(B, S, S)`` or ``(S, S)`` boolean, True = pixel excluded (set to 0).

        Returns
        -------
        torch.Tensor
            ``(B, 3)``: Gini, concentration, half-light radius (NaN where undefined).
        """
        x = observed if mask is None else torch.where(mask, torch.zeros_like(observed), observed)
        round_part = azimuthal_mean(x)
        x_gini = x - (round_part - round_part.detach())  # same values; gradient only off the radial profile
        use = detection_mask(x)
        return torch.stack([gini_coefficient(x_gini, gini_mask(x, detected=use)), light_concentration(x, use),
                            growth_radii(x, use, (0.5,))[:, 0]], 1)

    def _penalty(self, targets, mask=None):
        """The generator's extra terms: the anchor's, and ``match_statistics`` times the
        distance of the fakes' :meth:`matched_statistics` to the batch's (``targets``), the
        batch's excluded pixels (``mask``) left out of both."""
        def penalty(z, feats, observation, noiseless, observed):
            loss, metrics = 0.0, {}
            if self.anchor:
                loss, metrics = self._anchor_penalty(z, feats, observation, noiseless)
            if targets is not None:
                dist = quantile_distance(self.matched_statistics(observed.to(targets.dtype), mask), targets)
                ok = torch.isfinite(dist)
                loss = loss + self.match_statistics * torch.where(ok, dist, torch.zeros_like(dist)).sum()
                metrics.update(match_gini=dist[0].detach(), match_concentration=dist[1].detach(),
                               match_r50=dist[2].detach())
            return loss, metrics
        return penalty

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> dict:
        """Critic scores of held-out galaxies and of fakes observed like them, and their statistics.

        The fakes are :meth:`validation_fakes` (from the averaged generator, the same
        latent vectors and noise every time). There is no likelihood: the returned dict
        has no ``loss``, and the trainer uses the mean of the KS distances of
        :func:`galgen.evaluation.observed_statistics` (flux, HSM size, ``|e|``) of the
        real and the fake stamps instead.

        Parameters
        ----------
        batch : Batch

        Returns
        -------
        dict
            ``critic_real``, ``critic_fake`` (each ``(B,)``) and ``observed_fakes``
            (``(B, S, S)``, the fakes as observed).
        """
        n = len(batch)
        feats = self.condition_features(batch.cond, n)
        mask = getattr(batch.observation.noise, "mask", None)
        _, fake = self.validation_fakes(batch)
        u = torch.cat([self.critic_input(batch.observed, mask), self.critic_input(fake, mask)])
        scores = self.critic(u, None if feats is None else torch.cat([feats, feats])).float()
        return {"critic_real": scores[:n], "critic_fake": scores[n:],
                "observed_fakes": fake}


def quantile_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Wasserstein-1 distance between the columns of two samples, in units of ``y``'s spread.

    Each column's ``K = min(len(x), len(y))`` quantiles at ``(k + 1/2) / K`` (NaN values left
    out): ``mean_k |q_x(k) - q_y(k)| / std_k q_y(k)``. Differentiable in ``x`` (not in
    the spread); how far a batch of fakes' statistics lies from the data's.

    Parameters
    ----------
    x, y : torch.Tensor
        ``(N, k)`` and ``(M, k)``.

    Returns
    -------
    torch.Tensor
        ``(k,)``; NaN for a column with no finite value.

    Examples
    --------
    >>> y = torch.linspace(0, 1, 101)[:, None]
    >>> round(float(quantile_distance(y + 0.1, y)[0]), 2)  # 0.1 / 0.29, the spread of U(0, 1)
    0.34
    """
    k = min(len(x), len(y))
    q = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k
    qx, qy = torch.nanquantile(x, q, dim=0), torch.nanquantile(y.to(x.dtype), q, dim=0)
    return (qx - qy).abs().mean(0) / qy.std(0).detach().clamp_min(torch.finfo(x.dtype).tiny)


def _per_galaxy(loss: torch.Tensor) -> torch.Tensor:
    """Per-galaxy losses summed over critics: ``(B,)`` from ``(B,)`` or ``(B, k)``."""
    return loss.sum(dim=1) if loss.ndim == 2 else loss


def _generator_vae(config, head, stamp, latent_dim, oversampling, cond_dim):
    """The VAE (untrained weights) whose flow and decoder a ``head="vae"`` GAN generates with."""
    if head != "vae":
        if config is not None:
            raise GalgenInputError(f"vae: an option of head='vae', not of head={head!r}")
        return None
    if not isinstance(config, dict) or config.get("kind", "vae") != "vae":
        raise GalgenInputError(f"vae: head='vae' needs the config dict of a VAE, got {config!r}")
    source = VAE.from_config(config)
    if source.cond_dim or cond_dim:
        raise GalgenInputError("conditions: a GAN with head='vae' is unconditional, and so must its VAE be")
    for name, mine, theirs in (("stamp", stamp, source.config["stamp"]), ("latent_dim", latent_dim,
                               source.latent_dim), ("oversampling", oversampling, source.config["oversampling"])):
        if int(mine) != int(theirs):
            raise GalgenInputError(f"{name}: {mine} differs from the VAE's {theirs} (GAN.from_vae sets it)")
    return source
