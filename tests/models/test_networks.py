import math

import numpy as np
import pytest
import torch

from galgen.errors import GalgenInputError
from galgen.models import Decoder, Encoder


@pytest.mark.parametrize("size", [32, 48, 64, 128])
def test_shapes_and_non_negative_output(size):
    torch.manual_seed(0)
    enc = Encoder(size, out_features=24, width=8, max_width=32)
    dec = Decoder(size, in_features=12, width=8, max_width=32, flux_scale=50.0)
    x = torch.randn(2, size, size)
    assert enc(x).shape == (2, 24)
    img = dec(torch.randn(2, 12))
    assert img.shape == (2, size, size)
    assert bool((img >= 0).all())


def test_gradients_reach_every_parameter():
    enc = Encoder(32, out_features=8, width=8)
    dec = Decoder(32, in_features=8, width=8)
    loss = dec(enc(torch.randn(3, 32, 32))).square().mean()
    loss.backward()
    for name, p in list(enc.named_parameters()) + list(dec.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_decoder_fits_a_galaxy_like_blob():
    """A few hundred Adam steps make the decoder reproduce a fixed exponential blob."""
    torch.manual_seed(1)
    y, x = torch.meshgrid(torch.arange(32.0) - 16, torch.arange(32.0) - 16, indexing="ij")
    target = 200 * torch.exp(-torch.sqrt(x**2 + (y / 0.7) ** 2) / 3)
    dec = Decoder(32, in_features=4, width=8, max_width=32, flux_scale=10.0)
    z = torch.randn(1, 4)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = (dec(z)[0] - target).square().mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.02 * first
    assert dec.log_flux_scale.item() != pytest.approx(2.302585, abs=1e-3)  # the scale was learned


def test_bad_sizes():
    with pytest.raises(GalgenInputError, match="stamp"):
        Encoder(2, out_features=4)
    enc = Encoder(32, out_features=4, width=8)
    with pytest.raises(GalgenInputError, match=r"x: expected \(B, 1, 32, 32\)"):
        enc(torch.zeros(1, 48, 48))
    with pytest.raises(GalgenInputError, match="flux_scale"):
        Decoder(32, in_features=4, flux_scale=0.0)


def test_bilinear_sample_is_grid_sample_with_forward_derivatives():
    """The warp's resampler: grid_sample's bilinear, zero-padded values, and forward-mode
    derivatives (which grid_sample lacks) equal to reverse mode's."""
    from galgen.models.networks import bilinear_sample

    gen = torch.Generator().manual_seed(0)
    img = torch.randn(3, 20, 20, generator=gen, dtype=torch.float64)
    # coordinates inside, on the edges and outside the grid
    xs = torch.rand(3, 11, 13, generator=gen, dtype=torch.float64) * 24 - 2
    ys = torch.rand(3, 11, 13, generator=gen, dtype=torch.float64) * 24 - 2
    grid = torch.stack([(2 * xs + 1) / 20 - 1, (2 * ys + 1) / 20 - 1], dim=-1)
    ref = torch.nn.functional.grid_sample(img[:, None], grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)[:, 0]
    out = bilinear_sample(img, xs, ys)
    assert torch.allclose(out, ref, atol=1e-12)
    vi, vx = torch.randn_like(img), torch.randn_like(xs)
    _, fwd = torch.func.jvp(lambda a, b: bilinear_sample(a, b, ys), (img, xs), (vi, vx))
    w = torch.randn_like(out)
    gi, gx = torch.autograd.grad((bilinear_sample(img.requires_grad_(), xs.requires_grad_(), ys) * w).sum(),
                                 (img, xs))
    assert torch.allclose((fwd * w).sum(), (gi * vi).sum() + (gx * vx).sum(), rtol=1e-10)


def test_decoder_layouts_agree_in_every_mode_of_differentiation():
    """The decoder runs its feature maps channels-last (fast on CPUs) and, under vmap or
    forward-mode AD, its group norms written out elementwise; every path gives the images
    of a plain contiguous pass of the same layers (torch's own group_norm), and
    forward-mode derivatives equal reverse mode's."""
    torch.manual_seed(3)
    dec = Decoder(32, in_features=6, width=8, max_width=32, flux_scale=20.0).eval().requires_grad_(False)
    z = torch.randn(4, 6)
    v = torch.randn(4, 6)
    with torch.no_grad():  # the same layers on contiguous maps, by hand
        h = dec.project(z).view(-1, dec.seed_channels, dec.seed, dec.seed)
        plain = torch.nn.functional.softplus(dec.out(dec.body(h))[:, 0]) * (
            dec.log_flux_scale + dec.amplitude(z)[:, :, None]).exp()
        fast = dec(z)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    primal, tangent = torch.func.jvp(dec, (z,), (v,))  # forward mode (the Levenberg-Marquardt Jacobian)
    torch.testing.assert_close(primal, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    _, vjp = torch.func.vjp(dec, z)
    u = torch.randn_like(plain)
    # <u, J v> = <J^T u, v>
    lhs, rhs = float((u * tangent).sum()), float((vjp(u)[0] * v).sum())
    assert lhs == pytest.approx(rhs, rel=1e-4)
    batched = torch.func.vmap(lambda t: torch.func.jvp(dec, (z,), (t,))[1])(torch.stack([v, -2 * v]))
    torch.testing.assert_close(batched[1], -2 * tangent, rtol=1e-4, atol=1e-4 * float(tangent.abs().max()))


def _companion_generator():
    from galgen.models.networks import FluxShapeGenerator

    torch.manual_seed(0)
    g = FluxShapeGenerator(48, in_features=17, width=8, log_flux=(math.log(2000.0), 0.3), profile="bulge-disk",
                           seed_latents=True, companion=True, companion_coordinate=9)
    torch.nn.init.normal_(g.shape.out.weight, std=0.3)  # a body that draws something
    return g.eval()


def test_companion_keeps_the_flux_and_lies_where_its_parameters_say():
    """FluxShapeGenerator(companion=True): image = F ((1 - f) shape + f C) sums to F; the
    companion's light is centred on the centre pixel + (dx, dy) and has the drawn half-light
    radius (a round exponential, measured on the image); its coordinates are read by nothing
    else (body logits, flux and seed unchanged when they move)."""
    g = _companion_generator()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 17, generator=gen) * 0.5
    with torch.no_grad():
        g.companion.loc.copy_(torch.tensor([0.0, 6.0, -4.0, -0.7, 0.0, 0.0, -1.0]))  # compact, off the edges
        g.companion.log_scale.zero_()
        z[:, 9:16] = torch.randn(6, 7, generator=gen) * torch.tensor([1.0, 2.0, 2.0, 0.2, 0.0, 0.0, 0.0])
        img = g(z)
        p = g.companion_parameters(z)
        comp = g.companion_image(z, p)
        other = z.clone()
        other[:, 9:16] = torch.randn(6, 7, generator=gen)
        assert torch.equal(g.shape.logits(g._networks_input(z)), g.shape.logits(g._networks_input(other)))
        assert torch.equal(g.log_flux(z), g.log_flux(other))
        assert torch.equal(g.template(z), g.template(other))
        off = z.clone()
        off[:, 9] = -1e3  # flux fraction 0: the galaxy without its companion
        alone = g(off)
        flux = g.log_flux(z).exp()
    assert torch.allclose(img.sum((1, 2)), flux, rtol=1e-5)
    f = p["fraction"][:, None, None]
    expected = (1 - f) * alone + f * flux[:, None, None] * comp
    assert torch.allclose(img, expected, rtol=1e-4, atol=1e-6 * float(flux.max()))
    assert torch.allclose(comp.sum((1, 2)), torch.ones(6), atol=1e-5)
    pix = torch.arange(48, dtype=torch.float32) - 24
    cx, cy = (comp * pix[None, None, :]).sum((1, 2)), (comp * pix[None, :, None]).sum((1, 2))
    assert torch.allclose(cx, p["dx"], atol=0.05) and torch.allclose(cy, p["dy"], atol=0.05), (cx, p["dx"], cy, p["dy"])
    # half-light radius: where the light of the pixels sorted by distance reaches half (round, g = 0)
    r = torch.hypot(pix[None, None, :] - p["dx"][:, None, None], pix[None, :, None] - p["dy"][:, None, None])
    r, order = r.flatten(1).sort(1)
    cum = comp.flatten(1).gather(1, order).cumsum(1)
    measured = r.gather(1, (cum < 0.5).sum(1, keepdim=True))[:, 0]
    hlr = g.template_sigma * p["log_size"].exp()
    assert torch.allclose(measured, hlr, rtol=0.12), (measured, hlr)


def test_companion_coordinates_must_fit_beside_the_seed_and_the_gate():
    from galgen.models.networks import FluxShapeGenerator

    kw = dict(width=8, profile="bulge-disk", seed_latents=True, companion=True)
    with pytest.raises(GalgenInputError, match="after the seed"):
        FluxShapeGenerator(32, in_features=17, companion_coordinate=5, **kw)
    with pytest.raises(GalgenInputError, match="must start in"):
        FluxShapeGenerator(32, in_features=17, companion_coordinate=12, **kw)
    with pytest.raises(GalgenInputError, match="gate's coordinate 12"):
        FluxShapeGenerator(32, in_features=17, companion_coordinate=9, symmetry_gate="latent", gate_coordinate=12, **kw)
    with pytest.raises(GalgenInputError, match="without companion=True"):
        FluxShapeGenerator(32, in_features=17, companion_coordinate=9, width=8)
    with pytest.raises(GalgenInputError, match="no companion"):
        FluxShapeGenerator(32, in_features=8, width=8).companion_parameters(torch.zeros(1, 8))


def test_a_network_companion_starts_faint_and_keeps_the_flux():
    """FluxShapeGenerator(companion=True) without companion coordinates: a network of the whole
    code, starting at flux fraction sigmoid(-3.5) at the centre for every code; the image sums
    to its flux, and the companion's parameters get gradients."""
    from galgen.models.networks import FluxShapeGenerator

    torch.manual_seed(0)
    g = FluxShapeGenerator(32, in_features=8, width=8, log_flux=(math.log(500.0), 0.3), companion=True)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    img = g(z)
    p = g.companion_parameters(z)
    assert torch.allclose(p["fraction"], torch.full((4,), 1 / (1 + math.exp(3.5))), rtol=1e-5)
    assert torch.allclose(p["dx"], torch.zeros(4)) and torch.allclose(p["dy"], torch.zeros(4))
    assert torch.allclose(img.sum((1, 2)), g.log_flux(z).exp(), rtol=1e-5)
    (img[:, 20:, 20:].sum()).backward()
    assert float(g.companion[2].weight.grad.abs().sum()) > 0


def test_gini_coefficient_moves_with_the_light_and_drops_unused_pixels():
    """The values 1..n have the Gini of the mean-difference form, sum_ij |x_i - x_j| /
    (2 n (n - 1) mean), computed here independently of the sorted form; unused pixels do
    not count (two used: {1, 2} -> 1/3; none: NaN); the gradient raises the Gini when light
    moves from the faintest pixel to the brightest."""
    from galgen.models.networks import gini_coefficient

    n = 10
    ramp = torch.arange(1.0, n + 1, dtype=torch.float64)[None]
    mad = sum(abs(i - j) for i in range(1, n + 1) for j in range(1, n + 1))
    expected = mad / (2 * n * (n - 1) * ramp.mean().item())
    assert gini_coefficient(ramp).item() == pytest.approx(expected, rel=1e-12)
    use = torch.zeros_like(ramp, dtype=torch.bool)
    use[0, :2] = True
    assert gini_coefficient(ramp, use).item() == pytest.approx(1.0 / 3.0, rel=1e-12)  # {1, 2}
    assert math.isnan(gini_coefficient(ramp, use & False).item())
    x = ramp.clone().requires_grad_(True)
    gini_coefficient(x).backward()
    assert x.grad[0, -1] > 0 > x.grad[0, 0]  # brighter brightest / fainter faintest: higher Gini


def test_light_concentration_follows_the_analytic_sersic_growth_curves():
    """5 log10(r80 / r20) of GalSim's Sersic profiles (n = 1, 2.5, 4; 128 x 128, half-light
    radius 6 px) against the analytic curve of growth, gamma(2n, b r^(1/n)), whose radii are
    gammaincinv(2n, f)^n up to a common scale: within 0.1 (the stamp's truncation and
    pixelisation); more concentrated profiles score higher."""
    import galsim
    from scipy.special import gammaincinv

    from galgen.models.networks import light_concentration

    got = []
    for n in (1.0, 2.5, 4.0):
        prof = galsim.Sersic(n, half_light_radius=6.0)
        im = torch.from_numpy(prof.drawImage(nx=128, ny=128, scale=1.0, use_true_center=False).array.astype("f8"))
        frac = float(im.sum())  # light inside the stamp: the curve of growth's total
        r80, r20 = (gammaincinv(2 * n, f * frac) ** n for f in (0.8, 0.2))
        got.append(light_concentration(im[None])[0].item())
        assert got[-1] == pytest.approx(5 * math.log10(r80 / r20), abs=0.1), n
    assert got[0] < got[1] < got[2]


def test_detection_mask_finds_the_galaxy_and_few_noise_pixels():
    """On pure unit noise about 2.3% of the pixels pass (a one-sided 2 sigma cut of the 3 x 3
    mean; neighbours correlate, so the bound is loose); every pixel of a bright square
    passes; the centre always counts; no gradient."""
    from galgen.models.networks import detection_mask

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(32, 64, 64, generator=g)
    frac = detection_mask(noise).float().mean().item()
    assert 0.01 < frac < 0.05
    x = noise.clone()
    x[:, 24:40, 24:40] += 3.0
    assert bool(detection_mask(x)[:, 25:39, 25:39].all())
    assert bool(detection_mask(torch.zeros(2, 16, 16))[:, 7:10, 7:10].all())
    assert not detection_mask(x.requires_grad_(True)).requires_grad


def _noisy_sersics(seed, use_true_center, n=120):
    """``n`` PSF-convolved GalSim Sersic galaxies on 64 x 64 SDSS pixels with Gaussian noise of
    rms 10 ADU: n 0.7-4, half-light radius 0.6-2.5", axis ratio 0.3-1, 10^3.5-10^5 ADU."""
    import galsim

    rng = np.random.default_rng(seed)
    noisy = []
    for _ in range(n):
        gal = galsim.Sersic(rng.uniform(0.7, 4.0), half_light_radius=rng.uniform(0.6, 2.5))
        gal = gal.shear(q=rng.uniform(0.3, 1.0), beta=rng.uniform(0, 180) * galsim.degrees)
        gal = galsim.Convolve(gal.withFlux(10 ** rng.uniform(3.5, 5.0)), galsim.Moffat(3.5, fwhm=1.4))
        im = gal.drawImage(nx=64, ny=64, scale=0.396, use_true_center=use_true_center).array.astype("f8")
        noisy.append(im + rng.normal(0.0, 10.0, im.shape))
    return np.stack(noisy)


def test_gini_mask_gives_the_evaluations_gini_of_sersic_galaxies():
    """The Gini on gini_mask (statmorph's Gini segmap about the centroid, 3 x 3 sub-pixels)
    of noise-free GalSim Sersic profiles (n = 1, 2.5, 4; axis ratio 1 and 0.5) lies within
    0.01 of the evaluation's (morphology_statistics: about the asymmetry centre, 7 x 7
    sub-pixels); of 120 PSF-convolved noisy Sersic galaxies (n 0.7-4, half-light radius
    0.6-2.5", S/N from a few to hundreds) it ranks them as the evaluation does (Spearman
    > 0.85) within a median 0.015; the map holds the centre and is one bounded region."""
    import galsim
    from scipy.stats import spearmanr

    from galgen.evaluation import morphology_statistics
    from galgen.models.networks import gini_coefficient, gini_mask

    ims = np.stack([galsim.Sersic(n, half_light_radius=1.2).shear(q=q, beta=30 * galsim.degrees)
                    .drawImage(nx=64, ny=64, scale=0.396, use_true_center=False).array.astype("f8")
                    for n in (1.0, 2.5, 4.0) for q in (1.0, 0.5)])
    x = torch.from_numpy(ims)
    mask = gini_mask(x)
    got = gini_coefficient(x, mask).numpy()
    assert np.abs(got - morphology_statistics(ims, 0.396)["gini"]).max() < 0.01
    assert bool(mask[:, 32, 32].all())
    grown = torch.nn.functional.max_pool2d(mask[:, None].double(), 3, 1, 1)[:, 0] > 0
    assert bool((grown & ~mask).any(dim=(1, 2)).all())  # a bounded region
    noisy = _noisy_sersics(0, use_true_center=True)
    ref = morphology_statistics(noisy, 0.396, variance=np.full_like(noisy, 100.0))
    xn = torch.from_numpy(noisy)
    got = gini_coefficient(xn, gini_mask(xn)).numpy()
    ok = ref["ok"]
    assert ok.sum() > 110
    assert spearmanr(got[ok], ref["gini"][ok])[0] > 0.85
    assert np.median(np.abs(got[ok] - ref["gini"][ok])) < 0.015


def test_morphology_vector_ranks_galaxies_as_the_evaluation_does():
    """morphology_vector on 120 PSF-convolved noisy GalSim Sersic galaxies (n 0.7-4, half-light
    radius 0.6-2.5", axis ratio 0.3-1, S/N from a few to hundreds): each column ranks them
    as the evaluation's statistic does (Spearman > 0.9 for r50, flux, e1, e2; > 0.85 for
    Gini and M20; > 0.75 for the size against HSM's; > 0.6 for the concentration, measured
    0.73, whose aperture differs most); a noise-free sheared galaxy has e1 of the shear's
    sign and no e2 or asymmetry; a companion raises the asymmetry, and the noise's share is
    subtracted (symmetric noisy galaxies: median asymmetry within 0.02 of 0);
    every column is differentiable."""
    import galsim
    from scipy.stats import spearmanr

    from galgen.evaluation import morphology_statistics
    from galgen.models.networks import MORPHOLOGY_VECTOR, morphology_vector

    noisy = _noisy_sersics(1, use_true_center=False)
    ref = morphology_statistics(noisy, 0.396, variance=np.full_like(noisy, 100.0))
    x = torch.from_numpy(noisy).requires_grad_(True)
    v = morphology_vector(x)
    got = v.detach().numpy()
    ok = ref["ok"] & np.isfinite(got).all(1)
    assert ok.sum() > 110
    names = dict(gini="gini", m20="m20", concentration="concentration", log_r50="r50", log_flux="flux",
                 e1="e1", e2="e2", log_size="sigma")
    for j, col in enumerate(MORPHOLOGY_VECTOR):
        if col in names:
            rho = spearmanr(got[ok, j], ref[names[col]][ok])[0]
            floor = {"concentration": 0.6, "log_size": 0.75, "gini": 0.85, "m20": 0.85}.get(col, 0.9)
            assert rho > floor, (col, rho)
    assert abs(float(np.median(got[ok, MORPHOLOGY_VECTOR.index("asymmetry")]))) < 0.02
    v.nan_to_num(0.0).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    clean = galsim.Exponential(half_light_radius=1.2).shear(e1=0.3, e2=0.0)
    im = clean.drawImage(nx=64, ny=64, scale=0.396, use_true_center=False).array.astype("f8")
    lopsided = im + (0.3 * clean.shift(2.0, 0.0)).drawImage(nx=64, ny=64, scale=0.396, use_true_center=False).array
    v = morphology_vector(torch.from_numpy(np.stack([im, -im.T.copy(), lopsided])))
    e1, e2, asym = (MORPHOLOGY_VECTOR.index(c) for c in ("e1", "e2", "asymmetry"))
    assert float(v[0, e1]) > 0.1 and abs(float(v[0, e2])) < 0.01 and abs(float(v[0, asym])) < 0.01
    assert float(v[2, asym]) > 0.05
