"""The HDF5 cutout schema: round trip, atomicity, validation, torch Dataset."""

import h5py
import numpy as np
import pytest
import torch
from astropy.table import Table

from galgen.data import SCHEMA_VERSION, CutoutDataset, CutoutFile, CutoutWriter, read_cutouts
from galgen.errors import GalgenInputError, SchemaError

ATTRS = dict(survey="toy", pixel_scale=0.2, oversampling=2, stamp_size=8, flux_unit="adu", seed=3,
             source="galsim", shard="0/1")
SHAPES = {"observed": (8, 8), "noiseless": (8, 8), "intrinsic": (16, 16), "psf": (5, 5),
          "variance": (8, 8), "mask": (8, 8)}


def _arrays(n, rng):
    return {k: (rng.normal(size=(n,) + s) if k != "mask" else rng.integers(0, 2, (n,) + s)).astype(
        "uint8" if k == "mask" else "float32") for k, s in SHAPES.items()}


def _write(path, n=10, seed=0):
    rng = np.random.default_rng(seed)
    arrays = _arrays(n, rng)
    cat = Table({"index": np.arange(n), "hlr": rng.uniform(1, 2, n)})
    cat["hlr"].unit = "arcsec"
    with CutoutWriter(path, n=n, shapes=SHAPES, attrs=ATTRS, fingerprint="job") as w:
        w.write({k: v[:4] for k, v in arrays.items()})
        w.write({k: v[4:] for k, v in arrays.items()})
        w.finish(cat)
    return arrays, cat


def test_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    arrays, cat = _write(path)
    got, got_cat, attrs = read_cutouts(path)
    for k in SHAPES:
        assert got[k].dtype == arrays[k].dtype
        assert np.array_equal(got[k], arrays[k])
    assert np.allclose(got_cat["hlr"], cat["hlr"]) and got_cat["hlr"].unit == "arcsec"
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["complete"]
    assert attrs["pixel_scale"] == 0.2 and attrs["oversampling"] == 2 and attrs["n_galaxies"] == 10
    t = Table.read(path, path="catalog")  # the documented astropy access
    assert len(t) == 10
    with h5py.File(path) as f:
        assert f["intrinsic"].attrs["pixel_scale"] == pytest.approx(0.1)  # intrinsic grid
        assert f["observed"].attrs["unit"] == "adu" and f["variance"].attrs["unit"] == "adu2"
        assert f["observed"].compression == "gzip" and f["observed"].chunks[0] >= 1
    sub, sub_cat, _ = read_cutouts(path, keys=["observed"], index=[7, 2, 5])
    assert np.array_equal(sub["observed"], arrays["observed"][[7, 2, 5]])
    assert list(sub_cat["index"]) == [7, 2, 5]


def test_interrupted_write_leaves_no_final_file(tmp_path):
    path = tmp_path / "c.h5"
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="boom"):
        with CutoutWriter(path, n=10, shapes=SHAPES, attrs=ATTRS, fingerprint="job") as w:
            w.write({k: v[:4] for k, v in _arrays(10, rng).items()})
            raise RuntimeError("boom")
    assert not path.exists()
    assert (tmp_path / "c.h5.partial").exists()
    with pytest.raises(SchemaError, match="incomplete"):
        CutoutFile(tmp_path / "c.h5.partial")
    # a writer of the same job resumes after the 4 rows written; another job starts again
    with CutoutWriter(path, n=10, shapes=SHAPES, attrs=ATTRS, fingerprint="job") as w:
        assert w.n_done == 4
    with CutoutWriter(path, n=10, shapes=SHAPES, attrs=ATTRS, fingerprint="other") as w:
        assert w.n_done == 0


def test_writer_rejects_bad_blocks(tmp_path):
    rng = np.random.default_rng(0)
    with CutoutWriter(tmp_path / "c.h5", n=4, shapes=SHAPES, attrs=ATTRS) as w:
        arrays = _arrays(4, rng)
        with pytest.raises(GalgenInputError, match="'psf' expects per-galaxy shape"):
            w.write({**arrays, "psf": np.zeros((4, 6, 6))})
        with pytest.raises(GalgenInputError, match="needs datasets"):
            w.write({"observed": arrays["observed"]})
        w.write(arrays)
        with pytest.raises(GalgenInputError, match="catalog has 3 rows"):
            w.finish(Table({"index": [0, 1, 2]}))


def test_schema_errors_name_the_file(tmp_path):
    path = tmp_path / "c.h5"
    _write(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(SchemaError, match=r"c\.h5: galgen cutout schema version 99"):
        CutoutFile(path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(SchemaError, match="not a galgen cutout file"):
        CutoutFile(other)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(GalgenInputError, match="not a readable HDF5 file"):
        CutoutFile(text)
    with pytest.raises(GalgenInputError, match="no such file"):
        CutoutFile(tmp_path / "missing.h5")
    _write(path.with_name("d.h5"))
    with h5py.File(path.with_name("d.h5"), "r+") as f:
        del f["variance"]
    with pytest.raises(SchemaError, match=r"required dataset\(s\) \['variance'\] missing"):
        CutoutFile(path.with_name("d.h5"))


def test_dataset_reads_lazily_with_workers(tmp_path):
    path = tmp_path / "c.h5"
    arrays, cat = _write(path, n=12)
    ds = CutoutDataset(path, keys=("observed", "psf", "variance", "mask"), columns=("hlr",))
    assert len(ds) == 12
    item = ds[3]
    assert torch.equal(item["observed"], torch.from_numpy(arrays["observed"][3]))
    assert item["mask"].dtype == torch.bool
    assert float(item["hlr"]) == pytest.approx(float(cat["hlr"][3]))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    obs = torch.cat([b["observed"] for b in batches])
    assert torch.equal(obs, torch.from_numpy(arrays["observed"]))
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(12))
    split = CutoutDataset(path, indices=[10, 1])
    assert int(split[0]["index"]) == 10
    with pytest.raises(GalgenInputError, match="no column 'mag'"):
        CutoutDataset(path, columns=("mag",))
    with pytest.raises(GalgenInputError, match="indices"):
        CutoutDataset(path, indices=[12])


def test_dataset_on_simulated_file(sdss_small):
    ds = CutoutDataset(sdss_small, keys=("observed", "intrinsic", "psf", "variance", "mask"), columns=("mag",))
    item = ds[0]
    assert item["observed"].shape == (48, 48) and item["psf"].shape == (48, 48)
    assert torch.isclose(item["psf"].sum(), torch.tensor(1.0), atol=1e-5)
