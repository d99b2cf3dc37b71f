"""The galgen fit file: an HDF5 schema for per-galaxy fits, its writer and its reader.

``galgen fit`` (:func:`galgen.inference.fit_file`) writes one row per galaxy: MAP latent
codes and flux scales, model images, residual maps, chi-square, flags, and (with
posterior sampling) samples, diagnostics and posterior predictive images
(:data:`FIT_DATASETS`). The file is written with the same atomic, resumable mechanics
as a cutout file, under its own format name :data:`FIT_SCHEMA` and version
:data:`FIT_SCHEMA_VERSION`; :class:`FitFile` reads it back (plots and analyses).

Root attributes: ``format``, ``schema_version``, ``complete``, ``n_galaxies``,
``fingerprint``, ``galgen_version``, ``model`` (checkpoint or kind), ``model_kind``,
``data`` (the cutout file fitted), ``stamp_size``, ``oversampling``, ``seed``,
``derived_names``, ``derived_quantile_levels`` (JSON) and, for parametric models,
``param_names`` (JSON). A FITS catalog of summary columns is written beside it.
The fit files of a sharded fit (``galgen fit --shard k/N``) are joined into the
unsharded fit's file by :func:`galgen.data.merge_fits` (``galgen merge``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import GalgenInputError, SchemaError
from .store import HDF5File, HDF5Writer

__all__ = ["FIT_SCHEMA", "FIT_SCHEMA_VERSION", "FIT_DATASETS", "FitWriter", "FitFile"]

#: Format name of fit files (root attribute ``format``).
FIT_SCHEMA = "galgen-fits"
#: Version of the fit-file layout (root attribute ``schema_version``).
FIT_SCHEMA_VERSION = 1

#: Datasets of a fit file: dtype, unit, grid, meaning (shapes per galaxy are set by the run).
FIT_DATASETS = {
    "index": ("int64", "", "scalar", "row of the galaxy in the data file"),
    "z": ("float32", "", "latent", "MAP latent code"),
    "log_scale": ("float32", "", "scalar", "MAP log flux scale multiplying the decoded galaxy"),
    "intrinsic": ("float32", "adu", "intrinsic", "MAP intrinsic (PSF-free) galaxy"),
    "model": ("float32", "adu", "detector", "MAP model of the observation (noise-free)"),
    "residual": ("float32", "adu", "detector", "data - model"),
    "normalized_residual": ("float32", "", "detector", "(data - model) / sigma; 0 on masked pixels"),
    "chi2": ("float64", "", "scalar", "chi-square of the MAP model over good pixels"),
    "dof": ("int32", "", "scalar", "good pixels minus fitted parameters"),
    "status": ("int8", "", "scalar", "0 converged, 1 max-iterations, 2 diverged, 3 no good pixels"),
    "n_iter": ("int32", "", "scalar", "optimiser iterations"),
    "samples": ("float32", "", "latent", "posterior samples (chains, draws, parameters): z, then log_scale"),
    "rhat": ("float32", "", "latent", "rank-normalised split R-hat per parameter"),
    "ess_bulk": ("float32", "", "latent", "bulk effective sample size per parameter"),
    "ess_tail": ("float32", "", "latent", "tail effective sample size per parameter"),
    "accept_rate": ("float32", "", "chains", "mean acceptance probability per chain"),
    "divergences": ("int32", "", "chains", "divergent transitions per chain"),
    "posterior_mean": ("float32", "adu", "detector", "posterior mean of the model observation"),
    "posterior_std": ("float32", "adu", "detector", "posterior standard deviation of the model observation"),
    "derived_map": ("float64", "", "derived", "flux [adu], hlr [arcsec], e1, e2 of the MAP intrinsic galaxy"),
    "derived_draws": ("float32", "", "derived", "flux, hlr, e1, e2 of thinned posterior draws (draws, 4)"),
    "derived_quantiles": ("float64", "", "derived", "quantiles 2.5, 16, 50, 84, 97.5% of flux, hlr, e1, e2 (4, 5)"),
    "posterior_method": ("int8", "", "scalar", "posterior method: 0 hmc, 1 nuts, 2 importance sampling, 3 laplace"),
    "pareto_k": ("float32", "", "scalar", "PSIS Pareto k of the importance weights (NaN: no importance sampling)"),
    "is_ess": ("float32", "", "scalar", "effective sample size of the importance weights (NaN: none)"),
}


class FitWriter(HDF5Writer):
    """Atomic, resumable writer of fit files (the mechanics of :class:`galgen.data.store.HDF5Writer`).

    Parameters
    ----------
    path : str or os.PathLike
    n : int
    shapes : dict
        Per-galaxy shapes of the :data:`FIT_DATASETS` to create.
    attrs : dict
    fingerprint : str, optional
    """

    schema_name = FIT_SCHEMA
    schema_version = FIT_SCHEMA_VERSION
    datasets = FIT_DATASETS
    required = ("index", "z", "chi2", "status")


class FitFile(HDF5File):
    """Read-only access to a complete galgen fit file, validated on opening.

    Parameters
    ----------
    path : str or os.PathLike

    Raises
    ------
    GalgenInputError
        No such file, or not HDF5.
    SchemaError
        Not a fit file, another version, or incomplete.

    Examples
    --------
    ``with FitFile("fits.h5") as f: chi2 = f.read("chi2"); panels = f.read("model", [0, 3])``
    """

    def _validate(self):
        fmt, version = self._f.attrs.get("format"), self._f.attrs.get("schema_version")
        if fmt != FIT_SCHEMA:
            raise SchemaError(f"{self.path}: not a galgen fit file (format {fmt!r}, expected {FIT_SCHEMA!r})")
        if version is None or int(version) != FIT_SCHEMA_VERSION:
            raise SchemaError(f"{self.path}: fit schema version {version!r}; this galgen reads "
                              f"version {FIT_SCHEMA_VERSION}")
        if not bool(self._f.attrs.get("complete", False)):
            raise SchemaError(f"{self.path}: the fit file is incomplete (the job that wrote it was interrupted)")

    @property
    def keys(self) -> list[str]:
        """Datasets present, in :data:`FIT_DATASETS` order."""
        return [k for k in FIT_DATASETS if k in self._f]

    @property
    def has_samples(self) -> bool:
        """Whether the fit holds posterior samples."""
        return "samples" in self._f

    @property
    def derived_names(self) -> list[str]:
        """Names of the derived quantities (flux, hlr, e1, e2)."""
        return json.loads(self._f.attrs["derived_names"])

    @property
    def catalog(self):
        """The summary catalog stored in the file (the table of the FITS catalog beside it).

        Returns
        -------
        astropy.table.Table
            One row per galaxy, in file order.
        """
        from astropy.table import Table

        if "catalog" not in self._f:
            raise GalgenInputError(f"{self.path}: no catalog in the fit file")
        return Table.read(self._f, path="catalog")

    @property
    def data_path(self) -> Path:
        """The cutout file that was fitted."""
        return Path(str(self._f.attrs["data"]))

    def __len__(self) -> int:
        return int(self._f["index"].shape[0])

    def dataset(self, key: str):
        """The h5py dataset ``key``, lazy (nothing is read into memory).

        Parameters
        ----------
        key : str
            A dataset of :data:`FIT_DATASETS` present in the file.

        Returns
        -------
        h5py.Dataset
            Open while the file is.
        """
        if key not in self._f or key not in FIT_DATASETS:
            raise GalgenInputError(f"{self.path}: no dataset {key!r} (has {self.keys})")
        return self._f[key]

    def read(self, key: str, rows=None) -> np.ndarray:
        """Read a dataset, all rows or the given ones (only those are read from disk).

        Parameters
        ----------
        key : str
            A dataset of :data:`FIT_DATASETS` present in the file.
        rows : int, slice or sequence of int, optional
            Positions in the fit file; default all.

        Returns
        -------
        numpy.ndarray
        """
        if key not in self._f:
            raise GalgenInputError(f"{self.path}: no dataset {key!r} (has {self.keys})")
        ds = self._f[key]
        if rows is None:
            return ds[()]
        if isinstance(rows, (int, np.integer, slice)):
            return ds[rows]
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise GalgenInputError(f"rows: must lie in [0, {len(self)}) for {self.path}, got {rows.tolist()}")
        order = np.argsort(rows)
        out = np.empty((len(rows),) + ds.shape[1:], ds.dtype)
        out[order] = np.stack([ds[int(r)] for r in rows[order]]) if len(rows) else out[order]
        return out

    def __repr__(self) -> str:
        return f"FitFile({str(self.path)!r}, n={len(self)}, samples={self.has_samples})"
