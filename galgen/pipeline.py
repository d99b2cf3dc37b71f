"""Pipelines: every stage of galgen from one YAML file (``galgen run CONFIG --out DIR``).

A configuration names the stages to run, each an optional section:

``simulate`` or ``ingest`` (or ``data: PATH``)
    The cutout file every later stage reads (``DIR/cutouts.h5``).
``train``
    A model trained on it (``DIR/train/``, its ``model.pt``); later stages refer to it
    as ``model: "@train"``.
``sample``
    New galaxies drawn from a model and observed (``DIR/samples.h5``).
``fit``
    A list of fits, each named: MAP (and posteriors, for all or the first few
    galaxies) with any model, the Sersic baseline included (``DIR/fits/NAME.h5`` and
    its FITS catalog).
``evaluate``
    The quality report of generative models on the cutouts (``DIR/evaluate/``).
``report``
    A page tying it together (``DIR/report/index.html``): the cutouts, the fit panels
    (observed, model, normalised residual, intrinsic, posterior std), corner plots, the
    chi-square table of the fits, the evaluation.

Everything is checked before anything runs: unknown stages or keys, wrong types,
references to stages that are absent, and models whose stamp, oversampling or pixel
scale do not match the data are refused, naming the file and key.

``DIR/manifest.json`` records each stage: its configuration, its inputs and outputs
with SHA-256 checksums, the time it took, and the versions and device of the run. A
stage runs again only when its configuration or one of its inputs changed (an
upstream stage that re-ran and wrote different files counts) or when one of its
outputs is missing or altered; otherwise it is skipped. Outputs are written atomically
and the manifest entry is added only when a stage has finished, so a run killed midway
is completed by running it again (fits, simulations and training resume where they
stopped).

Example (``pipelines/sdss_demo.yaml``, run by ``make demo``)::

    name: sdss_demo
    simulate: {survey: sdss, n: 256, stamp: 64, seed: 1}
    fit:
      - {name: vae, model: sdss-vae, samples: 100, posterior_galaxies: 4}
      - {name: sersic, model: sersic}
    report: {n_panels: 6}
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import build_dataclass, read_yaml
from .data.atomic import atomic_output
from .errors import GalgenInputError

__all__ = ["SimulateConfig", "IngestConfig", "TrainStageConfig", "SampleConfig", "FitConfig", "EvaluateConfig",
           "ReportConfig", "PipelineConfig", "load_config", "run_pipeline", "format_run", "fit_table", "STAGE_ORDER"]

log = logging.getLogger("galgen.pipeline")

#: The stages of a pipeline in the order they run (``fit`` stands for each named fit).
STAGE_ORDER = ("simulate", "ingest", "train", "sample", "fit", "evaluate", "report")

#: Refers to the model of the ``train`` stage in ``model:`` keys.
TRAINED = "@train"

Opt = typing.Optional


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
    morphology : str
        ``"bulge-disk"`` or ``"rich"`` (spiral arms, bars, lopsided disks, dust lanes,
        clumpy irregulars and companions; see :func:`galgen.simulate.simulate`).
    """

    survey: str = "sdss"
    n: int = 256
    stamp: int = 64
    seed: int = 0
    oversampling: int = 1
    psf_size: Opt[int] = None
    catalog: Opt[str] = None
    workers: int = 1
    morphology: str = "bulge-disk"


@dataclass(frozen=True)
class IngestConfig:
    """Arguments of the ingest stage (see :func:`galgen.data.ingest.ingest_fits`).

    Parameters
    ----------
    inputs : tuple of str
        FITS files or glob patterns (relative to the configuration file), one galaxy each.
    pixel_scale : float, optional
        Arcsec per pixel (default: from each file's WCS or ``PIXSCALE``).
    survey : str
        Survey name stored in the file.
    psf : str, optional
        FITS file of a PSF shared by all galaxies.
    stamp : int, optional
        Centre-crop to this size.
    nonfinite : {"mask", "raise"}
        What to do with NaN or infinite pixels.
    normalize_psf : bool
        Rescale PSFs that do not sum to 1.
    """

    inputs: typing.Tuple[str, ...] = ()
    pixel_scale: Opt[float] = None
    survey: str = "unknown"
    psf: Opt[str] = None
    stamp: Opt[int] = None
    nonfinite: str = "mask"
    normalize_psf: bool = False


@dataclass(frozen=True)
class TrainStageConfig:
    """The train stage: a training configuration (see :func:`galgen.train.train`).

    Parameters
    ----------
    config : str, optional
        Training YAML (``model:`` and ``train:`` sections), relative to the pipeline file.
    model : dict, optional
        Inline ``model:`` section (instead of ``config``).
    train : dict, optional
        Inline ``train:`` section, or options replacing those of ``config``.
    """

    config: Opt[str] = None
    model: Opt[dict] = None
    train: Opt[dict] = None


@dataclass(frozen=True)
class SampleConfig:
    """The sample stage (see :func:`galgen.sample.sample_to_file`).

    Parameters
    ----------
    model : str
        Pretrained name, run directory, checkpoint, or ``"@train"``.
    n : int
        Galaxies drawn.
    survey : str, optional
        Survey whose PSFs and noise observe them (default: the model's training survey).
    seed : int
    prior : str, optional
        VAE latent prior (``flow`` or ``normal``).
    """

    model: str = TRAINED
    n: int = 256
    survey: Opt[str] = None
    seed: int = 0
    prior: Opt[str] = None


@dataclass(frozen=True)
class FitConfig:
    """One named fit of the data (see :func:`galgen.inference.fit.fit_file`).

    Parameters
    ----------
    name : str
        Name of the fit (``fits/NAME.h5``); letters, digits, ``-`` and ``_``.
    model : str
        Pretrained name, run directory, checkpoint, ``"@train"``, ``"sersic"`` or
        ``"bulge-disk"``.
    limit : int, optional
        Fit only the first ``limit`` galaxies.
    samples : int
        Posterior draws per chain (0: MAP only).
    posterior_galaxies : int, optional
        With ``samples``: draw posteriors for the first this many galaxies only, into
        ``fits/NAME_posterior.h5``, beside the MAP fit of all of them.
    chains : int
    posterior : {"is", "laplace", "nuts", "hmc"}
    optimizer : {"auto", "lm", "adam", "lbfgs"}
    max_iter : int, optional
    restarts : int
    prior : str, optional
    batch_size : int, optional
    seed : int
    """

    name: str = ""
    model: str = ""
    limit: Opt[int] = None
    samples: int = 0
    posterior_galaxies: Opt[int] = None
    chains: int = 4
    posterior: str = "is"
    optimizer: str = "auto"
    max_iter: Opt[int] = None
    restarts: int = 0
    prior: Opt[str] = None
    batch_size: Opt[int] = None
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluate stage (see :func:`galgen.evaluation.evaluate_models`).

    Parameters
    ----------
    models : tuple of str
        Models compared with the cutouts (names, paths or ``"@train"``).
    n : int
        Galaxies evaluated (at most the file's).
    baseline : {"none", "sersic", "bulge-disk"}
    image_c2st : bool
        Also the CNN classifier test on the stamps.
    seed : int
    """

    models: typing.Tuple[str, ...] = (TRAINED,)
    n: int = 1000
    baseline: str = "none"
    image_c2st: bool = False
    seed: int = 0


@dataclass(frozen=True)
class ReportConfig:
    """Arguments of the report stage.

    Parameters
    ----------
    n_grid : int
        Galaxies shown in the PNG grid.
    max_galaxies : int
        Galaxies measured for the summary.
    n_panels : int
        Galaxies shown in each fit panel.
    """

    n_grid: int = 8
    max_galaxies: int = 2000
    n_panels: int = 6


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline run: each stage present is run (see the module docstring).

    Parameters
    ----------
    name : str
        Name of the run (used in titles).
    device : str
        Device of every stage (``auto``, ``cpu``, ``cuda``, ...).
    data : str, optional
        An existing cutout file (instead of ``simulate`` or ``ingest``).
    simulate : SimulateConfig, optional
    ingest : IngestConfig, optional
    train : TrainStageConfig, optional
    sample : SampleConfig, optional
    fit : tuple of FitConfig
    evaluate : EvaluateConfig, optional
    report : ReportConfig, optional
    """

    name: str = "galgen"
    device: str = "auto"
    data: Opt[str] = None
    simulate: Opt[SimulateConfig] = None
    ingest: Opt[IngestConfig] = None
    train: Opt[TrainStageConfig] = None
    sample: Opt[SampleConfig] = None
    fit: typing.Tuple[FitConfig, ...] = ()
    evaluate: Opt[EvaluateConfig] = None
    report: Opt[ReportConfig] = None


# -- configuration ------------------------------------------------------------------------


def _resolve(path, base: Path) -> str:
    """A path of the configuration, relative to its file's directory unless absolute."""
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else base / p)


def _grid_of_data(cfg: PipelineConfig, base: Path, where: str):
    """``(stamp, oversampling, pixel_scale)`` of the data, as far as it is known before running."""
    if cfg.simulate is not None:
        from .simulate import load_survey

        s = cfg.simulate
        survey = load_survey(_resolve(s.survey, base) if s.survey.endswith((".yaml", ".yml")) else s.survey)
        return s.stamp, s.oversampling, survey.pixel_scale
    if cfg.data is not None:
        from .data.loading import ObservationLoader

        path = Path(_resolve(cfg.data, base))
        if not path.exists():
            raise GalgenInputError(f"{where}: data: no such file {path}")
        probe = ObservationLoader(path, [])
        return probe.stamp_size, probe.oversampling, probe.pixel_scale
    if cfg.ingest is not None:
        return cfg.ingest.stamp, None, cfg.ingest.pixel_scale
    return None


def _model_file(spec: str, base: Path) -> Path | None:
    """The checkpoint file a model reference names (None for ``@train`` and parametric kinds)."""
    from .models.parametric import PARAMETRIC_KINDS
    from .pretrained import PRETRAINED_DIR, available_pretrained

    if spec == TRAINED or spec in PARAMETRIC_KINDS:
        return None
    if spec in available_pretrained():
        return PRETRAINED_DIR / f"{spec}.pt"
    path = Path(_resolve(spec, base))
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise GalgenInputError(f"model {spec!r}: neither a pretrained model ({', '.join(available_pretrained())}), "
                               f"a parametric kind {list(PARAMETRIC_KINDS)}, '{TRAINED}', nor a checkpoint "
                               f"({path} does not exist)")
    return path


def _model_grid(path: Path):
    from .checkpoints import load_checkpoint

    ck = load_checkpoint(path)
    prov, model = ck.get("provenance") or {}, (ck.get("config") or {}).get("model", {})
    return (model.get("stamp", prov.get("stamp")), model.get("oversampling", prov.get("oversampling")),
            prov.get("pixel_scale"))


def _check_grid(key: str, spec: str, model_grid, data_grid) -> None:
    names = ("stamp", "oversampling", "pixel_scale")
    for name, m, d in zip(names, model_grid, data_grid):
        if m is None or d is None:
            continue
        same = abs(float(m) - float(d)) <= 1e-6 * max(abs(float(d)), 1.0) if name == "pixel_scale" else int(m) == int(d)
        if not same:
            raise GalgenInputError(f"{key}: model {spec!r} was trained for {name} {m}, the data has {d}; "
                                   "train a model for this data or choose matching data")


def _run_config(cfg: PipelineConfig, base: Path, where: str):
    """The training configuration of the train stage, validated."""
    from .train.config import RunConfig, load_run_config

    t = cfg.train
    if (t.config is None) == (t.model is None):
        raise GalgenInputError(f"{where}: train: give either 'config' (a training YAML) or an inline 'model' section")
    if t.config is not None:
        return load_run_config(_resolve(t.config, base), overrides=t.train)
    from .models.registry import MODEL_KINDS

    run = build_dataclass(RunConfig, {"model": t.model, "train": t.train or {}}, f"{where}: train")
    if run.model.get("kind") not in MODEL_KINDS:
        raise GalgenInputError(f"{where}: train.model.kind must be one of {sorted(MODEL_KINDS)}, "
                               f"got {run.model.get('kind')!r}")
    run.train.check(f"{where}: train.train")
    return run


def load_config(path) -> PipelineConfig:
    """Read and validate a pipeline configuration, before anything runs.

    Checks the keys and types of every section, that the stages which need data have
    one source of it, that ``"@train"`` is used only with a ``train`` stage, that fit
    names are unique, and that every model named matches the data's stamp, oversampling
    and pixel scale (as far as they are known before running).

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
        Naming the file and the key: missing file, not YAML, unknown stage or key,
        wrong type or value, inconsistent stages, mismatched model.
    """
    path = Path(path)
    raw = read_yaml(path)
    cfg = build_dataclass(PipelineConfig, raw, str(path))
    _validate(cfg, path)
    return cfg


def _validate(cfg: PipelineConfig, path: Path) -> None:
    where, base = str(path), path.resolve().parent
    sources = [k for k in ("data", "simulate", "ingest") if getattr(cfg, k) is not None]
    if len(sources) > 1:
        raise GalgenInputError(f"{where}: {' and '.join(sources)}: give one source of data, not {len(sources)}")
    needs_data = [k for k in ("train", "evaluate", "report") if getattr(cfg, k) is not None] + (["fit"] if cfg.fit else [])
    if needs_data and not sources:
        raise GalgenInputError(f"{where}: {needs_data[0]}: needs data (a 'simulate' or 'ingest' section, or 'data: PATH')")
    if not (sources or cfg.sample):
        raise GalgenInputError(f"{where}: no stage to run (sections: {', '.join(f.name for f in dataclasses.fields(cfg)[3:])})")
    if cfg.simulate is not None:
        for key in ("n", "stamp", "oversampling", "workers"):
            if getattr(cfg.simulate, key) < 1:
                raise GalgenInputError(f"{path}: simulate.{key} must be >= 1")
        from .simulate import MORPHOLOGIES

        if cfg.simulate.morphology not in MORPHOLOGIES:
            raise GalgenInputError(f"{path}: simulate.morphology: one of {list(MORPHOLOGIES)}, "
                                   f"got {cfg.simulate.morphology!r}")
    if cfg.ingest is not None:
        if not cfg.ingest.inputs:
            raise GalgenInputError(f"{where}: ingest.inputs: give FITS files or glob patterns")
        for pattern in cfg.ingest.inputs:
            if not glob.glob(_resolve(pattern, base)):
                raise GalgenInputError(f"{where}: ingest.inputs: {pattern!r} matches no file")
    data_grid = _grid_of_data(cfg, base, where) if sources else None
    trained_grid = None
    if cfg.train is not None:
        run = _run_config(cfg, base, where)
        trained_grid = (run.model.get("stamp"), run.model.get("oversampling"), None)
        if data_grid is not None:
            _check_grid(f"{where}: train.model", "@train", trained_grid, data_grid)

    def check_model(key, spec):
        if spec == TRAINED:
            if cfg.train is None:
                raise GalgenInputError(f"{where}: {key}: '{TRAINED}' names the train stage, which this file lacks")
            return
        try:
            file = _model_file(spec, base)
        except GalgenInputError as exc:
            raise GalgenInputError(f"{where}: {key}: {exc}") from None
        if file is not None and data_grid is not None and key != "sample.model":
            _check_grid(f"{where}: {key}", spec, _model_grid(file), data_grid)

    if cfg.sample is not None:
        check_model("sample.model", cfg.sample.model)
        if cfg.sample.n < 1:
            raise GalgenInputError(f"{where}: sample.n must be >= 1")
    names = set()
    for i, f in enumerate(cfg.fit):
        key = f"fit[{i}]"
        if not f.name or not all(c.isalnum() or c in "-_" for c in f.name):
            raise GalgenInputError(f"{where}: {key}.name: a name of letters, digits, '-' and '_' is required, "
                                   f"got {f.name!r}")
        if f.name in names:
            raise GalgenInputError(f"{where}: {key}.name: {f.name!r} is used twice")
        names.add(f.name)
        if not f.model:
            raise GalgenInputError(f"{where}: {key}.model: required")
        check_model(f"{key}.model", f.model)
        from .inference.fit import POSTERIOR_METHODS

        if f.posterior not in POSTERIOR_METHODS:
            raise GalgenInputError(f"{where}: {key}.posterior: one of {POSTERIOR_METHODS}, got {f.posterior!r}")
        if f.optimizer not in ("auto", "lm", "adam", "lbfgs"):
            raise GalgenInputError(f"{where}: {key}.optimizer: auto, lm, adam or lbfgs, got {f.optimizer!r}")
        for k in ("limit", "posterior_galaxies", "batch_size", "max_iter"):
            v = getattr(f, k)
            if v is not None and v < 1:
                raise GalgenInputError(f"{where}: {key}.{k}: must be >= 1, got {v}")
        if f.samples < 0 or f.chains < 1:
            raise GalgenInputError(f"{where}: {key}: samples must be >= 0 and chains >= 1")
        if f.posterior_galaxies is not None and not f.samples:
            raise GalgenInputError(f"{where}: {key}.posterior_galaxies: needs samples > 0")
    if cfg.evaluate is not None:
        if not cfg.evaluate.models and cfg.evaluate.baseline == "none":
            raise GalgenInputError(f"{where}: evaluate: give models or a baseline")
        if cfg.evaluate.baseline not in ("none", "sersic", "bulge-disk"):
            raise GalgenInputError(f"{where}: evaluate.baseline: none, sersic or bulge-disk, "
                                   f"got {cfg.evaluate.baseline!r}")
        for i, spec in enumerate(cfg.evaluate.models):
            check_model(f"evaluate.models[{i}]", spec)
    from .runtime import resolve_device

    try:
        resolve_device(cfg.device)
    except GalgenInputError as exc:
        raise GalgenInputError(f"{where}: {exc}") from None


# -- the manifest ---------------------------------------------------------------------------


def _sha256(path: Path, cache: dict) -> str:
    """SHA-256 of a file, reusing ``cache`` (path -> record) when its size and mtime are unchanged."""
    st = path.stat()
    rec = cache.get(str(path))
    if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return rec["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    cache[str(path)] = {"sha256": h.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return h.hexdigest()


class _Manifest:
    """``DIR/manifest.json``: what each stage did, rewritten atomically after each stage."""

    def __init__(self, out: Path, config: PipelineConfig, config_path):
        import galsim
        import torch

        from ._version import __version__

        self.path = out / "manifest.json"
        self.out = out
        old = {}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                log.warning("%s: unreadable, every stage will run", self.path)
        self.stages = old.get("stages", {}) if isinstance(old, dict) else {}
        self.cache = {}
        for rec in self.stages.values():
            for name, o in rec.get("outputs", {}).items():
                self.cache[str(out / name)] = o
        self.head = {"name": config.name, "config_file": str(config_path) if config_path else None,
                     "config": _plain(config), "versions": {"galgen": __version__, "torch": torch.__version__,
                                                           "galsim": galsim.__version__, "numpy": np.__version__,
                                                           "python": platform.python_version()},
                     "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                 "cpus": os.cpu_count()}}

    def checksum(self, path: Path) -> str:
        return _sha256(Path(path), self.cache)

    def current(self, stage: str, key: str) -> bool:
        """Whether ``stage`` ran with this key and its outputs are as it left them."""
        rec = self.stages.get(stage)
        if not rec or rec.get("key") != key:
            return False
        for name, o in rec.get("outputs", {}).items():
            p = self.out / name
            if not p.is_file() or self.checksum(p) != o["sha256"]:
                return False
        return True

    def record(self, stage: str, key: str, config, inputs: dict, outputs, wall_s: float, device: str) -> None:
        outs = {}
        for p in outputs:
            p = Path(p)
            outs[str(p.relative_to(self.out))] = {"sha256": self.checksum(p), **{k: v for k, v in
                                                                                 self.cache[str(p)].items()
                                                                                 if k != "sha256"}}
        self.stages[stage] = {"key": key, "config": config, "inputs": inputs, "outputs": outs,
                              "wall_s": round(wall_s, 3), "device": device,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.save()

    def save(self) -> None:
        body = {**self.head, "stages": self.stages}
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(body, indent=2, default=str))


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


# -- the stages -------------------------------------------------------------------------------


@dataclass
class _Context:
    cfg: PipelineConfig
    out: Path
    base: Path
    manifest: _Manifest
    device: str
    data: Path | None = None
    trained: Path | None = None
    done: dict = field(default_factory=dict)     # stage -> "ran" | "skipped"
    outputs: dict = field(default_factory=dict)  # stage -> list of paths

    def model_spec(self, spec: str) -> str:
        if spec == TRAINED:
            return str(self.trained)
        file = _model_file(spec, self.base)
        return spec if file is None else (spec if spec in _pretrained_names() else str(file))

    def model_input(self, spec: str) -> dict:
        from .checkpoints import amortized_posterior_path

        file = self.trained if spec == TRAINED else _model_file(spec, self.base)
        if file is None:
            return {}
        sidecar = amortized_posterior_path(file)  # the amortised posterior changes posterior draws too
        extra = {f"model:{spec}:posterior": self.manifest.checksum(sidecar)} if sidecar.exists() else {}
        return {f"model:{spec}": self.manifest.checksum(file), **extra}


def _pretrained_names():
    from .pretrained import available_pretrained

    return available_pretrained()


def _stage(ctx: _Context, name: str, config, inputs: dict, work, label: str, step: str) -> list:
    """Run ``work()`` unless the manifest says this very stage is done; return its outputs."""
    key = hashlib.sha256(json.dumps({"config": config, "inputs": inputs}, sort_keys=True,
                                    default=str).encode()).hexdigest()
    if ctx.manifest.current(name, key):
        log.info("%s %s: unchanged, skipped", step, label)
        ctx.done[name] = "skipped"
        outs = [ctx.out / p for p in ctx.manifest.stages[name]["outputs"]]
    else:
        log.info("%s %s", step, label)
        t0 = time.perf_counter()
        outs = [Path(p) for p in work()]
        ctx.manifest.record(name, key, config, inputs, outs, time.perf_counter() - t0, ctx.device)
        log.info("%s %s: done in %.1f s", step, label, time.perf_counter() - t0)
        ctx.done[name] = "ran"
    ctx.outputs[name] = outs
    return outs


def _data_stage(ctx: _Context, step: str) -> None:
    cfg, out = ctx.cfg, ctx.out
    if cfg.data is not None:
        ctx.data = Path(_resolve(cfg.data, ctx.base))
        return
    target = out / "cutouts.h5"
    if cfg.simulate is not None:
        from .simulate import simulate

        s = cfg.simulate
        catalog = _resolve(s.catalog, ctx.base) if s.catalog else None
        survey = _resolve(s.survey, ctx.base) if s.survey.endswith((".yaml", ".yml")) else s.survey
        inputs = {k: ctx.manifest.checksum(Path(v)) for k, v in (("catalog", catalog), ("survey", survey))
                  if v and Path(v).is_file()}

        def work():
            return [simulate(target, survey=survey, n=s.n, stamp=s.stamp, seed=s.seed, oversampling=s.oversampling,
                             psf_size=s.psf_size, catalog=catalog, workers=s.workers, overwrite=True,
                             progress=_progress(), morphology=s.morphology)]

        key = _plain(s)
        if key.get("morphology") == "bulge-disk":  # the stage key of runs made before the option existed
            del key["morphology"]
        _stage(ctx, "simulate", key, inputs, work, f"simulate {s.n} {s.survey} galaxies -> {target}", step)
    else:
        from .data.ingest import ingest_fits

        g = cfg.ingest
        files = sorted({f for p in g.inputs for f in glob.glob(_resolve(p, ctx.base))})
        psf = _resolve(g.psf, ctx.base) if g.psf else None
        inputs = {f: ctx.manifest.checksum(Path(f)) for f in files + ([psf] if psf else [])}

        def work():
            return [ingest_fits(files, target, pixel_scale=g.pixel_scale, survey=g.survey, psf=psf, stamp=g.stamp,
                                nonfinite=g.nonfinite, normalize_psf=g.normalize_psf, overwrite=True,
                                progress=_progress())]

        _stage(ctx, "ingest", _plain(g), inputs, work, f"ingest {len(files)} FITS files -> {target}", step)
    ctx.data = target


def _progress():
    """Progress bars where someone watches (stderr is a terminal)."""
    import sys

    return sys.stderr.isatty()


def _data_input(ctx: _Context) -> dict:
    return {"data": ctx.manifest.checksum(ctx.data)}


def _train_stage(ctx: _Context, step: str) -> None:
    from .train import train

    run = _run_config(ctx.cfg, ctx.base, str(ctx.manifest.head["config_file"]))
    run_dir = ctx.out / "train"
    config = json.loads(json.dumps(_plain(run), sort_keys=True))
    inputs = _data_input(ctx)

    def work():
        key_file = run_dir / ".pipeline_key"
        key = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
        resume = (run_dir / "last.pt").exists() and key_file.exists() and key_file.read_text() == key
        if run_dir.exists() and not resume:  # another configuration or other data: start afresh
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        summary = train(run, ctx.data, run_dir, resume=resume,
                        overrides={"device": ctx.cfg.device} if ctx.cfg.device != "auto" else None)
        return [summary["model"], run_dir / "train_log.csv"]

    outs = _stage(ctx, "train", config, inputs, work, f"train a {run.model.get('kind')} -> {run_dir}", step)
    ctx.trained = outs[0]


def _sample_stage(ctx: _Context, step: str) -> None:
    from .sample import sample_to_file

    s = ctx.cfg.sample
    target = ctx.out / "samples.h5"

    def work():
        return [sample_to_file(ctx.model_spec(s.model), target, n=s.n, survey=s.survey, seed=s.seed, prior=s.prior,
                               device=ctx.device, overwrite=True)]

    _stage(ctx, "sample", _plain(s), ctx.model_input(s.model), work,
           f"sample {s.n} galaxies from {s.model} -> {target}", step)


def _fit_stage(ctx: _Context, f: FitConfig, step: str) -> None:
    from .inference.fit import fit_file

    target = ctx.out / "fits" / f"{f.name}.h5"
    inputs = {**_data_input(ctx), **ctx.model_input(f.model)}
    common = dict(chains=f.chains, posterior=f.posterior, optimizer=f.optimizer, max_iter=f.max_iter,
                  restarts=f.restarts, prior=f.prior, batch_size=f.batch_size, seed=f.seed, device=ctx.device,
                  overwrite=True, progress=_progress())

    def work():
        spec = ctx.model_spec(f.model)
        all_samples = f.samples if f.posterior_galaxies is None else 0
        outs = [fit_file(spec, ctx.data, target, samples=all_samples, limit=f.limit, **common)]
        if f.posterior_galaxies is not None:
            n_post = min(f.posterior_galaxies, f.limit or f.posterior_galaxies)
            outs.append(fit_file(spec, ctx.data, target.with_name(f"{f.name}_posterior.h5"), samples=f.samples,
                                 limit=n_post, **common))
        return [p for o in outs for p in (o, o.with_suffix(".fits"))]

    what = "MAP" + (f" + posteriors ({f.posterior}, {f.samples} draws x {f.chains} chains"
                    + (f", first {f.posterior_galaxies} galaxies)" if f.posterior_galaxies else ")")
                    if f.samples else "")
    _stage(ctx, f"fit.{f.name}", _plain(f), inputs, work, f"fit {f.name}: {f.model}, {what} -> {target}", step)


def _evaluate_stage(ctx: _Context, step: str) -> None:
    from .data.loading import ObservationLoader
    from .evaluation.quality import evaluate_models

    e = ctx.cfg.evaluate
    target = ctx.out / "evaluate"
    inputs = _data_input(ctx)
    for spec in e.models:
        inputs.update(ctx.model_input(spec))

    def work():
        n = min(e.n, ObservationLoader(ctx.data, []).n_file)
        evaluate_models([ctx.model_spec(s) for s in e.models], ctx.data, target, n=n, seed=e.seed,
                        device=ctx.device, baseline=None if e.baseline == "none" else e.baseline,
                        image_c2st=e.image_c2st)
        return sorted(p for p in target.rglob("*") if p.is_file())

    _stage(ctx, "evaluate", _plain(e), inputs, work, f"evaluate {', '.join(e.models)} -> {target}", step)


def _report_stage(ctx: _Context, step: str) -> None:
    r = ctx.cfg.report
    target = ctx.out / "report"
    upstream = {name: [str(p.relative_to(ctx.out)) if p.is_relative_to(ctx.out) else str(p) for p in outs]
                for name, outs in ctx.outputs.items()}
    inputs = _data_input(ctx)
    for name, outs in ctx.outputs.items():
        for p in outs:
            if p.suffix in (".h5", ".html"):
                inputs[f"{name}:{p.name}"] = ctx.manifest.checksum(p)

    def work():
        return _write_report(ctx, r, target, upstream)

    _stage(ctx, "report", _plain(r), inputs, work, f"report -> {target}/index.html", step)


def fit_table(fits: dict) -> list[dict]:
    """Rows of the chi-square table of named fit files: one per fit.

    Parameters
    ----------
    fits : dict of str to path
        Fit name to fit file (:func:`galgen.inference.fit.fit_file`).

    Returns
    -------
    list of dict
        ``name``, ``model``, ``n``, ``median_chi2_dof``, ``p16_chi2_dof``,
        ``p84_chi2_dof``, ``frac_chi2_dof_below_1p2``, ``converged`` (fraction whose MAP
        converged), and the median absolute relative flux and size errors against the
        simulation's truth where the cutouts hold one.
    """
    from .data.cutouts import CutoutFile
    from .data.fitfile import FitFile

    rows = []
    for name, path in fits.items():
        with FitFile(path) as f:
            chi2, dof, status, index = f.read("chi2"), f.read("dof"), f.read("status"), f.read("index")
            derived, kind, data = f.read("derived_map"), f.attrs.get("model_kind", ""), f.data_path
        r = chi2 / np.maximum(dof, 1)
        row = {"name": name, "model": str(kind), "n": int(len(r)), "median_chi2_dof": float(np.median(r)),
               "p16_chi2_dof": float(np.percentile(r, 16)), "p84_chi2_dof": float(np.percentile(r, 84)),
               "frac_chi2_dof_below_1p2": float(np.mean(r < 1.2)),
               "converged": float(np.mean(status == 0))}
        with CutoutFile(data) as c:
            cat = c.catalog
        if cat is not None and "flux" in cat.colnames and "hlr" in cat.colnames:
            truth_flux, truth_hlr = (np.asarray(cat[k])[index] for k in ("flux", "hlr"))
            row["median_abs_dflux"] = float(np.median(np.abs(derived[:, 0] / truth_flux - 1)))
            row["median_abs_dhlr"] = float(np.median(np.abs(derived[:, 1] / truth_hlr - 1)))
        rows.append(row)
    return rows


def _format_table(rows: list[dict]) -> str:
    cols = [("name", "fit", "{}"), ("model", "model", "{}"), ("n", "galaxies", "{}"),
            ("median_chi2_dof", "median chi2/dof", "{:.3f}"), ("p16_chi2_dof", "16%", "{:.3f}"),
            ("p84_chi2_dof", "84%", "{:.3f}"), ("frac_chi2_dof_below_1p2", "chi2/dof<1.2", "{:.2f}"),
            ("converged", "converged", "{:.2f}"), ("median_abs_dflux", "|dF/F| (truth)", "{:.3f}"),
            ("median_abs_dhlr", "|dhlr/hlr| (truth)", "{:.3f}")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _write_report(ctx: _Context, r: ReportConfig, target: Path, upstream: dict) -> list:
    import html

    from .evaluation.report import format_summary, summarize_cutouts
    from .plotting import cutout_grid, fit_corner, fit_panel

    outs = []
    s = ctx.cfg.simulate
    title = f"{ctx.cfg.name}: {Path(ctx.data).name}" + (f" ({s.survey}, {s.n} galaxies, stamp {s.stamp})" if s else "")
    outs.append(cutout_grid(ctx.data, target / "cutouts.png", n=r.n_grid, title=title))
    summary = summarize_cutouts(ctx.data, max_galaxies=r.max_galaxies)
    summary["config"] = ctx.cfg.name
    for name, text in (("summary.json", json.dumps(summary, indent=2, default=str)),
                       ("summary.txt", format_summary(summary))):
        with atomic_output(target / name) as tmp:
            tmp.write_text(text)
        outs.append(target / name)
    if "sample" in ctx.outputs:
        outs.append(cutout_grid(ctx.outputs["sample"][0], target / "samples.png", n=r.n_grid,
                                title=f"{ctx.cfg.name}: samples of {ctx.cfg.sample.model}"))
    fits, panels, corners = {}, [], []
    for f in ctx.cfg.fit:
        files = [p for p in ctx.outputs[f"fit.{f.name}"] if p.suffix == ".h5"]
        fits[f.name] = files[0]
        panels.append(fit_panel(files[-1], target / f"fit_{f.name}.png", n=r.n_panels))
        if len(files) > 1 or f.samples:
            corners.append(fit_corner(files[-1], target / f"corner_{f.name}.png", row=0))
    table = fit_table(fits) if fits else []
    if fits:
        with atomic_output(target / "fits.md") as tmp:
            tmp.write_text(_format_table(table))
        with atomic_output(target / "fits.json") as tmp:
            tmp.write_text(json.dumps(table, indent=2))
        outs += [target / "fits.md", target / "fits.json"]
    outs += panels + corners
    # the page
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(ctx.cfg.name)}</title>"
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>",
             f"<h1>galgen run: {esc(ctx.cfg.name)}</h1>",
             f"<h2>Cutouts</h2><p>{esc(str(ctx.data))}</p><img src='cutouts.png'><pre>{esc(format_summary(summary))}</pre>"]
    if "sample" in ctx.outputs:
        parts.append("<h2>Samples</h2><img src='samples.png'>")
    if table:
        keys = [k for k in table[0]]
        parts.append("<h2>Fits</h2><table><tr>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{esc(str(v))}</td>"
                                                for v in (row.get(k) for k in keys)) + "</tr>" for row in table)
                     + "</table>")
        for p in panels:
            parts.append(f"<h3>{esc(p.stem)}</h3><img src='{esc(p.name)}'>")
        for p in corners:
            parts.append(f"<h3>{esc(p.stem)}: posterior of the first galaxy</h3><img src='{esc(p.name)}'>")
    if "evaluate" in ctx.outputs:
        parts.append("<h2>Evaluation</h2><p><a href='../evaluate/report.html'>quality report</a></p>")
    parts.append("<h2>Files</h2><ul>" + "".join(
        f"<li>{esc(stage)}: " + ", ".join(f"<code>{esc(p)}</code>" for p in paths) + "</li>"
        for stage, paths in upstream.items()) + "</ul></body></html>")
    with atomic_output(target / "index.html") as tmp:
        tmp.write_text("\n".join(parts))
    outs.append(target / "index.html")
    return outs


def run_pipeline(config, out) -> dict:
    """Run the stages of a pipeline, skipping those already done (see the module docstring).

    Parameters
    ----------
    config : PipelineConfig, str or os.PathLike
        Configuration or its YAML file (relative paths in it are relative to the file;
        for a :class:`PipelineConfig`, to the working directory).
    out : str or os.PathLike
        Output directory (``manifest.json``, ``cutouts.h5``, ``train/``, ``samples.h5``,
        ``fits/``, ``evaluate/``, ``report/``).

    Returns
    -------
    dict
        ``stages`` (stage name to ``"ran"`` or ``"skipped"``), ``outputs`` (stage name to
        its files), ``manifest`` (path), ``report`` (the page, if any), ``fits`` (the
        chi-square table rows) and ``summary`` (of the cutouts, if reported).

    Raises
    ------
    GalgenInputError
        A bad configuration (before anything runs) or bad inputs.
    """
    if isinstance(config, PipelineConfig):
        cfg, path = config, None
        _validate(cfg, Path("pipeline.yaml").resolve())
        base = Path.cwd()
    else:
        path = Path(config)
        cfg = load_config(path)
        base = path.resolve().parent
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from .runtime import resolve_device

    manifest = _Manifest(out.resolve(), cfg, path.resolve() if path else None)
    ctx = _Context(cfg=cfg, out=out.resolve(), base=base, manifest=manifest, device=str(resolve_device(cfg.device)))
    plan = []
    if cfg.data is not None or cfg.simulate is not None or cfg.ingest is not None:
        plan.append(lambda s: _data_stage(ctx, s))
    if cfg.train is not None:
        plan.append(lambda s: _train_stage(ctx, s))
    if cfg.sample is not None:
        plan.append(lambda s: _sample_stage(ctx, s))
    for f in cfg.fit:
        plan.append(lambda s, f=f: _fit_stage(ctx, f, s))
    if cfg.evaluate is not None:
        plan.append(lambda s: _evaluate_stage(ctx, s))
    if cfg.report is not None:
        plan.append(lambda s: _report_stage(ctx, s))
    for i, stage in enumerate(plan):
        stage(f"[{i + 1}/{len(plan)}]")
    manifest.save()
    result = {"stages": dict(ctx.done), "outputs": {k: [str(p) for p in v] for k, v in ctx.outputs.items()},
              "manifest": str(manifest.path)}
    if cfg.report is not None:
        rep = out / "report"
        result["report"] = str(rep / "index.html")
        result["summary"] = json.loads((rep / "summary.json").read_text())
        if (rep / "fits.json").exists():
            result["fits"] = json.loads((rep / "fits.json").read_text())
    return result


def format_run(result: dict) -> str:
    """The text ``galgen run`` prints: the cutout summary, the fit table, then where everything is.

    Parameters
    ----------
    result : dict
        What :func:`run_pipeline` returned.

    Returns
    -------
    str
        Ends with one line per output: the report page, fit panels, corner plots, fit
        files and FITS catalogs, the chi-square table, the cutouts and the manifest.
    """
    from .evaluation.report import format_summary

    lines = []
    if "summary" in result:
        lines.append(format_summary(result["summary"]).rstrip("\n"))
    if result.get("fits"):
        lines += ["", "fits (chi2/dof of the MAP fits):", _format_table(result["fits"]).rstrip("\n")]
    lines += ["", "stages: " + ", ".join(f"{k} {v}" for k, v in result["stages"].items()), "", "outputs:"]
    outputs = [p for paths in result["outputs"].values() for p in paths]

    def show(label, paths):
        for p in paths:
            lines.append(f"  {label:<14} {p}")

    show("cutouts", [p for k, v in result["outputs"].items() if k in ("simulate", "ingest") for p in v])
    show("samples", result["outputs"].get("sample", []))
    show("model", [p for p in result["outputs"].get("train", []) if p.endswith(".pt")])
    show("fit file", [p for p in outputs if "/fits/" in p and p.endswith(".h5")])
    show("FITS catalog", [p for p in outputs if "/fits/" in p and p.endswith(".fits")])
    show("evaluation", [p for p in result["outputs"].get("evaluate", []) if p.endswith("report.html")])
    report = result["outputs"].get("report", [])
    show("fit panels", [p for p in report if Path(p).name.startswith("fit_")])
    show("corner plot", [p for p in report if Path(p).name.startswith("corner_")])
    show("chi2 table", [p for p in report if p.endswith("fits.md")])
    show("manifest", [result["manifest"]])
    if "report" in result:
        show("report page", [result["report"]])
    return "\n".join(lines) + "\n"
