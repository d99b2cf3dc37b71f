"""Atomic file output: write to a temporary file beside the target, then rename.

A run killed midway leaves at most a ``*.partial`` or ``.tmp-*`` file, never a file
under the final name that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path, *, suffix: str = ""):
    """Yield a temporary path; on success it is renamed to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination. Its parent directory is created if needed.
    suffix : str, optional
        Suffix for the temporary file (some writers choose a format by extension,
        e.g. matplotlib's ``savefig``); defaults to the suffix of ``path``.

    Yields
    ------
    pathlib.Path
        Temporary path in the same directory (so that the final rename is atomic).
        If the body raises, the temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output(d / "summary.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (d / "summary.txt").read_text()
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".tmp-{path.name}-", suffix=suffix or path.suffix, dir=path.parent
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
