"""The CSV logs of a training run: one writer (:class:`CSVLog`) and one reader (:func:`read_log`).

A run directory holds two logs, :data:`TRAIN_LOG` (step, epoch, images, wall time and the
model's training metrics every ``log_every`` steps) and :data:`VAL_LOG` (validation
metrics every ``val_every`` steps). Each is a CSV file with a header row; a row may leave
empty the metrics it does not have. Values are read back as strings, as
:class:`csv.DictReader` gives them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..data.atomic import atomic_output

__all__ = ["TRAIN_LOG", "VAL_LOG", "CSVLog", "read_log"]

#: File name of the training log in a run directory.
TRAIN_LOG = "train_log.csv"
#: File name of the validation log in a run directory.
VAL_LOG = "val_log.csv"


def read_log(path, *, max_step: int | None = None, missing_ok: bool = False) -> list[dict]:
    """Read the rows of a training or validation log.

    Parameters
    ----------
    path : str or os.PathLike
        CSV log (e.g. ``run_dir / TRAIN_LOG``).
    max_step : int, optional
        Keep only the rows of steps up to this one (a resumed run drops the rows logged
        after its checkpoint).
    missing_ok : bool, optional
        Return no rows for a missing file instead of raising.

    Returns
    -------
    list of dict
        One dict per row, column name to string (``""`` where a row has no value).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist and ``missing_ok`` is False.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> log = CSVLog(pathlib.Path(tempfile.mkdtemp()) / TRAIN_LOG)
    >>> log.add({"step": 1, "loss": 0.5}); log.add({"step": 2, "loss": 0.25}); log.flush()
    >>> read_log(log.path, max_step=1)
    [{'step': '1', 'loss': '0.5'}]
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if max_step is None or int(r["step"]) <= max_step]


class CSVLog:
    """Rows of metrics, kept in memory and written atomically with each checkpoint.

    Parameters
    ----------
    path : pathlib.Path
        The CSV file (:data:`TRAIN_LOG` or :data:`VAL_LOG` of a run directory).

    Attributes
    ----------
    rows : list of dict
        The rows so far, in order; the columns of the file are the union of their keys.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []

    def load(self, max_step: int) -> None:
        """Take the rows of an existing file up to step ``max_step`` (on resume).

        Parameters
        ----------
        max_step : int
            Last step to keep; a missing file leaves the rows as they are.
        """
        if self.path.exists():
            self.rows = read_log(self.path, max_step=max_step)

    def add(self, row: dict) -> None:
        """Append a row (written at the next :meth:`flush`).

        Parameters
        ----------
        row : dict
            Column name to value; the first row's keys come first in the header.
        """
        self.rows.append(row)

    def flush(self) -> None:
        """Write all rows to :attr:`path`, atomically."""
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(self.rows)
        with atomic_output(self.path) as tmp:
            tmp.write_text(buf.getvalue())
