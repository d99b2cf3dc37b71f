"""Helpers shared by the benchmark scripts (run them from the repository root or this folder)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path


def machine_info() -> dict:
    """CPU model, cores, GPU and library versions, and the date, for docs/benchmarks.md.

    torch is described only if the benchmark already imported it (importing it here
    could change the threading a benchmark measures).

    Returns
    -------
    dict
    """
    import astropy
    import galsim
    import h5py
    import numpy

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
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "cores_usable": cores, "platform": platform.platform(),
        "python": platform.python_version(), "galsim": galsim.__version__, "numpy": numpy.__version__,
        "h5py": h5py.__version__, "astropy": astropy.__version__, "galgen": galgen.__version__,
        "date": _dt.date.today().isoformat(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def finish(result: dict, json_path=None) -> dict:
    """Print the machine line and save ``result`` as JSON where asked (the end of each script).

    Parameters
    ----------
    result : dict
        With a ``machine`` entry from :func:`machine_info`.
    json_path : str or os.PathLike, optional

    Returns
    -------
    dict
        ``result``.
    """
    import json

    print("machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def benchmark_galaxies(model, data, rows, galaxies: str, generator):
    """The galaxies of the deep-prior posterior benchmarks: observations and their images.

    Parameters
    ----------
    model : galgen.models.LatentModel
    data : str or os.PathLike
        Cutout file whose PSFs and noise observe the galaxies.
    rows : list of int
        Its rows.
    galaxies : {"data", "prior"}
        The file's own observed cutouts, or the model's prior draws (flux scale 0) observed
        through those rows' PSFs and noise.
    generator : torch.Generator
        Draws the prior codes and the noise (``prior``).

    Returns
    -------
    observation : galgen.physics.Observation
    observed : torch.Tensor
        ``(len(rows), S, S)``.
    intrinsic : torch.Tensor or None
        The decoded prior draws (``prior``), else None.
    """
    import numpy as np
    import torch

    from galgen.data.cutouts import CutoutFile
    from galgen.data.loading import observation_from_cutouts
    from galgen.models.base import sample_latents

    obs = observation_from_cutouts(data, rows)
    if galaxies == "data":
        with CutoutFile(data) as f:
            return obs, torch.as_tensor(f.read("observed", np.asarray(rows))).float(), None
    with torch.no_grad():
        z = sample_latents(model.prior(), len(rows), generator=generator).float()
        intr = model.decode(z)
        _, observed = obs.observe(intr, generator=generator)
    return obs, observed, intr
