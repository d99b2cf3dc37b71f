"""Deterministic splitting of data-parallel stages into shards.

A shard is written ``k/N`` with ``0 <= k < N`` (0-based, like a SLURM array task id
with ``--array=0-(N-1)`` or a torchrun rank). Shard ``k`` of ``n`` items holds the
contiguous block ``[k*n//N, (k+1)*n//N)``; the blocks of ``k = 0..N-1`` are disjoint and
cover ``range(n)`` in order, so concatenating the shards' outputs in ``k`` order
reproduces an unsharded run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import GalgenInputError

__all__ = ["Shard", "parse_shard", "format_shard_path"]

_SHARD_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """One part ``index/count`` of a data-parallel stage.

    Parameters
    ----------
    index : int
        0-based shard index, ``0 <= index < count``.
    count : int
        Total number of shards, ``>= 1``.

    Examples
    --------
    >>> Shard(1, 3).bounds(10)
    (3, 6)
    >>> [Shard(k, 3).bounds(10) for k in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not isinstance(self.count, int) or self.count < 1:
            raise GalgenInputError(f"shard count must be a positive integer, got {self.count!r}")
        if not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise GalgenInputError(
                f"shard index must satisfy 0 <= k < N (0-based), got {self.index}/{self.count}"
            )

    def bounds(self, n: int) -> tuple[int, int]:
        """Return the half-open range ``(start, stop)`` of items this shard owns.

        Parameters
        ----------
        n : int
            Total number of items in the unsharded run.

        Returns
        -------
        tuple of int
            ``(start, stop)`` with ``stop - start`` equal to ``n // count`` or one more.
        """
        return (self.index * n) // self.count, ((self.index + 1) * n) // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(spec: str | Shard | None, *, argument: str = "--shard") -> Shard:
    """Parse a shard specification ``"k/N"``.

    Parameters
    ----------
    spec : str, Shard or None
        ``"k/N"`` with ``0 <= k < N``; ``None`` means the whole run (``0/1``);
        ``"slurm"`` takes ``k`` and ``N`` from a SLURM job array
        (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` and ``SLURM_ARRAY_TASK_COUNT``).
    argument : str, optional
        Name of the argument the spec came from, used in error messages.

    Returns
    -------
    Shard
        The parsed shard.

    Raises
    ------
    GalgenInputError
        If the spec is malformed or ``k`` is not in ``[0, N)``.

    Examples
    --------
    >>> parse_shard("2/4")
    Shard(index=2, count=4)
    """
    if spec is None:
        return Shard()
    if isinstance(spec, Shard):
        return spec
    if str(spec).strip().lower() == "slurm":
        return _slurm_shard(argument)
    m = _SHARD_RE.match(str(spec))
    if not m:
        raise GalgenInputError(f"{argument}: expected 'k/N' such as '0/4', got {spec!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise GalgenInputError(f"{argument}: the shard count N must be >= 1, got {spec!r}")
    if not 0 <= k < n:
        raise GalgenInputError(
            f"{argument}: shard index k must satisfy 0 <= k < N (0-based), got {spec!r}"
        )
    return Shard(k, n)


def _slurm_shard(argument: str) -> Shard:
    import os

    try:
        task = int(os.environ["SLURM_ARRAY_TASK_ID"])
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    except (KeyError, ValueError):
        raise GalgenInputError(
            f"{argument}: 'slurm' needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT "
            "(run inside an sbatch --array job)"
        ) from None
    return parse_shard(f"{task - first}/{count}", argument=argument)


def format_shard_path(path, shard: Shard):
    """Fill ``{k}`` and ``{N}`` placeholders of an output path with a shard's numbers.

    Parameters
    ----------
    path : str or os.PathLike
        e.g. ``"shards/train_{k}of{N}.h5"``; a path without placeholders is returned as is.
    shard : Shard
        The shard.

    Returns
    -------
    str

    Examples
    --------
    >>> format_shard_path("train_{k}of{N}.h5", Shard(2, 8))
    'train_2of8.h5'
    """
    return str(path).replace("{k}", str(shard.index)).replace("{N}", str(shard.count))
