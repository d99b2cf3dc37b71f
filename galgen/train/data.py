"""Training data: a cutout file split into training and validation galaxies, served in batches.

Batches are drawn in an order fixed by the seed and the epoch, so a resumed run sees
exactly the batches an uninterrupted one would. Reading and decoding is the
:class:`galgen.data.ObservationLoader`'s; the data live in memory (read once,
sequentially: fast even for gzip-compressed files) or are read lazily per batch,
ahead of time by ``num_workers`` worker processes (:meth:`TrainingData.prefetch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.loading import ObservationLoader, batch_from_rows
from ..errors import GalgenInputError
from ..runtime import derive_seed

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


class TrainingData(ObservationLoader):
    """The training (or validation) galaxies of a cutout file: an :class:`~galgen.data.ObservationLoader`.

    What is about training only lives here: the statistics that set a model's scales,
    and (with lazy reading) the worker processes that read batches ahead
    (:meth:`prefetch`).

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
        Worker processes that read batches ahead in :meth:`prefetch` (lazy reading only).
    device : str or torch.device, optional
        Where batches go (in-memory data are moved there once).
    """

    def __init__(self, path, indices, conditions=(), in_memory: bool = True, num_workers: int = 0,
                 device="cpu"):
        if isinstance(num_workers, bool) or int(num_workers) < 0:
            raise GalgenInputError(f"num_workers: must be >= 0, got {num_workers!r}")
        super().__init__(path, indices, conditions, in_memory=in_memory, device=device)
        self.num_workers = int(num_workers)
        self.meta = _Meta(pixel_scale=self.pixel_scale, oversampling=self.oversampling, stamp=self.stamp_size,
                          survey=self.survey, fingerprint=self.fingerprint)

    def prefetch(self, position_batches):
        """Batches of the given positions, in order, read ahead by ``num_workers`` processes.

        With in-memory data or no workers, the batches are made one by one as they are
        asked for; with workers, each worker reads whole batches from the file (its own
        HDF5 handle) while the caller trains on earlier ones. The batches are the same
        either way.

        Parameters
        ----------
        position_batches : iterable of sequence of int
            Positions of each batch (e.g. an epoch's order cut into batches).

        Yields
        ------
        Batch
        """
        if self.in_memory or self.num_workers == 0:
            for positions in position_batches:
                yield self.batch(positions)
            return
        reader = _BatchReader(self, [torch.as_tensor(p, dtype=torch.long) for p in position_batches])
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=self.num_workers,
                                             multiprocessing_context="spawn" if torch.cuda.is_initialized() else None)
        for rows in loader:
            rows = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in rows.items()}
            rows["index"] = rows["index"].cpu()
            yield batch_from_rows(rows, self.pixel_scale, self.oversampling)

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
            detector pixel, ADU), ``log_flux`` (median and half the 16-84% range of the
            natural log of the stamps' total flux), ``cond_mean`` and ``cond_std`` (lists).
        """
        n = min(len(self), max_galaxies)
        r = self.rows(torch.arange(n))
        obs = r["observed"].float().flatten(1)
        peak = obs.amax(1)
        # ln of the total flux (clipped at the peak: a noisy sum can be negative)
        log_flux = torch.maximum(obs.sum(1), peak.clamp_min(1e-6)).log()
        q16, q50, q84 = torch.quantile(log_flux, torch.tensor([0.16, 0.5, 0.84], device=log_flux.device)).tolist()
        out = {"noise_rms": float(r["variance"].float().median().sqrt()), "peak": float(peak.median()),
               "log_flux": [q50, max((q84 - q16) / 2, 1e-3)]}
        if self.cond is not None:
            c = self.cond.float().cpu()
            out["cond_mean"] = c.mean(0).tolist()
            out["cond_std"] = c.std(0).clamp(min=1e-6).tolist()
        return out


class _BatchReader(torch.utils.data.Dataset):
    """Whole batches of a lazy loader as dataset items, for ``DataLoader`` workers (CPU tensors)."""

    def __init__(self, data: TrainingData, batches: list):
        self.path, self.indices, self.conditions = data.path, data.indices, data.conditions
        self.batches = batches
        self._loader = None  # made in each worker process on its first batch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        if self._loader is None:
            self._loader = ObservationLoader(self.path, self.indices, self.conditions)
        return self._loader.rows(self.batches[k])
