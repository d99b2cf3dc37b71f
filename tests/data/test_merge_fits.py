"""Merging the fit files of a sharded ``galgen fit`` (``galgen merge``, :func:`galgen.data.merge_fits`).

The shards are fitted with a batch size (20) that divides every shard boundary of 60
galaxies in 3 shards (0, 20, 40, 60): the sharded and the unsharded runs then fit the
very same batches with the same per-batch seeds, and the merged file equals the
unsharded one bit for bit. With boundaries inside a batch the arrays differ at float32
rounding level (the Sersic renderer's batched arithmetic rounds differently for other
batch sizes, by ~1e-9 relative), which the Levenberg-Marquardt iterations amplify for
galaxies that stop at ``max_iter``: see :func:`galgen.data.merge_fits`.
"""

import json

import h5py
import numpy as np
import pytest
from astropy.table import Table

from galgen.cli import main
from galgen.data import FitFile, merge_fits, merge_shards
from galgen.errors import GalgenInputError
from galgen.inference.fit import fit_file
from galgen.sharding import Shard
from galgen.simulate import simulate

FAST = dict(device="cpu", batch_size=20, max_iter=2)


@pytest.fixture(scope="module")
def fits(sdss_small, tmp_path_factory):
    """The unsharded Sersic fit of ``sdss_small`` (60 galaxies) and its 3 shards, given in shuffled order."""
    d = tmp_path_factory.mktemp("fits")
    full = fit_file("sersic", sdss_small, d / "full.h5", **FAST)
    shards = [fit_file("sersic", sdss_small, d / f"part_{k}of3.h5", shard=Shard(k, 3), **FAST) for k in (2, 0, 1)]
    return full, shards


def _datasets(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def test_merged_fit_equals_unsharded_fit(fits, sdss_small, tmp_path):
    full, shards = fits
    merged = merge_fits(shards, tmp_path / "merged.h5")
    a, b = _datasets(full), _datasets(merged)
    assert sorted(a) == sorted(b)  # every dataset, the catalog and its column metadata included
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if a[key].dtype.names:  # the catalog: a compound dataset
            assert a[key].tobytes() == b[key].tobytes(), key
        else:
            assert np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f"), key  # exact, not close
    assert list(b["index"]) == list(range(60))
    with h5py.File(full, "r") as f, h5py.File(merged, "r") as g:
        for key in f:  # units, descriptions, grids, chunking and compression too
            assert dict(f[key].attrs) == dict(g[key].attrs), key
            if isinstance(f[key], h5py.Dataset):
                assert (f[key].chunks, f[key].compression) == (g[key].chunks, g[key].compression), key
        fa, ga = dict(f.attrs), dict(g.attrs)
    fa.pop("created"), ga.pop("created")
    assert fa.keys() == ga.keys()
    for key in fa:
        assert np.array_equal(fa[key], ga[key]), key  # the fingerprint is the unsharded job's
    assert json.loads(ga["fingerprint"])["rows"] == [0, 60]
    # the FITS catalog beside the file: the same columns, types and values as the unsharded fit's
    ca, cb = Table.read(full.with_suffix(".fits")), Table.read(merged.with_suffix(".fits"))
    assert ca.colnames == cb.colnames and ca.dtype == cb.dtype
    for c in ca.colnames:
        assert np.array_equal(np.asarray(ca[c]), np.asarray(cb[c]), equal_nan=ca[c].dtype.kind == "f"), c
    with FitFile(merged) as f:
        assert len(f) == 60 and list(f.catalog["index"]) == list(range(60))
    # galgen fit of the unsharded job finds the merged file current and leaves it alone
    before = merged.stat().st_mtime_ns
    assert fit_file("sersic", sdss_small, merged, **FAST) == merged
    assert merged.stat().st_mtime_ns == before


def test_galgen_merge_cli_detects_fit_files(fits, tmp_path, capsys):
    full, shards = fits
    out = tmp_path / "cli.h5"
    assert main(["merge", *map(str, shards), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.with_suffix(".fits").exists()
    with h5py.File(full, "r") as f, h5py.File(out, "r") as g:
        assert np.array_equal(f["z"][()], g["z"][()]) and np.array_equal(f["model"][()], g["model"][()])
    assert main(["merge", *map(str, shards), "--out", str(out)]) == 2
    assert "output exists" in capsys.readouterr().err
    assert main(["merge", *map(str, shards), "--out", str(out), "--overwrite"]) == 0


def _refused(paths, out, match):
    with pytest.raises(GalgenInputError, match=match):
        merge_shards(paths, out)
    assert not out.exists() and not out.with_suffix(".fits").exists()


TINY = dict(device="cpu", batch_size=2, max_iter=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-galaxy data file on 16x16 stamps and its Sersic fit in 3 shards: the refusals' inputs."""
    d = tmp_path_factory.mktemp("tiny")
    data = simulate(d / "data.h5", n=6, stamp=16, seed=3)
    return data, [fit_file("sersic", data, d / f"part_{k}of3.h5", shard=Shard(k, 3), **TINY) for k in range(3)]


def test_merge_refuses_missing_and_overlapping_shards(tiny, tmp_path):
    data, (s0, s1, s2) = tiny
    out = tmp_path / "m.h5"
    _refused([s0, s2], out, rf"rows \[2, 4\) of .*data.h5 are in none of the inputs \(a shard before .*{s2.name}")
    _refused([s2, s1], out, rf"rows \[0, 2\) of .*data.h5 are in none of the inputs \(a shard before .*{s1.name}")
    _refused([s0, s1], out, rf"rows \[4, 6\) of .*data.h5 are in none of the inputs \(a shard after .*{s1.name}")
    _refused([s0, s1, s1, s2], out, f"{s1.name} given twice")
    half = fit_file("sersic", data, tmp_path / "half_1of2.h5", shard=Shard(1, 2), **TINY)  # rows 3..5
    _refused([s0, s1, half], out, rf"half_1of2.h5 \(rows \[3, 6\)\) overlaps .*{s1.name} \(rows \[2, 4\)\)")
    whole = fit_file("sersic", data, tmp_path / "whole.h5", **TINY)
    _refused([whole, s0], out, rf"whole.h5 \(rows \[0, 6\)\) overlaps .*{s0.name}")
    merge_shards([s2, s0, s1], out)  # the same inputs complete: merged
    with pytest.raises(GalgenInputError, match="m.h5: output exists; pass --overwrite"):
        merge_shards([s0, s1, s2], out)


def test_merge_refuses_other_jobs_and_kinds(tiny, tmp_path):
    data, (s0, s1, s2) = tiny
    out = tmp_path / "m.h5"
    other = fit_file("sersic", data, tmp_path / "iter3_1of3.h5", shard=Shard(1, 3), **dict(TINY, max_iter=3))
    _refused([s0, other, s2], out, rf"iter3_1of3.h5 and .*{s0.name} come from different fit jobs "
                                   r"\(they differ in \['max_iter'\]\)")
    model = fit_file("bulge-disk", data, tmp_path / "bd_1of3.h5", shard=Shard(1, 3), **dict(TINY, max_iter=1))
    _refused([s0, model, s2], out, rf"bd_1of3.h5 and .*{s0.name} come from different fit jobs \(they differ in "
                                   r"\[.*'model'.*\]\)")
    _refused([s0, s1, data], out, rf"{data.name} is a cutout file but .*{s0.name} is a fit file")
    _refused([data, s0], out, rf"{s0.name} is a fit file but .*{data.name} is a cutout file")
    _refused([s0, s1, tmp_path / "nope.h5"], out, "nope.h5: no such file")
    (tmp_path / "text.h5").write_text("not hdf5")
    _refused([s0, tmp_path / "text.h5"], out, "text.h5: not a readable HDF5 file")
    with pytest.raises(GalgenInputError, match="an input of the merge is also its --out"):
        merge_shards([s0, s1, s2], s0)


def test_merge_refuses_mismatched_datasets_and_incomplete_files(tiny, tmp_path):
    data, (s0, s1, s2) = tiny
    out = tmp_path / "m.h5"
    odd = tmp_path / "odd_1of3.h5"  # a shard whose datasets differ: one deleted by hand
    odd.write_bytes(s1.read_bytes())
    with h5py.File(odd, "r+") as f:
        del f["derived_map"]
    _refused([s0, odd, s2], out, rf"odd_1of3.h5 and .*{s0.name} differ in datasets "
                                 r"\(derived_map: absent vs shape \(4,\) float64\)")
    with h5py.File(odd, "r+") as f:
        f.attrs["complete"] = False
    _refused([s0, odd, s2], out, "odd_1of3.h5: the fit file is incomplete")
    with h5py.File(odd, "r+") as f:
        f.attrs["complete"] = True
        f.attrs["fingerprint"] = "{}"
    _refused([s0, odd, s2], out, "odd_1of3.h5: the fingerprint does not record which rows")


def test_merge_needs_the_fitted_data_file_unchanged(tmp_path):
    """The data file tells how many rows there are: without it a missing last shard would go unseen."""
    data = simulate(tmp_path / "data.h5", n=4, stamp=16, seed=3)
    parts = [fit_file("sersic", data, tmp_path / f"d{k}.h5", shard=Shard(k, 2), **TINY) for k in range(2)]
    data.rename(tmp_path / "moved.h5")
    _refused(parts, tmp_path / "m.h5", r"d0.h5 was fitted on .*data.h5, which is not found")
    simulate(tmp_path / "data.h5", n=4, stamp=16, seed=4)  # another file under the old name
    _refused(parts, tmp_path / "m.h5", r"data.h5 has changed since .*d0.h5 was fitted on it")


def test_killed_merge_resumes_to_the_same_file(tiny, tmp_path, monkeypatch):
    import galgen.data.merge as merge_mod

    data, parts = tiny
    straight = merge_fits(parts, tmp_path / "straight.h5")
    real, calls = merge_mod.FitWriter.write, {"n": 0}

    def dying(self, arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(self, arrays)

    monkeypatch.setattr(merge_mod.FitWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        merge_fits(parts, tmp_path / "m.h5")
    monkeypatch.setattr(merge_mod.FitWriter, "write", real)
    assert not (tmp_path / "m.h5").exists()
    with h5py.File(tmp_path / "m.h5.partial", "r") as f:
        assert f.attrs["n_done"] == 2
    resumed = merge_fits(parts, tmp_path / "m.h5")
    a, b = _datasets(straight), _datasets(resumed)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
