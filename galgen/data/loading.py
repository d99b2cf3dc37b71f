"""The observation loader: a cutout file as batches of (observed, Observation, conditions, index).

Every stage that reads observations — training, fitting, sampling with a file's PSFs,
evaluation, anomaly scores — reads them here, so that a file is decoded one way:
masks become booleans (``True`` = excluded), PSFs are renormalised to unit sum (they are
stored as float32; :meth:`galgen.physics.Observation.from_batch` does it), variances and masks become the :class:`~galgen.physics.GaussianNoise`
of an :class:`~galgen.physics.Observation`, catalog conditions are read once as
float32, and the file's stamp and oversampling are checked against a model's in one
place (:meth:`ObservationLoader.check_grid`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import GalgenInputError
from ..physics import Batch, Observation
from .cutouts import REQUIRED_DATASETS, CutoutFile

__all__ = ["ObservationLoader", "observation_from_cutouts", "batch_from_rows"]


class ObservationLoader:
    """Galaxies of a cutout file, served as :class:`~galgen.physics.Batch` objects.

    Parameters
    ----------
    path : str or os.PathLike
        A galgen cutout file (validated on opening).
    indices : array-like of int, optional
        Rows to serve, in this order (default: all). Positions given to :meth:`batch`
        index into them.
    conditions : sequence of str, optional
        Catalog columns returned as ``Batch.cond`` (float32), e.g. a conditional
        model's ``conditions``.
    in_memory : bool, optional
        Read the rows once into memory on ``device`` (fast for repeated access, as in
        training), or read each batch from the file when it is asked for (default).
    device : str or torch.device, optional
        Where batches go.

    Attributes
    ----------
    pixel_scale : float
        Detector arcsec/pixel.
    oversampling : int
        Intrinsic pixels per detector pixel.
    stamp_size : int
        Detector stamp size.
    survey, fingerprint : str
        Of the file.
    cond : torch.Tensor or None
        ``(len(self), C)`` float32 conditions.

    Examples
    --------
    ``for batch in ObservationLoader("sdss.h5").iter_batches(256): fit_map(model, batch.observed, batch.observation)``
    """

    def __init__(self, path, indices=None, conditions=(), *, in_memory: bool = False, device="cpu"):
        self.path = Path(path)
        self.conditions = tuple(conditions)
        self.device = torch.device(device)
        self.in_memory = bool(in_memory)
        with CutoutFile(self.path) as f:
            n = len(f)
            self.pixel_scale = f.pixel_scale
            self.oversampling = f.oversampling
            self.stamp_size = int(f.attrs["stamp_size"])
            self.survey = str(f.attrs.get("survey", ""))
            self.fingerprint = str(f.attrs.get("fingerprint", ""))
            self.n_file = n
            self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n):
                raise GalgenInputError(f"{self.path}: indices must be rows in [0, {n})")
            self.cond = self._conditions(f)
            self._arrays = None
            if self.in_memory:
                whole = len(self.indices) == n and bool(np.all(self.indices == np.arange(n)))
                self._arrays = {k: self._tensor(k, f.read(k, slice(None) if whole else self.indices))
                                for k in REQUIRED_DATASETS}
                if self.cond is not None:
                    self.cond = self.cond.to(self.device)

    def _conditions(self, f) -> torch.Tensor | None:
        if not self.conditions:
            return None
        cat = f.catalog
        missing = [c for c in self.conditions if c not in cat.colnames]
        if missing:
            raise GalgenInputError(f"{self.path}: catalog has no column(s) {missing} to condition on "
                                   f"(has {cat.colnames})")
        cond = np.stack([np.asarray(cat[c], dtype=np.float32)[self.indices] for c in self.conditions], 1)
        return torch.from_numpy(cond)

    def _tensor(self, key: str, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array != 0) if key == "mask" else torch.from_numpy(np.ascontiguousarray(array))
        return t.to(self.device)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return (f"ObservationLoader({str(self.path)!r}, n={len(self)}, stamp={self.stamp_size}, "
                f"oversampling={self.oversampling}, pixel_scale={self.pixel_scale}, "
                f"conditions={list(self.conditions)}, in_memory={self.in_memory})")

    def check_grid(self, stamp: int, oversampling: int, what: str = "the model") -> None:
        """Refuse a model (or any consumer) made for another stamp or oversampling.

        Parameters
        ----------
        stamp, oversampling : int
            The consumer's detector stamp size and intrinsic pixels per detector pixel.
        what : str, optional
            Names the consumer in the error.

        Raises
        ------
        GalgenInputError
            Naming the file and both grids.
        """
        if int(stamp) != self.stamp_size or int(oversampling) != self.oversampling:
            raise GalgenInputError(f"{self.path}: stamp {self.stamp_size} / oversampling {self.oversampling} differ "
                                   f"from {what}'s {stamp} / {oversampling}")

    def rows(self, positions) -> dict:
        """Decoded arrays of the galaxies at ``positions`` (0-based, into ``indices``).

        Parameters
        ----------
        positions : torch.Tensor or sequence of int

        Returns
        -------
        dict
            ``observed`` ``(B, S, S)``, ``psf`` ``(B, P, P)`` (as stored: float32, so its sum
            is 1 to float32 precision; :meth:`batch` renormalises it), ``variance``,
            ``mask`` (bool, True = excluded), ``index`` (rows in the file, int64) and
            ``cond`` (``(B, C)`` float32 or None), on the loader's device.
        """
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if self._arrays is not None:
            p = pos.to(self.device)
            out = {k: v[p] for k, v in self._arrays.items()}
        else:
            rows = self.indices[pos.numpy()]
            with CutoutFile(self.path) as f:
                out = {k: self._tensor(k, f.read(k, rows)) for k in REQUIRED_DATASETS}
        out["index"] = torch.from_numpy(self.indices[pos.numpy()])
        out["cond"] = None if self.cond is None else self.cond[pos.to(self.cond.device)].to(self.device)
        return out

    def observation(self, positions) -> Observation:
        """The :class:`~galgen.physics.Observation` (PSFs, variance, mask) of the galaxies at ``positions``.

        Parameters
        ----------
        positions : torch.Tensor or sequence of int

        Returns
        -------
        Observation
        """
        return self.batch(positions).observation

    def batch(self, positions) -> Batch:
        """A :class:`~galgen.physics.Batch` of the galaxies at ``positions``.

        Parameters
        ----------
        positions : torch.Tensor or sequence of int

        Returns
        -------
        Batch
        """
        return batch_from_rows(self.rows(positions), self.pixel_scale, self.oversampling)

    def iter_batches(self, batch_size: int, positions=None, start: int = 0):
        """The galaxies (all, or the given positions) in order, in batches.

        Parameters
        ----------
        batch_size : int
        positions : torch.Tensor, optional
            Subset of positions, default all.
        start : int, optional
            Skip the first ``start`` positions (a resumed job).

        Yields
        ------
        Batch
        """
        if int(batch_size) < 1:
            raise GalgenInputError(f"batch_size: must be >= 1, got {batch_size!r}")
        pos = torch.arange(len(self)) if positions is None else torch.as_tensor(positions)
        for i in range(int(start), len(pos), int(batch_size)):
            yield self.batch(pos[i:i + int(batch_size)])


def batch_from_rows(rows: dict, pixel_scale: float, oversampling: int) -> Batch:
    """A :class:`~galgen.physics.Batch` of decoded rows (:meth:`ObservationLoader.rows`).

    Parameters
    ----------
    rows : dict
        ``observed``, ``psf``, ``variance``, ``mask``, ``index``, ``cond``.
    pixel_scale : float
        Detector arcsec/pixel.
    oversampling : int

    Returns
    -------
    Batch
        Its observation has the PSFs renormalised to unit sum and
        :class:`~galgen.physics.GaussianNoise` with the variances and masks.
    """
    obs = Observation.from_batch(rows, pixel_scale=pixel_scale, oversampling=oversampling)
    return Batch(observed=rows["observed"], observation=obs, cond=rows["cond"], index=rows["index"])


def observation_from_cutouts(path, index=slice(None), *, dtype=torch.float32, device=None) -> Observation:
    """The observation of galaxies of a cutout file: their PSFs, variance maps and masks.

    Parameters
    ----------
    path : str or os.PathLike
        Cutout file.
    index : int, slice or sequence of int, optional
        Galaxies (default all).
    dtype, device : optional
        Of the tensors.

    Returns
    -------
    Observation
        Per-galaxy PSFs and :class:`~galgen.physics.GaussianNoise` with the stored
        variance and mask.
    """
    with CutoutFile(path) as f:
        rows = np.arange(len(f))[index]
    loader = ObservationLoader(path, np.atleast_1d(rows), device=device or "cpu")
    r = loader.rows(torch.arange(len(loader)))
    r = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in r.items()}
    return batch_from_rows(r, loader.pixel_scale, loader.oversampling).observation

