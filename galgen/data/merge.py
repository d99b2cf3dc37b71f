"""Merging the shards of a sharded run (``galgen merge``): cutout files and fit files.

The shards ``0/N .. N-1/N`` of one job (see :mod:`galgen.sharding`) concatenate into the
very file the unsharded run writes: the same arrays and catalog rows, in the same order.
:func:`merge_shards` (what ``galgen merge`` calls) reads the ``format`` attribute of its
inputs and hands them to :func:`merge_cutouts` (``galgen simulate --shard``) or
:func:`merge_fits` (``galgen fit --shard``).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import GalgenInputError
from .atomic import atomic_output
from .cutouts import SCHEMA_NAME, CutoutFile, CutoutWriter
from .fitfile import FIT_SCHEMA, FitFile, FitWriter

__all__ = ["merge_shards", "merge_cutouts", "merge_fits"]

#: What each galgen file format is called in messages, by its ``format`` attribute.
_KINDS = {SCHEMA_NAME: "cutout file", FIT_SCHEMA: "fit file"}


def merge_shards(paths, out, *, overwrite: bool = False) -> Path:
    """Merge the shards of one sharded job, cutout files or fit files (``galgen merge``).

    The kind of file is read from the inputs' ``format`` attribute: cutout files (of
    ``galgen simulate --shard``) go to :func:`merge_cutouts`, fit files (of
    ``galgen fit --shard``) to :func:`merge_fits`.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        Shard files of one job, in any order, all of one kind.
    out : str or os.PathLike
        Merged file; for fit files, the FITS catalog is written beside it with suffix
        ``.fits``.
    overwrite : bool, optional
        Replace ``out`` if it exists.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    GalgenInputError
        An input is missing, not a galgen cutout or fit file, or of another kind than
        the first; ``out`` is one of the inputs; or the merge itself refuses the inputs
        (see :func:`merge_cutouts` and :func:`merge_fits`).

    Examples
    --------
    >>> import tempfile
    >>> from galgen.simulate import simulate
    >>> d = tempfile.mkdtemp()
    >>> parts = [simulate(f"{d}/part{k}.h5", n=4, stamp=16, seed=1, shard=f"{k}/2") for k in (1, 0)]
    >>> merged = merge_shards(parts, f"{d}/all.h5")
    >>> with CutoutFile(merged) as f:
    ...     print(len(f), f.attrs["shard"])
    4 0/1
    """
    out = Path(out)
    if not paths:
        raise GalgenInputError("merge: no input files given")
    formats = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise GalgenInputError(f"{p}: no such file")
        if p.resolve() == out.resolve():
            raise GalgenInputError(f"{p}: an input of the merge is also its --out")
        try:
            with h5py.File(p, "r") as f:
                fmt = f.attrs.get("format")
        except OSError as exc:
            raise GalgenInputError(f"{p}: not a readable HDF5 file ({exc})") from None
        if fmt not in _KINDS:
            raise GalgenInputError(f"{p}: not a galgen cutout or fit file (format {fmt!r})")
        formats[p] = fmt
    first, fmt = next(iter(formats.items()))
    for p, other in formats.items():
        if other != fmt:
            raise GalgenInputError(
                f"merge: {p} is a {_KINDS[other]} but {first} is a {_KINDS[fmt]}; merge shards of one kind"
            )
    merge = merge_fits if fmt == FIT_SCHEMA else merge_cutouts
    return merge(paths, out, overwrite=overwrite)


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


# root attributes of fit files that differ between the shards of one job
_FIT_IGNORED_ATTRS = {"shard", "fingerprint", "created", "n_galaxies", "n_done", "complete"}
# bytes read per block when copying rows
_BLOCK_BYTES = 64 << 20


def merge_fits(paths, out, *, overwrite: bool = False) -> Path:
    """Join the fit files of a sharded ``galgen fit`` into the file of the unsharded fit.

    Each shard's fingerprint records the rows ``[start, stop)`` of the data file it
    fitted; together the inputs must cover the data file's rows ``0 .. n-1`` exactly
    once. Every dataset and every catalog row is copied in the data file's order, the
    FITS catalog is written beside ``out`` (suffix ``.fits``) as ``galgen fit`` does, and
    the merged fingerprint is the unsharded job's (rows ``[0, n)``), so that
    ``galgen fit`` with the same arguments and no ``--shard`` finds ``out`` current.

    The arrays equal those of the unsharded fit bit for bit when every shard boundary
    is a multiple of the fit's batch size (then both runs fit the same batches with the
    same seeds). Otherwise they can differ at float32 rounding level, which iterative
    optimisers amplify for galaxies that have not converged: the decoders' batched
    arithmetic rounds differently for batches of different sizes.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        Fit files of one ``galgen fit`` job with different ``--shard``, in any order.
    out : str or os.PathLike
        Merged fit file (HDF5); the catalog goes to ``out`` with suffix ``.fits``.
    overwrite : bool, optional
        Replace ``out`` if it exists.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    GalgenInputError
        An input is not a complete fit file; the inputs come from different jobs (model,
        data, options or galgen version differ) or have different datasets or shapes;
        their rows overlap or leave rows of the data file out; or the data file they
        fitted is not found (it is read to learn how many rows there are).

    Notes
    -----
    Written with the atomic, resumable mechanics of :class:`~galgen.data.FitWriter`: a
    killed merge leaves ``out.partial``, which the same merge run again continues.

    Examples
    --------
    >>> import tempfile
    >>> from galgen.inference import fit_file
    >>> from galgen.sharding import Shard
    >>> from galgen.simulate import simulate
    >>> d = tempfile.mkdtemp()
    >>> data = simulate(f"{d}/data.h5", n=4, stamp=16, seed=1)
    >>> parts = [fit_file("sersic", data, f"{d}/fit_{k}of2.h5", shard=Shard(k, 2), batch_size=2, max_iter=1,
    ...                   device="cpu") for k in (0, 1)]
    >>> merged = merge_fits(parts, f"{d}/fit.h5")
    >>> with FitFile(merged) as f:
    ...     print(len(f), f.read("index").tolist(), merged.with_suffix(".fits").exists())
    4 [0, 1, 2, 3] True
    """
    from astropy.table import vstack

    out = Path(out)
    catalog_path = out.with_suffix(".fits")
    if out.exists() and not overwrite:
        raise GalgenInputError(f"{out}: output exists; pass --overwrite to replace it")
    if not paths:
        raise GalgenInputError("merge: no input files given")
    files = []
    try:
        for p in paths:
            files.append(FitFile(p))
        parts = [_FitPart(f) for f in files]
        parts.sort(key=lambda q: (q.start, q.stop))
        ref = parts[0]
        ref_attrs = {k: v for k, v in ref.file.attrs.items() if k not in _FIT_IGNORED_ATTRS}
        ref_layout = _layout(ref.file)
        for q in parts[1:]:
            attrs = {k: v for k, v in q.file.attrs.items() if k not in _FIT_IGNORED_ATTRS}
            diff = sorted({k for k in set(q.job) | set(ref.job) if q.job.get(k) != ref.job.get(k)}
                          | {k for k in set(attrs) | set(ref_attrs) if not _same(attrs.get(k), ref_attrs.get(k))})
            if diff:
                raise GalgenInputError(f"merge: {q.path} and {ref.path} come from different fit jobs "
                                       f"(they differ in {diff})")
            layout = _layout(q.file)
            if layout != ref_layout:
                diff = "; ".join(f"{k}: {_describe(layout.get(k))} vs {_describe(ref_layout.get(k))}"
                                 for k in sorted(set(layout) | set(ref_layout)) if layout.get(k) != ref_layout.get(k))
                raise GalgenInputError(f"merge: {q.path} and {ref.path} differ in datasets ({diff})")
        n = _data_rows(ref)
        covered, last = 0, None
        for q in parts:
            if q.stop == q.start:  # an empty shard (more shards than galaxies)
                continue
            if q.start < covered:
                same = q.path.resolve() == last.path.resolve()
                raise GalgenInputError(
                    f"merge: {q.path} given twice" if same else
                    f"merge: {q.path} (rows [{q.start}, {q.stop})) overlaps {last.path} "
                    f"(rows [{last.start}, {last.stop})) of {ref.data}"
                )
            if q.start > covered:
                raise GalgenInputError(
                    f"merge: rows [{covered}, {q.start}) of {ref.data} are in none of the inputs "
                    f"(a shard before {q.path} is missing)"
                )
            covered, last = q.stop, q
        if covered != n:
            after = f" (a shard after {last.path} is missing)" if last is not None else ""
            raise GalgenInputError(f"merge: rows [{covered}, {n}) of {ref.data} are in none of the inputs{after}")
        attrs = dict(ref_attrs)
        if "shard" in ref.file.attrs:
            attrs["shard"] = "0/1"
        fingerprint = json.dumps(dict(ref.job, rows=[0, n]), sort_keys=True)
        shapes = {k: s for k, (s, _) in ref_layout.items()}
        row_bytes = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(t).itemsize for s, t in ref_layout.values())
        block = max(1, _BLOCK_BYTES // max(1, row_bytes))
        with FitWriter(out, n=n, shapes=shapes, attrs=attrs, fingerprint=fingerprint) as w:
            for q in parts:  # rows [start, stop) of the data file are rows [start, stop) of out
                for start in range(max(q.start, w.n_done), q.stop, block):
                    sl = slice(start - q.start, min(q.stop, start + block) - q.start)
                    w.write({k: q.file.dataset(k)[sl] for k in shapes})
            catalog = vstack([q.file.catalog for q in parts], metadata_conflicts="silent")
            with atomic_output(catalog_path) as tmp:
                catalog.write(tmp, format="fits", overwrite=True)
            w.finish(catalog)
    finally:
        for f in files:
            f.close()
    return out


class _FitPart:
    """One input of :func:`merge_fits`: its file, its rows of the data file and its job."""

    def __init__(self, f: FitFile):
        self.file, self.path = f, f.path
        try:
            fp = json.loads(str(f.attrs.get("fingerprint", "")))
            start, stop = (int(r) for r in fp.pop("rows"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise GalgenInputError(f"{f.path}: the fingerprint does not record which rows of the data were "
                                   "fitted (not written by galgen fit?)") from None
        if stop - start != len(f):
            raise GalgenInputError(f"{f.path}: holds {len(f)} galaxies, its fingerprint says rows "
                                   f"[{start}, {stop})")
        if len(f) and (int(f.read("index", 0)) != start or int(f.read("index", len(f) - 1)) != stop - 1):
            raise GalgenInputError(f"{f.path}: dataset 'index' does not run over rows [{start}, {stop})")
        self.start, self.stop, self.job = start, stop, fp
        self.data = fp.get("data") or f.attrs.get("data", "")


def _layout(f: FitFile) -> dict:
    """Per-galaxy shape and dtype of each dataset of a fit file."""
    return {k: (f.dataset(k).shape[1:], str(f.dataset(k).dtype)) for k in f.keys}


def _describe(layout) -> str:
    """A dataset's per-galaxy shape and dtype, for messages."""
    return "absent" if layout is None else f"shape {layout[0]} {layout[1]}"


def _data_rows(part: _FitPart) -> int:
    """Rows of the data file a fit was made of (to check that no shard is missing)."""
    where = [Path(p) for p in dict.fromkeys([part.job.get("data", ""), str(part.file.attrs.get("data", ""))]) if p]
    for path in where:
        if path.exists():
            with CutoutFile(path) as d:
                if str(d.attrs.get("fingerprint", "")) != part.job.get("data_fingerprint", ""):
                    raise GalgenInputError(f"merge: {path} has changed since {part.path} was fitted on it "
                                           "(its fingerprint differs); cannot check that no shard is missing")
                return len(d)
    raise GalgenInputError(f"merge: {part.path} was fitted on {' or '.join(map(str, where)) or 'an unnamed file'}, "
                           "which is not found; merge needs it to check that no shard is missing")
