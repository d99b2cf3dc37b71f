"""Atomic, resumable HDF5 output: the writer every galgen file format shares, and the
"output is current" check of resumable stages.

:class:`HDF5Writer` streams rows (one per galaxy) into ``<name>.partial`` and renames it
to ``<name>`` when it is complete, so that a reader never sees a half-written file under
the final name; a writer of the same job (same ``fingerprint``) continues a partial file
left by a killed run. Each format is a subclass that names its format (``schema_name``),
the version of its layout (``schema_version``) and its datasets: the cutout file
(:class:`galgen.data.CutoutWriter`) and the fit file (:class:`galgen.inference.fit.FitWriter`).
:func:`output_is_current` tells a stage whether its output already holds the job it is
about to run.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import h5py
import numpy as np

from .._version import __version__
from ..errors import GalgenInputError

__all__ = ["HDF5Writer", "HDF5File", "output_is_current"]

_PARTIAL = ".partial"


def _chunks(n: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (max(1, min(n, 8)),) + tuple(shape)


class HDF5Writer:
    """Stream galaxies into a new galgen HDF5 file, atomically and resumably.

    A base class: each file format is a subclass that sets the class attributes
    :attr:`schema_name`, :attr:`schema_version`, :attr:`datasets` and :attr:`required`.
    Rows are appended in order with :meth:`write`; :meth:`finish` stores the catalog and
    renames ``<path>.partial`` to ``path``. If the writer is closed before
    :meth:`finish` (an exception, a killed job), the partial file stays; a new writer
    with the same ``fingerprint`` continues from :attr:`n_done`.

    Parameters
    ----------
    path : str or os.PathLike
        Final file name.
    n : int
        Number of galaxies (rows) the file will hold.
    shapes : dict of str to tuple of int
        Per-galaxy shape of each dataset to create. Keys must be names of
        :attr:`datasets` and include :attr:`required`.
    attrs : dict
        Root attributes; ``format``, ``schema_version``, ``complete``, ``n_galaxies``,
        ``n_done``, ``fingerprint``, ``galgen_version`` and ``pixel_scale_unit`` are set by
        the writer. With a ``pixel_scale`` (and ``oversampling``), each dataset carries the
        ``pixel_scale`` of its grid.
    fingerprint : str, optional
        Identifies the job that writes the file; a partial file is resumed only when its
        fingerprint matches.

    Examples
    --------
    >>> import tempfile, h5py
    >>> from astropy.table import Table
    >>> class CountsWriter(HDF5Writer):
    ...     schema_name, schema_version = "toy-counts", 2
    ...     datasets = {"counts": ("int32", "", "scalar", "detections per galaxy")}
    ...     required = ("counts",)
    >>> path = tempfile.mkdtemp() + "/counts.h5"
    >>> with CountsWriter(path, n=3, shapes={"counts": ()}, attrs={}) as w:
    ...     w.write({"counts": [4, 0, 7]})
    ...     path = w.finish(Table({"index": [0, 1, 2]}))
    >>> with h5py.File(path, "r") as f:
    ...     print(f.attrs["format"], f.attrs["schema_version"], f["counts"][:])
    toy-counts 2 [4 0 7]
    """

    #: The ``format`` root attribute of the files this writer makes.
    schema_name: str | None = None
    #: The ``schema_version`` root attribute: the version of this format's layout (each
    #: format counts its own versions).
    schema_version: int | None = None
    #: Datasets of the format: name to (dtype, unit, grid, description); ``grid`` is
    #: ``"intrinsic"`` for images at ``pixel_scale / oversampling``.
    datasets: dict = {}
    #: Datasets every file of the format has.
    required: tuple = ()

    def __init__(self, path, *, n: int, shapes: dict, attrs: dict, fingerprint: str = ""):
        if self.schema_name is None or self.schema_version is None:
            raise TypeError(f"{type(self).__name__}: a writer sets the class attributes schema_name and "
                            "schema_version (HDF5Writer itself is a base class)")
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
            f.attrs["schema_version"] = self.schema_version
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
            raise RuntimeError(f"{type(self).__name__}.write called on a closed writer")
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
            raise RuntimeError(f"{type(self).__name__}.read called on a closed writer")
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


class HDF5File:
    """Read-only access to a galgen HDF5 file, validated on opening: the base of each format's reader.

    Subclasses implement :meth:`_validate` (format name, version, completion, datasets),
    which raises :class:`~galgen.errors.SchemaError` for a file that is not theirs; the
    file is closed again when it does.

    Parameters
    ----------
    path : str or os.PathLike

    Raises
    ------
    GalgenInputError
        If the file does not exist or is not HDF5.
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

    def _validate(self) -> None:
        raise NotImplementedError

    @property
    def attrs(self) -> dict:
        """Root attributes as a plain dict (numpy scalars converted to Python)."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._f.attrs.items()}

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def output_is_current(out, fingerprint: str, overwrite: bool = False, schema: str | None = None) -> bool:
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
        The output's ``format`` attribute: a cutout file (the default,
        :data:`galgen.data.SCHEMA_NAME`; validated as :class:`galgen.data.CutoutFile`
        does), or another galgen HDF5 file written by an :class:`HDF5Writer` subclass
        (e.g. a fit file), of which the format, the completion flag and the fingerprint
        are checked.

    Returns
    -------
    bool
        True if ``out`` is a complete file of this very job (nothing to do).
        False if there is no output, or (with ``overwrite``) an output of another job; that
        file stays until the new one replaces it atomically (a failed run loses nothing).

    Raises
    ------
    GalgenInputError
        If ``out`` exists, belongs to another job (or is not a complete file of the
        format), and ``overwrite`` is False.
    """
    from .cutouts import SCHEMA_NAME, CutoutFile  # imported here: cutouts.py imports this module

    out = Path(out)
    if not out.exists():
        return False
    if schema is None:
        schema = SCHEMA_NAME
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
