"""``to()`` and ``repr`` of the noise models and of ``Observation``."""

import pytest
import torch

from galgen.physics import CCDNoise, CorrelatedGaussianNoise, GaussianNoise, Observation, gaussian_psf

S = 8


def _gaussian():
    var = torch.linspace(1.0, 4.0, 3 * S * S, dtype=torch.float32).reshape(3, S, S)
    mask = torch.zeros(3, S, S, dtype=torch.bool)
    mask[1, :2] = True
    return GaussianNoise(var, mask)


def _ccd():
    return CCDNoise(torch.tensor([10.0, 20.0, 30.0]), 4.735, 5.0)


def _correlated():
    kernel = torch.tensor([[0.1, 0.2, 0.1], [0.2, 1.0, 0.2], [0.1, 0.2, 0.1]], dtype=torch.float32)
    return CorrelatedGaussianNoise.from_correlation(kernel, (S, S))


NOISES = {"gaussian": _gaussian, "ccd": _ccd, "correlated": _correlated}


def _tensors(noise):
    return {k: v for k, v in vars(noise).items() if isinstance(v, torch.Tensor)}


def _observation(noise):
    psfs = torch.stack([gaussian_psf(f, 5, 0.2) for f in (0.5, 0.7, 0.9)])
    return Observation(psfs, pixel_scale=0.4, oversampling=2, stamp=S, noise=noise)


def _data():
    gen = torch.Generator().manual_seed(0)
    intrinsic = torch.rand(3, 2 * S, 2 * S, generator=gen, dtype=torch.float64) * 50
    return intrinsic, torch.randn(3, S, S, generator=gen, dtype=torch.float64) * 3 + 10


@pytest.mark.parametrize("kind", NOISES)
def test_observation_to_moves_every_noise_model(kind):
    """No noise model stays behind: each one's floating tensors take the new dtype."""
    obs = _observation(NOISES[kind]())
    moved = obs.to(dtype=torch.float64)
    assert moved.psf.dtype == torch.float64 and obs.psf.dtype == torch.float32
    assert type(moved.noise) is type(obs.noise) and moved.noise is not obs.noise
    for name, t in _tensors(moved.noise).items():
        before = getattr(obs.noise, name)
        if name == "mask":
            assert t.dtype == torch.bool
        elif kind == "ccd":  # CCD parameters are float64 by construction, whatever the images' dtype
            assert t.dtype == torch.float64
        else:
            assert t.dtype == torch.float64 and before.dtype == torch.float32, name
        assert torch.equal(t, before.to(t.dtype)), name


@pytest.mark.parametrize("kind", NOISES)
def test_observation_to_gives_identical_results(kind):
    obs = _observation(NOISES[kind]())
    intrinsic, data = _data()
    for moved in (obs.to(dtype=torch.float64), obs.to(device="cpu"), obs.to(dtype=torch.float32).to(torch.float64)):
        assert torch.equal(moved.log_likelihood(intrinsic, data), obs.log_likelihood(intrinsic, data))
        g = [torch.Generator().manual_seed(1) for _ in range(2)]
        assert torch.equal(moved.observe(intrinsic, generator=g[0])[1], obs.observe(intrinsic, generator=g[1])[1])


@pytest.mark.parametrize("kind", NOISES)
def test_noise_to_moves_device_and_dtype_and_leaves_the_original(kind):
    noise = NOISES[kind]()
    before = {k: (v.dtype, v.device) for k, v in _tensors(noise).items()}
    on_meta = noise.to(device="meta")  # a device move that runs on any machine
    assert type(on_meta) is type(noise)
    for name, t in _tensors(on_meta).items():
        assert t.device.type == "meta" and t.dtype == before[name][0], name
    half = noise.to(dtype=torch.float16)
    for name, t in _tensors(half).items():
        expected = {"mask": torch.bool, "sky_level": torch.float64, "gain": torch.float64,
                    "read_noise": torch.float64}.get(name, torch.float16)
        assert t.dtype == expected, name
    assert {k: (v.dtype, v.device) for k, v in _tensors(noise).items()} == before


def test_noise_to_keeps_python_parameters_and_per_galaxy_selection():
    noise = _gaussian().to(dtype=torch.float64)
    sel = noise.select(torch.tensor([1, 1]))
    assert sel.variance_map.dtype == torch.float64 and sel.mask.shape == (2, S, S)
    ccd = CCDNoise(10.0, 2.0, 5.0).to(dtype=torch.float32)
    assert float(ccd.gain) == 2.0 and ccd.gain.ndim == 0
    assert GaussianNoise(2.0).to(dtype=torch.float64).mask is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", NOISES)
def test_observation_to_cuda_moves_every_noise_tensor(kind):
    obs = _observation(NOISES[kind]()).to(device="cuda")
    assert obs.psf.is_cuda
    for name, t in _tensors(obs.noise).items():
        assert t.is_cuda, name
    intrinsic, data = _data()
    cpu = _observation(NOISES[kind]()).log_likelihood(intrinsic, data)
    assert torch.allclose(obs.log_likelihood(intrinsic.cuda(), data.cuda()).cpu(), cpu, rtol=1e-10)


def test_noise_reprs():
    assert repr(_gaussian()) == "GaussianNoise(variance=float32[3, 8, 8], mask=bool[3, 8, 8])"
    assert repr(GaussianNoise(2.0)) == "GaussianNoise(variance=2, mask=None)"
    assert repr(_ccd()) == "CCDNoise(sky_level=float64[3], gain=4.735, read_noise=5, mask=None)"
    assert repr(_correlated()) == "CorrelatedGaussianNoise(power_spectrum=float32[8, 8])"
    assert repr(_correlated().to(device="meta")) == "CorrelatedGaussianNoise(power_spectrum=float32[8, 8] meta)"


def test_observation_repr():
    obs = _observation(_gaussian())
    assert repr(obs) == ("Observation(psf=float32[3, 5, 5], pixel_scale=0.4, oversampling=2, stamp=8, "
                         "noise=GaussianNoise(variance=float32[3, 8, 8], mask=bool[3, 8, 8]))")
    bare = Observation(gaussian_psf(0.7, 5, 0.2, dtype=torch.float64), pixel_scale=0.2)
    assert repr(bare) == "Observation(psf=float64[5, 5], pixel_scale=0.2, oversampling=1, stamp=None, noise=None)"


def test_sky_variance_is_the_empty_pixel_variance_of_each_image():
    from galgen.physics import CCDNoise, CorrelatedGaussianNoise, GaussianNoise

    like = torch.zeros(3, 8, 8)
    var = torch.full((3, 8, 8), 2.0) * torch.tensor([1.0, 4.0, 9.0])[:, None, None]
    var[:, 3:5, 3:5] += 100.0  # a galaxy's Poisson variance in a few pixels: not the sky
    assert torch.equal(GaussianNoise(var).sky_variance(like), torch.tensor([2.0, 8.0, 18.0]))
    assert torch.equal(GaussianNoise(torch.full((8, 8), 3.0)).sky_variance(like), torch.full((3,), 3.0))
    ccd = CCDNoise(136.58, 4.7, 5.5).sky_variance(like.double())
    assert torch.allclose(ccd, torch.full((3,), 136.58 / 4.7 + (5.5 / 4.7) ** 2, dtype=torch.float64))
    white = CorrelatedGaussianNoise(torch.full((8, 8), 0.5)).sky_variance(like)
    assert torch.allclose(white, torch.full((3,), 0.5))
