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
(gzip + shuffle). Files are written under ``<name>.partial`` and renamed when complete
(:mod:`galgen.data.store`); :func:`galgen.data.merge_cutouts` (:mod:`galgen.data.merge`)
concatenates the shards of a sharded run.
"""

from __future__ import annotations


import h5py
import numpy as np

from .._version import __version__
from ..errors import GalgenInputError, SchemaError
from .store import HDF5File, HDF5Writer, output_is_current

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "DATASETS",
    "REQUIRED_DATASETS",
    "CutoutWriter",
    "CutoutFile",
    "read_cutouts",
    "merge_cutouts",  # defined in galgen.data.merge, re-exported
    "output_is_current",  # defined in galgen.data.store, re-exported
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


class CutoutWriter(HDF5Writer):
    """Stream galaxies into a new cutout file, atomically and resumably.

    The cutout format written with the mechanics of :class:`~galgen.data.store.HDF5Writer`.
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

    #: Format name, version, datasets and required datasets of cutout files (the atomic,
    #: resumable mechanics are :class:`~galgen.data.store.HDF5Writer`'s).
    schema_name = SCHEMA_NAME
    schema_version = SCHEMA_VERSION
    datasets = DATASETS
    required = REQUIRED_DATASETS


class CutoutFile(HDF5File):
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
        s = self.stamp_size
        k = int(f.attrs["oversampling"])
        for key in self.keys:
            shape = f[key].shape
            want = (s * k, s * k) if key == "intrinsic" else (s, s)
            if len(shape) != 3 or shape[0] != n or (key != "psf" and shape[1:] != want):
                raise SchemaError(f"{p}: dataset '{key}' has shape {shape}, expected ({n}, *{want})")

    # -- access ---------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        """Image datasets present in the file, in schema order."""
        return [k for k in DATASETS if k in self._f]

    @property
    def attrs(self) -> dict:
        """The file's root attributes (survey, pixel scale, zero point, seed, ...) as a dict."""
        return dict(self._f.attrs)

    @property
    def pixel_scale(self) -> float:
        """Detector pixel scale in arcsec/pixel."""
        return float(self._f.attrs["pixel_scale"])

    @property
    def oversampling(self) -> int:
        """Intrinsic pixels per detector pixel along each axis."""
        return int(self._f.attrs["oversampling"])

    @property
    def stamp_size(self) -> int:
        """Side of the detector stamps in pixels (``S``: observed images are ``S x S``)."""
        return int(self._f.attrs["stamp_size"])

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

    def __repr__(self) -> str:
        return f"CutoutFile({str(self.path)!r}, n={len(self)}, keys={self.keys})"


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


def __getattr__(name):
    # merge_cutouts moved to galgen.data.merge (which imports this module); importing it
    # lazily keeps ``from galgen.data.cutouts import merge_cutouts`` working.
    if name == "merge_cutouts":
        from .merge import merge_cutouts

        return merge_cutouts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
