"""The observation loader, the training read-ahead with workers, and the fit-file reader."""

import h5py
import numpy as np
import pytest
import torch

from galgen.data import FIT_SCHEMA_VERSION, FitFile, ObservationLoader, observation_from_cutouts
from galgen.errors import GalgenInputError, SchemaError
from galgen.train.data import TrainingData


def test_loader_decodes_a_file_one_way(sdss_tiny):
    rows = [5, 1, 9]
    with h5py.File(sdss_tiny, "r") as f:
        raw = {k: f[k][()][rows] for k in ("observed", "psf", "variance", "mask")}
    lazy = ObservationLoader(sdss_tiny, [0, 5, 1, 9], conditions=("flux",))
    eager = ObservationLoader(sdss_tiny, [0, 5, 1, 9], conditions=("flux",), in_memory=True)
    for loader in (lazy, eager):
        b = loader.batch([1, 2, 3])
        assert torch.equal(b.observed, torch.from_numpy(raw["observed"]))
        assert b.index.tolist() == rows and b.cond.dtype == torch.float32 and b.cond.shape == (3, 1)
        assert b.observation.noise.mask.dtype == torch.bool
        assert torch.equal(b.observation.noise.mask, torch.from_numpy(raw["mask"] != 0))
        assert torch.allclose(b.observation.psf.sum((-2, -1)), torch.ones(3), atol=1e-6)
        assert torch.equal(b.observation.noise.variance_map, torch.from_numpy(raw["variance"]))
    assert lazy.stamp_size == 32 and "sdss_tiny" in repr(lazy)
    with pytest.raises(GalgenInputError, match="sdss_tiny.*stamp 32 / oversampling 1 differ from the model's 64"):
        lazy.check_grid(64, 1)
    with pytest.raises(GalgenInputError, match="no column"):
        ObservationLoader(sdss_tiny, conditions=("nope",))
    starts = [b.index[0].item() for b in ObservationLoader(sdss_tiny).iter_batches(16, start=32)]
    assert starts == [32, 48]
    obs = observation_from_cutouts(sdss_tiny, [5, 1, 9], dtype=torch.float64)
    assert obs.psf.dtype == torch.float64 and obs.psf.shape[0] == 3


def test_training_data_reads_ahead_with_workers(sdss_tiny, monkeypatch):
    """num_workers was stored but never used (the loader hard-coded 0): it now reads ahead, same batches."""
    made = []
    real = torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        made.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording)
    positions = [torch.tensor([3, 0, 7]), torch.tensor([1, 2, 4])]
    plain = list(TrainingData(sdss_tiny, np.arange(10), in_memory=False).prefetch(positions))
    ahead = list(TrainingData(sdss_tiny, np.arange(10), in_memory=False, num_workers=2).prefetch(positions))
    assert made == [2]
    for a, b in zip(plain, ahead):
        assert torch.equal(a.observed, b.observed) and torch.equal(a.index, b.index)
        assert torch.equal(a.observation.psf, b.observation.psf)
    with pytest.raises(GalgenInputError, match="num_workers"):
        TrainingData(sdss_tiny, np.arange(10), num_workers=-1)


def test_fit_file_has_its_own_schema_and_reader(sdss_tiny, tmp_path):
    """Fit files were stamped with the cutout schema's version; the catalog's status came out as a FITS logical."""
    from astropy.table import Table

    from galgen.inference import fit_file

    out = fit_file("sersic", sdss_tiny, tmp_path / "fit.h5", device="cpu", batch_size=8, max_iter=20, restarts=0,
                   shard=None)
    with FitFile(out) as f:
        assert f.attrs["schema_version"] == FIT_SCHEMA_VERSION and f.attrs["format"] == "galgen-fits"
        assert len(f) == 64 and not f.has_samples
        assert np.array_equal(f.read("chi2", [3, 1]), f.read("chi2")[[3, 1]])
        assert f.derived_names == ["flux", "hlr", "e1", "e2"]
    cat = Table.read(out.with_suffix(".fits"))
    assert cat["status"].dtype.kind == "i" and cat["status"].dtype.itemsize == 2
    with pytest.raises(SchemaError, match="not a galgen fit file"):
        FitFile(sdss_tiny)


def test_a_galaxy_without_good_pixels_has_status_3():
    from galgen.inference import STATUS, fit_map
    from galgen.models.parametric import SersicModel
    from galgen.physics import GaussianNoise, Observation, gaussian_psf

    model = SersicModel("sersic", stamp=16, pixel_scale=0.4)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[1] = True
    obs = Observation(gaussian_psf(1.0, 9, 0.4), pixel_scale=0.4, stamp=16,
                      noise=GaussianNoise(torch.ones(2, 16, 16), mask))
    with torch.no_grad():
        _, data = obs.observe(1e3 * model.decode(torch.zeros(2, model.latent_dim)),
                              generator=torch.Generator().manual_seed(0))
    res = fit_map(model, data, obs, max_iter=30)
    assert res.status[1] == 3 and STATUS[3] == "no-good-pixels" and res.status[0] in (0, 1)
