"""Merging the shards of a sharded run (``galgen merge``) into one cutout file.

The shards ``0/N .. N-1/N`` of one job (see :mod:`galgen.sharding`) concatenate into the
very file the unsharded run writes: the same arrays and catalog rows, in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import GalgenInputError
from .cutouts import CutoutFile, CutoutWriter

__all__ = ["merge_cutouts"]


# attributes that differ between the shards of one job
_MERGE_IGNORED_ATTRS = {"shard", "index_start", "index_stop", "fingerprint", "created", "n_galaxies",
                        "n_done", "complete"}


def merge_cutouts(paths, out, *, overwrite: bool = False) -> Path:
    """Concatenate the shards of one sharded run into a single cutout file.

    The result holds the same arrays and catalog rows, in the same order, as the
    unsharded run would.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        Shard files (any order); together they must be shards ``0/N .. N-1/N`` of the
        same job, each exactly once.
    out : str or os.PathLike
        Output file.
    overwrite : bool, optional
        Replace ``out`` if it exists.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    GalgenInputError
        If shards are missing, repeated or come from different jobs.
    """
    from astropy.table import vstack

    from ..sharding import parse_shard

    out = Path(out)
    if out.exists() and not overwrite:
        raise GalgenInputError(f"{out}: output exists; pass --overwrite to replace it")
    if not paths:
        raise GalgenInputError("merge: no input files given")
    files = [CutoutFile(p) for p in paths]
    try:
        shards = [parse_shard(f.attrs["shard"], argument=f"{f.path}: attribute 'shard'") for f in files]
        counts = {s.count for s in shards}
        if len(counts) != 1:
            raise GalgenInputError(f"merge: inputs are shards of different counts N: {sorted(counts)}")
        count = counts.pop()
        by_index = {}
        for f, s in zip(files, shards):
            if s.index in by_index:
                raise GalgenInputError(
                    f"merge: shard {s} given twice ({by_index[s.index].path} and {f.path})"
                )
            by_index[s.index] = f
        missing = sorted(set(range(count)) - set(by_index))
        if missing:
            raise GalgenInputError(f"merge: shard(s) {missing} of {count} missing")
        ordered = [by_index[k] for k in range(count)]
        ref = ordered[0]
        ref_attrs = {k: v for k, v in ref.attrs.items() if k not in _MERGE_IGNORED_ATTRS}
        ref_fp = _job_fingerprint(ref.attrs.get("fingerprint", ""))
        for f in ordered[1:]:
            attrs = {k: v for k, v in f.attrs.items() if k not in _MERGE_IGNORED_ATTRS}
            diff = sorted(k for k in set(attrs) | set(ref_attrs)
                          if not _same(attrs.get(k), ref_attrs.get(k)))
            if diff or _job_fingerprint(f.attrs.get("fingerprint", "")) != ref_fp:
                raise GalgenInputError(
                    f"merge: {f.path} and {ref.path} come from different jobs "
                    f"(attributes differ: {diff or ['fingerprint']})"
                )
            if f.keys != ref.keys:
                raise GalgenInputError(f"merge: {f.path} has datasets {f.keys}, {ref.path} has {ref.keys}")
        n = sum(len(f) for f in ordered)
        shapes = {k: ref.dataset(k).shape[1:] for k in ref.keys}
        attrs = dict(ref_attrs, shard="0/1")
        if "index_start" in ref.attrs:
            attrs.update(index_start=ref.attrs["index_start"], index_stop=ordered[-1].attrs["index_stop"])
        fingerprint = json.dumps(dict(ref_fp, shard="0/1"), sort_keys=True) if ref_fp else ""
        with CutoutWriter(out, n=n, shapes=shapes, attrs=attrs, fingerprint=fingerprint) as w:
            for f in ordered:
                for start in range(0, len(f), 1024):
                    sl = slice(start, min(len(f), start + 1024))
                    w.write({k: f.read(k, sl) for k in f.keys})
            w.finish(vstack([f.catalog for f in ordered], metadata_conflicts="silent"))
    finally:
        for f in files:
            f.close()
    return out


def _job_fingerprint(fp: str) -> dict:
    """The fingerprint of a job without its shard (shards of one job share it)."""
    if not fp:
        return {}
    try:
        d = json.loads(fp)
    except json.JSONDecodeError:
        return {"raw": fp}
    d.pop("shard", None)
    return d


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b
