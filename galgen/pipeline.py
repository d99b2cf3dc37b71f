"""Pipelines: chain the stages from a YAML configuration (``galgen run CONFIG``).

A configuration is a YAML mapping validated into the dataclasses below (unknown
keys, wrong types and out-of-range values give an error naming the file and the
key). Stages are resumable: re-running a configuration skips what is already done
(the simulation is reused when its output holds the same job) and continues what
was interrupted.

Example (``pipelines/sdss_demo.yaml``)::

    name: sdss_demo
    simulate:
      survey: sdss
      n: 256
      stamp: 64
      seed: 1
    report:
      n_grid: 8
"""

from __future__ import annotations

import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .config import build_dataclass, read_yaml
from .data.atomic import atomic_output
from .errors import GalgenInputError

__all__ = ["SimulateConfig", "ReportConfig", "PipelineConfig", "load_config", "run_pipeline"]

log = logging.getLogger("galgen.pipeline")


@dataclass(frozen=True)
class SimulateConfig:
    """Arguments of the simulate stage (see :func:`galgen.simulate.simulate`).

    Parameters
    ----------
    survey : str
        Survey preset or YAML file.
    n : int
        Number of galaxies.
    stamp : int
        Detector stamp size.
    seed : int
        Random seed.
    oversampling : int
        Intrinsic pixels per detector pixel.
    psf_size : int, optional
        PSF grid size in intrinsic pixels.
    catalog : str, optional
        Population catalog.
    workers : int
        Rendering processes.
    """

    survey: str = "sdss"
    n: int = 256
    stamp: int = 64
    seed: int = 0
    oversampling: int = 1
    psf_size: typing.Optional[int] = None
    catalog: typing.Optional[str] = None
    workers: int = 1


@dataclass(frozen=True)
class ReportConfig:
    """Arguments of the report stage.

    Parameters
    ----------
    n_grid : int
        Galaxies shown in the PNG grid.
    max_galaxies : int
        Galaxies measured for the summary.
    """

    n_grid: int = 8
    max_galaxies: int = 2000


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline run.

    Parameters
    ----------
    name : str
        Name of the run (used in titles).
    simulate : SimulateConfig
        Simulation stage.
    report : ReportConfig
        Report stage.
    """

    name: str = "galgen"
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def load_config(path) -> PipelineConfig:
    """Read and validate a pipeline configuration.

    Parameters
    ----------
    path : str or os.PathLike
        YAML file (read with ``yaml.safe_load``).

    Returns
    -------
    PipelineConfig

    Raises
    ------
    GalgenInputError
        If the file is missing, not YAML, or has unknown keys or bad values.
    """
    path = Path(path)
    cfg = build_dataclass(PipelineConfig, read_yaml(path), str(path))
    for key in ("n", "stamp", "oversampling", "workers"):
        if getattr(cfg.simulate, key) < 1:
            raise GalgenInputError(f"{path}: simulate.{key} must be >= 1")
    return cfg


def run_pipeline(config, out) -> dict:
    """Run a pipeline: simulate, then report (PNG grid and summary).

    Parameters
    ----------
    config : PipelineConfig, str or os.PathLike
        Configuration or its YAML file.
    out : str or os.PathLike
        Output directory; receives ``cutouts.h5``, ``report/cutouts.png``,
        ``report/summary.txt`` and ``report/summary.json``.

    Returns
    -------
    dict
        The summary (see :func:`galgen.evaluation.summarize_cutouts`).
    """
    from .evaluation.report import format_summary, summarize_cutouts
    from .plotting import cutout_grid
    from .simulate import simulate

    cfg = config if isinstance(config, PipelineConfig) else load_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = cfg.simulate
    cutouts = out / "cutouts.h5"
    log.info("[1/2] simulate %d %s galaxies -> %s", s.n, s.survey, cutouts)
    simulate(cutouts, survey=s.survey, n=s.n, stamp=s.stamp, seed=s.seed, oversampling=s.oversampling,
             psf_size=s.psf_size, catalog=s.catalog, workers=s.workers, overwrite=True)
    report = out / "report"
    log.info("[2/2] report -> %s", report)
    cutout_grid(cutouts, report / "cutouts.png", n=cfg.report.n_grid,
                title=f"{cfg.name}: {s.survey}, {s.n} galaxies, stamp {s.stamp}")
    summary = summarize_cutouts(cutouts, max_galaxies=cfg.report.max_galaxies)
    summary["config"] = cfg.name
    with atomic_output(report / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    with atomic_output(report / "summary.txt") as tmp:
        tmp.write_text(format_summary(summary))
    return summary
