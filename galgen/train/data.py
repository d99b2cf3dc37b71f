"""Training data: a cutout file split into training and validation galaxies, served in batches.

Batches are drawn in an order fixed by the seed and the epoch, so a resumed run sees
exactly the batches an uninterrupted one would. The data live in memory (read once,
sequentially: fast even for gzip-compressed files) or are read lazily per galaxy through
:class:`galgen.data.CutoutDataset` and a ``DataLoader`` with worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.cutouts import REQUIRED_DATASETS, CutoutFile
from ..errors import GalgenInputError
from ..runtime import derive_seed
from ..models.base import Batch

__all__ = ["TrainingData", "split_indices", "epoch_order"]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``n`` galaxies into training and validation rows, reproducibly.

    Parameters
    ----------
    n : int
        Number of galaxies.
    val_fraction : float
        Fraction kept for validation (at least one galaxy when > 0).
    seed : int
        Seed of the split.

    Returns
    -------
    train, val : numpy.ndarray
        Sorted row indices.

    Examples
    --------
    >>> tr, va = split_indices(10, 0.2, seed=0)
    >>> len(tr), len(va), sorted(set(tr) | set(va)) == list(range(10))
    (8, 2, True)
    """
    if not 0 <= val_fraction < 1:
        raise GalgenInputError(f"val_fraction: must be in [0, 1), got {val_fraction!r}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``n`` training galaxies.

    Parameters
    ----------
    n : int
    epoch : int
    seed : int

    Returns
    -------
    torch.Tensor
        A permutation of ``range(n)`` that depends only on ``(seed, epoch)``.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=g)


@dataclass
class _Meta:
    pixel_scale: float
    oversampling: int
    stamp: int
    survey: str
    fingerprint: str


class TrainingData:
    """Galaxies of a cutout file, as :class:`galgen.models.Batch` objects.

    Parameters
    ----------
    path : str or os.PathLike
        Cutout file (observed, psf, variance, mask; plus catalog columns for conditioning).
    indices : array-like of int
        Rows to serve (e.g. the training split).
    conditions : sequence of str, optional
        Catalog columns returned as ``Batch.cond``.
    in_memory : bool, optional
        Read the rows once into memory (default) or lazily per batch.
    num_workers : int, optional
        ``DataLoader`` workers for lazy reading.
    device : str or torch.device, optional
        Where batches go (in-memory data are moved there once).
    """

    def __init__(self, path, indices, conditions=(), in_memory: bool = True, num_workers: int = 0,
                 device="cpu"):
        self.path = Path(path)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.conditions = tuple(conditions)
        self.device = torch.device(device)
        self.in_memory = bool(in_memory)
        self.num_workers = int(num_workers)
        with CutoutFile(self.path) as f:
            self.meta = _Meta(pixel_scale=f.pixel_scale, oversampling=f.oversampling,
                              stamp=int(f.attrs["stamp_size"]), survey=str(f.attrs.get("survey", "")),
                              fingerprint=str(f.attrs.get("fingerprint", "")))
            cond = None
            if self.conditions:
                cat = f.catalog
                missing = [c for c in self.conditions if c not in cat.colnames]
                if missing:
                    raise GalgenInputError(f"{self.path}: catalog has no column(s) {missing} "
                                           f"to condition on (has {cat.colnames})")
                cond = np.stack([np.asarray(cat[c], dtype=np.float32)[self.indices] for c in self.conditions], 1)
            self.cond = None if cond is None else torch.from_numpy(cond)
            if self.in_memory:
                self.arrays = {}
                for key in REQUIRED_DATASETS:
                    a = f.read(key, self.indices if len(self.indices) != len(f) else slice(None))
                    t = torch.from_numpy(a != 0) if key == "mask" else torch.from_numpy(np.ascontiguousarray(a))
                    self.arrays[key] = t.to(self.device)
                if self.cond is not None:
                    self.cond = self.cond.to(self.device)
        self._dataset = None

    def __len__(self) -> int:
        return len(self.indices)

    def _lazy(self):
        if self._dataset is None:
            from ..data.dataset import CutoutDataset

            self._dataset = CutoutDataset(self.path, indices=self.indices)
        return self._dataset

    def rows(self, positions) -> dict:
        """Arrays of the galaxies at ``positions`` (0-based, into ``indices``).

        Parameters
        ----------
        positions : torch.Tensor or sequence of int

        Returns
        -------
        dict
            ``observed``, ``psf``, ``variance``, ``mask``, ``index`` and ``cond`` tensors.
        """
        pos = torch.as_tensor(positions, dtype=torch.long)
        if self.in_memory:
            p = pos.to(self.device)
            out = {k: v[p] for k, v in self.arrays.items()}
        else:
            ds = self._lazy()
            loader = torch.utils.data.DataLoader(ds, batch_sampler=[pos.tolist()], num_workers=0)
            out = {k: v.to(self.device) for k, v in next(iter(loader)).items() if k != "index"}
        out["index"] = torch.from_numpy(self.indices[pos.numpy()])
        out["cond"] = None if self.cond is None else self.cond[pos.to(self.cond.device)].to(self.device)
        return out

    def batch(self, positions) -> Batch:
        """A :class:`~galgen.models.Batch` of the galaxies at ``positions``.

        Parameters
        ----------
        positions : torch.Tensor or sequence of int

        Returns
        -------
        Batch
        """
        from ..physics import Observation

        r = self.rows(positions)
        obs = Observation.from_batch(r, pixel_scale=self.meta.pixel_scale, oversampling=self.meta.oversampling)
        return Batch(observed=r["observed"], observation=obs, cond=r["cond"], index=r["index"])

    def iter_batches(self, batch_size: int, positions=None):
        """All (or the given) galaxies in order, in batches (for validation and encoding).

        Parameters
        ----------
        batch_size : int
        positions : torch.Tensor, optional
            Subset of positions, default all.

        Yields
        ------
        Batch
        """
        pos = torch.arange(len(self)) if positions is None else torch.as_tensor(positions)
        for i in range(0, len(pos), batch_size):
            yield self.batch(pos[i:i + batch_size])

    def statistics(self, max_galaxies: int = 2000) -> dict:
        """Scales the models start from: sky noise, typical peak, condition moments.

        Parameters
        ----------
        max_galaxies : int, optional
            Galaxies looked at.

        Returns
        -------
        dict
            ``noise_rms`` (median of the per-pixel rms, ADU), ``peak`` (median brightest
            detector pixel, ADU), ``cond_mean`` and ``cond_std`` (lists).
        """
        n = min(len(self), max_galaxies)
        r = self.rows(torch.arange(n))
        out = {"noise_rms": float(r["variance"].float().median().sqrt()),
               "peak": float(r["observed"].flatten(1).amax(1).median())}
        if self.cond is not None:
            c = self.cond.float().cpu()
            out["cond_mean"] = c.mean(0).tolist()
            out["cond_std"] = c.std(0).clamp(min=1e-6).tolist()
        return out
