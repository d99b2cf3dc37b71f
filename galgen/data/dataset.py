"""A lazy :class:`torch.utils.data.Dataset` over a galgen cutout file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import GalgenInputError
from .cutouts import REQUIRED_DATASETS, CutoutFile

__all__ = ["CutoutDataset"]


class CutoutDataset(torch.utils.data.Dataset):
    """Galaxies of a cutout file as dicts of tensors, read lazily from disk.

    The HDF5 file is opened on first access in each process, so the dataset can be
    used with ``DataLoader(num_workers > 0)`` (each worker opens its own handle).

    Parameters
    ----------
    path : str or os.PathLike
        A galgen cutout file (validated when the dataset is created).
    keys : sequence of str, optional
        Datasets to return; by default those every file has
        (``observed``, ``psf``, ``variance``, ``mask``).
    columns : sequence of str, optional
        Catalog columns to return as float tensors (e.g. ``("mag", "hlr")`` for
        conditioning).
    indices : sequence of int, optional
        Restrict the dataset to these galaxies (e.g. a train/validation split).
    dtype : torch.dtype, optional
        Floating dtype of image tensors (default ``torch.float32``).

    Notes
    -----
    Items are dicts: each image key maps to a tensor of shape ``(H, W)`` (``mask`` is
    ``torch.bool``, True where a pixel is excluded), each catalog column to a scalar
    tensor, and ``"index"`` to the galaxy's row in the file.

    Examples
    --------
    >>> from torch.utils.data import DataLoader  # doctest: +SKIP
    >>> ds = CutoutDataset("sdss_train.h5", columns=("mag",))  # doctest: +SKIP
    >>> batch = next(iter(DataLoader(ds, batch_size=32, num_workers=2)))  # doctest: +SKIP
    >>> batch["observed"].shape  # doctest: +SKIP
    torch.Size([32, 64, 64])
    """

    def __init__(self, path, keys=REQUIRED_DATASETS, columns=(), indices=None,
                 dtype=torch.float32):
        self.path = Path(path)
        self.keys = tuple(keys)
        self.dtype = dtype
        with CutoutFile(self.path) as f:
            missing = [k for k in self.keys if k not in f.keys]
            if missing:
                raise GalgenInputError(f"{self.path}: dataset(s) {missing} not in file (has {f.keys})")
            n = len(f)
            self.attrs = f.attrs
            self._columns = {}
            if columns:
                cat = f.catalog
                for c in columns:
                    if c not in cat.colnames:
                        raise GalgenInputError(f"{self.path}: catalog has no column '{c}'")
                    self._columns[c] = np.asarray(cat[c], dtype=np.float64)
        if indices is None:
            self.indices = np.arange(n)
        else:
            self.indices = np.asarray(indices, dtype=np.int64)
            if self.indices.ndim != 1 or (len(self.indices) and (
                    self.indices.min() < 0 or self.indices.max() >= n)):
                raise GalgenInputError(f"indices must be a 1-d sequence of rows in [0, {n})")
        self._file = None
        self._pid = None

    def _h5(self) -> CutoutFile:
        pid = os.getpid()
        if self._file is None or self._pid != pid:  # a fresh handle in every worker
            self._file = CutoutFile(self.path)
            self._pid = pid
        return self._file

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        f = self._h5()
        item = {}
        for k in self.keys:
            arr = f.dataset(k)[row]
            item[k] = torch.from_numpy(arr != 0) if k == "mask" else torch.from_numpy(arr).to(self.dtype)
        for c, values in self._columns.items():
            item[c] = torch.tensor(values[row], dtype=self.dtype)
        item["index"] = torch.tensor(row)
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            try:
                self._file.close()
            except Exception:
                pass
