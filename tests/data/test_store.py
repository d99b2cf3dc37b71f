"""The generic atomic, resumable HDF5 writer: a version per format, and "output is current" per format."""

import h5py
import numpy as np
import pytest
from astropy.table import Table

from galgen.data import SCHEMA_VERSION, CutoutFile, CutoutWriter, HDF5Writer, output_is_current
from galgen.errors import GalgenInputError

ATTRS = dict(survey="toy", pixel_scale=0.2, oversampling=1, stamp_size=4, flux_unit="adu", seed=0,
             source="galsim", shard="0/1")
SHAPES = {k: (4, 4) for k in ("observed", "psf", "variance", "mask")}


class CutoutWriterV7(CutoutWriter):
    schema_version = 7


class CountsWriter(HDF5Writer):
    schema_name, schema_version = "toy-counts", 3
    datasets = {"counts": ("int32", "", "scalar", "detections per galaxy")}
    required = ("counts",)


def _finish(writer, arrays, n):
    with writer as w:
        w.write(arrays)
        return w.finish(Table({"index": np.arange(n)}))


def test_each_writer_stamps_its_own_schema_version(tmp_path):
    """The version is a class attribute: a subclass sets its own (before, every writer wrote 1)."""
    arrays = {k: np.ones((2, 4, 4)) for k in SHAPES}
    v1 = _finish(CutoutWriter(tmp_path / "v1.h5", n=2, shapes=SHAPES, attrs=ATTRS), arrays, 2)
    v7 = _finish(CutoutWriterV7(tmp_path / "v7.h5", n=2, shapes=SHAPES, attrs=ATTRS), arrays, 2)
    counts = _finish(CountsWriter(tmp_path / "counts.h5", n=2, shapes={"counts": ()}, attrs={}),
                     {"counts": [1, 2]}, 2)
    with h5py.File(v1) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 1
    with h5py.File(v7) as f:
        assert f.attrs["schema_version"] == 7 and f.attrs["format"] == "galgen-cutouts"
    with h5py.File(counts) as f:
        assert f.attrs["schema_version"] == 3 and f.attrs["format"] == "toy-counts"
        assert list(f["counts"][:]) == [1, 2] and bool(f.attrs["complete"])
    assert len(CutoutFile(v1)) == 2


def test_the_base_class_is_abstract(tmp_path):
    with pytest.raises(TypeError, match="schema_name and schema_version"):
        HDF5Writer(tmp_path / "x.h5", n=1, shapes={}, attrs={})


def test_output_is_current_per_format(tmp_path):
    out = tmp_path / "counts.h5"
    assert output_is_current(out, "job", schema="toy-counts") is False  # no output yet
    w = CountsWriter(out, n=2, shapes={"counts": ()}, attrs={}, fingerprint="job")
    with w:
        w.write({"counts": [1]})  # interrupted: only the partial file exists
    assert not out.exists() and output_is_current(out, "job", schema="toy-counts") is False
    _finish(CountsWriter(out, n=2, shapes={"counts": ()}, attrs={}, fingerprint="job"), {"counts": [2]}, 2)
    assert output_is_current(out, "job", schema="toy-counts") is True
    with pytest.raises(GalgenInputError, match="output exists"):
        output_is_current(out, "another job", schema="toy-counts")
    assert output_is_current(out, "another job", overwrite=True, schema="toy-counts") is False
    with pytest.raises(GalgenInputError, match="output exists"):  # not a cutout file (the default format)
        output_is_current(out, "job")
    cut = _finish(CutoutWriter(tmp_path / "c.h5", n=2, shapes=SHAPES, attrs=ATTRS, fingerprint="job"),
                  {k: np.ones((2, 4, 4)) for k in SHAPES}, 2)
    assert output_is_current(cut, "job") is True and output_is_current(cut, "job", schema="galgen-cutouts")
    v7 = _finish(CutoutWriterV7(tmp_path / "v7.h5", n=2, shapes=SHAPES, attrs=ATTRS, fingerprint="job"),
                 {k: np.ones((2, 4, 4)) for k in SHAPES}, 2)
    with pytest.raises(GalgenInputError, match="output exists"):  # a cutout file CutoutFile refuses
        output_is_current(v7, "job")
