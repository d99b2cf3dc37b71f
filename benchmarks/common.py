"""Helpers shared by the benchmark scripts (run them from the repository root or this folder)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path


def machine_info() -> dict:
    """CPU model, usable cores, GPU and library versions, and the date, for docs/benchmarks.md.

    Returns
    -------
    dict
    """
    import galsim
    import numpy
    import torch

    import galgen

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "usable_cores": cores, "gpu": gpu, "python": platform.python_version(),
        "torch": torch.__version__, "galsim": galsim.__version__, "numpy": numpy.__version__,
        "galgen": galgen.__version__, "date": _dt.date.today().isoformat(),
    }
