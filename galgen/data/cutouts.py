"""The galgen cutout file: an HDF5 schema for galaxy stamps, their PSFs and noise.

Layout (schema version 1)
-------------------------
Root attributes
    ``format`` (``"galgen-cutouts"``), ``schema_version`` (int), ``complete`` (bool),
    ``survey`` (str), ``pixel_scale`` (arcsec/pixel, detector), ``oversampling`` (int,
    intrinsic pixels per detector pixel along each axis), ``stamp_size`` (detector pixels),
    ``n_galaxies``, ``flux_unit`` (``"adu"`` unless stated), ``seed`` (-1 if none),
    ``source`` (``"galsim"`` or ``"ingest"``), ``shard`` (``"k/N"``), ``galgen_version``,
    ``fingerprint`` (JSON of the arguments that made the file), ``created`` (UTC ISO time).
Datasets, ``N`` galaxies, ``S = stamp_size``, ``k = oversampling``
    ``observed``  (N, S, S) float32, adu: the recorded cutout (PSF, pixels, noise).
    ``noiseless`` (N, S, S) float32, adu: the same without noise (simulations only).
    ``intrinsic`` (N, S*k, S*k) float32, adu: the PSF-free galaxy, pixel-integrated at
    the intrinsic scale ``pixel_scale / k`` (simulations only).
    ``psf``       (N, P, P) float32: the PSF without pixel response at the intrinsic
    scale, centred at index ``(P//2, P//2)``, unit sum.
    ``variance``  (N, S, S) float32, adu**2: per-pixel noise variance.
    ``mask``      (N, S, S) uint8: 0 = good pixel, non-zero = excluded from any likelihood.
``catalog``
    An astropy table (one row per galaxy, in the order of the datasets) readable with
    ``astropy.table.Table.read(path, path="catalog")``; units are kept.

Every dataset carries ``unit`` and ``description`` attributes; image datasets carry the
``pixel_scale`` of their grid. Datasets are chunked along the galaxy axis and compressed
(gzip + shuffle). Files are written under ``<name>.partial`` and renamed when complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import h5py
import numpy as np

from .._version import __version__
from ..errors import GalgenInputError, SchemaError

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "DATASETS",
    "REQUIRED_DATASETS",
    "CutoutWriter",
    "CutoutFile",
    "read_cutouts",
    "merge_cutouts",
    "output_is_current",
]

SCHEMA_NAME = "galgen-cutouts"
SCHEMA_VERSION = 1

#: Image datasets of the schema: dtype, unit, grid ("detector" or "intrinsic"), meaning.
DATASETS = {
    "observed": ("float32", "adu", "detector", "recorded cutout: PSF-convolved, pixelated, noisy"),
    "noiseless": ("float32", "adu", "detector", "observed cutout without noise"),
    "intrinsic": ("float32", "adu", "intrinsic", "PSF-free galaxy, pixel-integrated at the intrinsic scale"),
    "psf": ("float32", "", "intrinsic", "PSF without pixel response, centre at (P//2, P//2), unit sum"),
    "variance": ("float32", "adu2", "detector", "per-pixel noise variance"),
    "mask": ("uint8", "", "detector", "0 = good pixel, non-zero = excluded"),
}
REQUIRED_DATASETS = ("observed", "psf", "variance", "mask")
REQUIRED_ATTRS = (
    "format", "schema_version", "complete", "survey", "pixel_scale", "oversampling",
    "stamp_size", "n_galaxies", "flux_unit", "seed", "source", "shard",
)
_PARTIAL = ".partial"


def _chunks(n: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (max(1, min(n, 8)),) + tuple(shape)


class CutoutWriter:
    """Stream galaxies into a new cutout file, atomically and resumably.

    Rows are appended in order with :meth:`write`; :meth:`finish` stores the catalog and
    renames ``<path>.partial`` to ``path``. If the writer is closed before
    :meth:`finish` (an exception, a killed job), the partial file stays; a new writer
    with the same ``fingerprint`` continues from :attr:`n_done`.

    Parameters
    ----------
    path : str or os.PathLike
        Final file name.
    n : int
        Number of galaxies the file will hold.
    shapes : dict of str to tuple of int
        Per-galaxy shape of each dataset to create, e.g. ``{"observed": (64, 64), ...}``.
        Keys must be names of :data:`DATASETS` and include :data:`REQUIRED_DATASETS`.
    attrs : dict
        Root attributes (see the module docstring); ``format``, ``schema_version``,
        ``complete``, ``n_galaxies`` and ``galgen_version`` are set by the writer.
    fingerprint : str, optional
        Identifies the job that writes the file; a partial file is resumed only when its
        fingerprint matches.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from astropy.table import Table
    >>> path = tempfile.mkdtemp() + "/tiny.h5"
    >>> shapes = {k: (4, 4) for k in ("observed", "psf", "variance", "mask")}
    >>> attrs = dict(survey="toy", pixel_scale=0.2, oversampling=1, stamp_size=4,
    ...              flux_unit="adu", seed=0, source="galsim", shard="0/1")
    >>> with CutoutWriter(path, n=2, shapes=shapes, attrs=attrs) as w:
    ...     w.write({k: np.ones((2, 4, 4)) for k in shapes})
    ...     path = w.finish(Table({"index": [0, 1]}))
    >>> len(CutoutFile(path))
    2
    """

    #: Format name, datasets and required datasets of the files this writer makes
    #: (subclasses write other galgen formats with the same atomic, resumable mechanics).
    schema_name = SCHEMA_NAME
    datasets = DATASETS
    required = REQUIRED_DATASETS

    def __init__(self, path, *, n: int, shapes: dict, attrs: dict, fingerprint: str = ""):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + _PARTIAL)
        self.n = int(n)
        unknown = set(shapes) - set(self.datasets)
        if unknown:
            raise GalgenInputError(f"{self.path}: unknown dataset(s) {sorted(unknown)}")
        missing = set(self.required) - set(shapes)
        if missing:
            raise GalgenInputError(f"{self.path}: required dataset(s) {sorted(missing)} missing")
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.attrs = dict(attrs)
        self.fingerprint = fingerprint
        self._f = None

    # -- context management -------------------------------------------------------------
    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        """Create the partial file, or reopen a matching one to resume it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            if self._resumable():
                self._f = h5py.File(self.partial, "r+")
                return self
            self.partial.unlink()
        f = h5py.File(self.partial, "w")
        try:
            for key, value in self.attrs.items():
                f.attrs[key] = value
            f.attrs["format"] = self.schema_name
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["complete"] = False
            f.attrs["n_galaxies"] = self.n
            f.attrs["n_done"] = 0
            f.attrs["fingerprint"] = self.fingerprint
            f.attrs["galgen_version"] = __version__
            f.attrs["pixel_scale_unit"] = "arcsec/pixel"
            k = int(self.attrs.get("oversampling", 1))
            for key, shape in self.shapes.items():
                dtype, unit, grid, description = self.datasets[key]
                ds = f.create_dataset(
                    key, shape=(self.n,) + shape, dtype=dtype, chunks=_chunks(self.n, shape),
                    compression="gzip", compression_opts=4, shuffle=True,
                )
                ds.attrs["unit"] = unit
                ds.attrs["description"] = description
                if "pixel_scale" in self.attrs:
                    scale = float(self.attrs["pixel_scale"]) / (k if grid == "intrinsic" else 1)
                    ds.attrs["pixel_scale"] = scale
                ds.attrs["grid"] = grid
        except BaseException:
            f.close()
            raise
        self._f = f
        return self

    def _resumable(self) -> bool:
        try:
            with h5py.File(self.partial, "r") as f:
                return (
                    f.attrs.get("fingerprint") == self.fingerprint
                    and bool(self.fingerprint)
                    and int(f.attrs.get("n_galaxies", -1)) == self.n
                    and all(k in f and f[k].shape[1:] == s for k, s in self.shapes.items())
                )
        except (OSError, KeyError):  # a file cut off mid-write: start again
            return False

    @property
    def n_done(self) -> int:
        """Number of galaxies already written (rows ``[0, n_done)``)."""
        return int(self._f.attrs["n_done"])

    def write(self, arrays: dict) -> None:
        """Append a block of galaxies after the last one written.

        Parameters
        ----------
        arrays : dict of str to array_like
            One array of shape ``(m,) + shapes[key]`` for every dataset of the file.
        """
        if self._f is None:
            raise RuntimeError("CutoutWriter.write called on a closed writer")
        if set(arrays) != set(self.shapes):
            raise GalgenInputError(
                f"{self.path}: write() needs datasets {sorted(self.shapes)}, got {sorted(arrays)}"
            )
        start = self.n_done
        m = None
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.shape[1:] != self.shapes[key]:
                raise GalgenInputError(
                    f"{self.path}: dataset '{key}' expects per-galaxy shape {self.shapes[key]}, "
                    f"got {arr.shape[1:]}"
                )
            if m is None:
                m = arr.shape[0]
            elif arr.shape[0] != m:
                raise GalgenInputError(f"{self.path}: datasets of one write() differ in length")
        if start + m > self.n:
            raise GalgenInputError(f"{self.path}: more than n={self.n} galaxies written")
        for key, arr in arrays.items():
            self._f[key][start:start + m] = arr
        self._f.attrs["n_done"] = start + m
        self._f.flush()

    def read(self, key: str, index=slice(None)) -> np.ndarray:
        """Read back rows already written (e.g. to build the catalog before :meth:`finish`).

        Parameters
        ----------
        key : str
            Dataset name.
        index : slice or int, optional
            Rows (below :attr:`n_done`).

        Returns
        -------
        numpy.ndarray
        """
        if self._f is None:
            raise RuntimeError("CutoutWriter.read called on a closed writer")
        return self._f[key][index]

    def finish(self, catalog) -> Path:
        """Store the catalog, mark the file complete and move it to its final name.

        Parameters
        ----------
        catalog : astropy.table.Table
            One row per galaxy, in dataset order.

        Returns
        -------
        pathlib.Path
            The final path.
        """
        if self.n_done != self.n:
            raise RuntimeError(f"{self.path}: finish() after {self.n_done} of {self.n} galaxies")
        if len(catalog) != self.n:
            raise GalgenInputError(
                f"{self.path}: catalog has {len(catalog)} rows for {self.n} galaxies"
            )
        if "catalog" in self._f:
            del self._f["catalog"]
        if "catalog.__table_column_meta__" in self._f:
            del self._f["catalog.__table_column_meta__"]
        catalog.write(self._f, path="catalog", serialize_meta=True)
        self._f.attrs["complete"] = True
        self._f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._f.close()
        self._f = None
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close the partial file without finishing it (it can be resumed later)."""
        if self._f is not None:
            self._f.close()
            self._f = None


class CutoutFile:
    """Read-only access to a galgen cutout file, validated on opening.

    Parameters
    ----------
    path : str or os.PathLike
        A complete file of schema :data:`SCHEMA_VERSION`.

    Raises
    ------
    SchemaError
        If the file is not a galgen cutout file, is of another schema version, was left
        incomplete, or its datasets are inconsistent.
    GalgenInputError
        If the file does not exist or is not HDF5.

    Examples
    --------
    ``with CutoutFile("sdss_train.h5") as f: obs = f.read("observed", slice(0, 16))``
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise GalgenInputError(f"{self.path}: no such file")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise GalgenInputError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        try:
            self._validate()
        except BaseException:
            self._f.close()
            raise

    def _validate(self):
        f, p = self._f, self.path
        fmt = f.attrs.get("format")
        if fmt != SCHEMA_NAME:
            raise SchemaError(
                f"{p}: not a galgen cutout file (root attribute 'format' is {fmt!r}, "
                f"expected {SCHEMA_NAME!r})"
            )
        version = f.attrs.get("schema_version")
        if isinstance(version, np.generic):
            version = version.item()
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"{p}: galgen cutout schema version {version!r}; this galgen "
                f"({__version__}) reads version {SCHEMA_VERSION}"
            )
        if not bool(f.attrs.get("complete", False)):
            raise SchemaError(f"{p}: the file is incomplete (the job that wrote it was interrupted)")
        missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
        if missing:
            raise SchemaError(f"{p}: root attribute(s) {missing} missing")
        missing = [k for k in REQUIRED_DATASETS if k not in f]
        if missing:
            raise SchemaError(f"{p}: required dataset(s) {missing} missing")
        n = int(f.attrs["n_galaxies"])
        s = int(f.attrs["stamp_size"])
        k = int(f.attrs["oversampling"])
        for key in self.keys:
            shape = f[key].shape
            want = (s * k, s * k) if key == "intrinsic" else (s, s)
            if len(shape) != 3 or shape[0] != n or (key != "psf" and shape[1:] != want):
                raise SchemaError(f"{p}: dataset '{key}' has shape {shape}, expected ({n}, *{want})")

    # -- access ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """Root attributes as a plain dict (numpy scalars converted to Python)."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._f.attrs.items()}

    @property
    def keys(self) -> list[str]:
        """Image datasets present in the file, in schema order."""
        return [k for k in DATASETS if k in self._f]

    @property
    def stamp_size(self) -> int:
        """Detector stamp size in pixels (root attribute ``stamp_size``)."""
        return int(self._f.attrs["stamp_size"])

    @property
    def pixel_scale(self) -> float:
        """Detector pixel scale in arcsec/pixel."""
        return float(self._f.attrs["pixel_scale"])

    @property
    def oversampling(self) -> int:
        """Intrinsic pixels per detector pixel along each axis."""
        return int(self._f.attrs["oversampling"])

    def __len__(self) -> int:
        return int(self._f.attrs["n_galaxies"])

    def dataset(self, key: str) -> h5py.Dataset:
        """Return the h5py dataset ``key`` (lazy, not read into memory)."""
        if key not in self._f or key not in DATASETS:
            raise GalgenInputError(f"{self.path}: no dataset '{key}' (has {self.keys})")
        return self._f[key]

    def read(self, key: str, index=slice(None)) -> np.ndarray:
        """Read dataset ``key`` for the galaxies selected by ``index``.

        Parameters
        ----------
        key : str
            A dataset name of :data:`DATASETS`.
        index : int, slice or array of int, optional
            Galaxies to read; all by default.

        Returns
        -------
        numpy.ndarray
        """
        ds = self.dataset(key)
        if isinstance(index, (list, np.ndarray)):
            index = np.asarray(index)
            order = np.argsort(index)
            out = np.empty((len(index),) + ds.shape[1:], ds.dtype)
            out[order] = ds[index[order]] if len(np.unique(index)) == len(index) else [
                ds[int(i)] for i in index[order]
            ]
            return out
        return ds[index]

    @property
    def catalog(self):
        """The per-galaxy catalog as an :class:`astropy.table.Table`."""
        from astropy.table import Table

        return Table.read(self._f, path="catalog")

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return f"CutoutFile({str(self.path)!r}, n={len(self)}, keys={self.keys})"


def output_is_current(out, fingerprint: str, overwrite: bool = False, schema: str = SCHEMA_NAME) -> bool:
    """Decide what a stage does with an existing output file (resumable stages).

    Parameters
    ----------
    out : str or os.PathLike
        The stage's output path.
    fingerprint : str
        JSON of the arguments of the job about to run.
    overwrite : bool, optional
        Whether an output made by another job may be replaced.
    schema : str, optional
        The output's ``format`` attribute: a cutout file (validated as
        :class:`CutoutFile` does), or another galgen HDF5 file written by a
        :class:`CutoutWriter` subclass (e.g. a fit file), of which the format, the
        completion flag and the fingerprint are checked.

    Returns
    -------
    bool
        True if ``out`` is a complete file of this very job (nothing to do).
        False if there is no output, or (with ``overwrite``) an output of another job; that
        file stays until the new one replaces it atomically (a failed run loses nothing).

    Raises
    ------
    GalgenInputError
        If ``out`` exists, belongs to another job (or is not a cutout file), and
        ``overwrite`` is False.
    """
    out = Path(out)
    if not out.exists():
        return False
    try:
        if schema == SCHEMA_NAME:
            with CutoutFile(out) as f:
                if f.attrs.get("fingerprint") == fingerprint:
                    return True
        else:
            with h5py.File(out, "r") as f:
                if (f.attrs.get("format") == schema and bool(f.attrs.get("complete", False))
                        and f.attrs.get("fingerprint") == fingerprint):
                    return True
    except (GalgenInputError, OSError):  # SchemaError included: not a complete file of ours
        pass
    if not overwrite:
        raise GalgenInputError(f"{out}: output exists (from another job); pass --overwrite to replace it")
    return False


def read_cutouts(path, keys=None, index=slice(None)):
    """Read a cutout file into memory.

    Parameters
    ----------
    path : str or os.PathLike
        A galgen cutout file.
    keys : sequence of str, optional
        Datasets to read; all present by default.
    index : int, slice or array of int, optional
        Galaxies to read; all by default.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
    catalog : astropy.table.Table
        The rows of the selected galaxies.
    attrs : dict
        Root attributes.
    """
    with CutoutFile(path) as f:
        keys = f.keys if keys is None else list(keys)
        arrays = {k: f.read(k, index) for k in keys}
        catalog = f.catalog[index]
        return arrays, catalog, f.attrs


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
