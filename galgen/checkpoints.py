"""Checkpoints: weights, optimizer state, config and data provenance, safely stored.

The trainer writes them (:mod:`galgen.train`); every stage that uses a trained model
reads them (:func:`load_model`, through :func:`galgen.runtime.resolve_model` and
:func:`galgen.load_pretrained`), so they live beside the stages, not inside the trainer.

A checkpoint is written atomically with ``torch.save`` and read with
``torch.load(..., weights_only=True)``, which never unpickles arbitrary objects: it holds
only tensors and plain Python values (the config and provenance are JSON strings). A
file holding anything else is refused with a clear error.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ._version import __version__
from .data.atomic import atomic_output
from .errors import GalgenInputError

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "load_model", "amortized_posterior_path"]

CHECKPOINT_FORMAT = "galgen-checkpoint-1"


def save_checkpoint(path, *, model_state: dict, config: dict, step: int = 0, optimizer_state: dict | None = None,
                    provenance: dict | None = None, metrics: dict | None = None,
                    rng_state: torch.Tensor | None = None):
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    model_state : dict
        ``model.state_dict()``.
    config : dict
        The model/training configuration (JSON-serialisable); it identifies the
        architecture when loading.
    step : int, optional
        Training step.
    optimizer_state : dict, optional
        ``optimizer.state_dict()`` (tensors and plain values only).
    provenance : dict, optional
        Where the training data came from (file, fingerprint, seed, ...); JSON-serialisable.
    metrics : dict, optional
        Plain numbers to keep with the checkpoint (losses, quality figures).
    rng_state : torch.Tensor, optional
        ``torch.get_rng_state()`` for an exact resume.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    try:
        config_json = json.dumps(config, sort_keys=True)
        provenance_json = json.dumps(provenance or {}, sort_keys=True)
        metrics_json = json.dumps(metrics or {}, sort_keys=True)
    except TypeError as exc:
        raise GalgenInputError(f"{path}: config, provenance and metrics must be JSON-serialisable ({exc})") from None
    payload = {
        "format": CHECKPOINT_FORMAT, "galgen_version": __version__, "step": int(step),
        "config": config_json, "provenance": provenance_json, "metrics": metrics_json,
        "model": model_state, "optimizer": optimizer_state, "rng_state": rng_state,
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path, *, expect_config: dict | None = None, config_keys=None, map_location="cpu") -> dict:
    """Read a checkpoint without unpickling arbitrary objects.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint file.
    expect_config : dict, optional
        The configuration of the model the checkpoint will be loaded into; a mismatch
        (on ``config_keys``, or on every key of ``expect_config``) is an error.
    config_keys : sequence of str, optional
        The keys that define the architecture.
    map_location : str or torch.device, optional
        Where to put the tensors.

    Returns
    -------
    dict
        ``model``, ``optimizer``, ``rng_state`` (tensors); ``step``; ``config``,
        ``provenance``, ``metrics`` (dicts); ``galgen_version``.

    Raises
    ------
    GalgenInputError
        Missing file, a file that is not a galgen checkpoint, one holding pickled
        objects, or a configuration mismatch.
    """
    path = Path(path)
    if not path.exists():
        raise GalgenInputError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GalgenInputError(f"{path}: refused: the file holds objects other than tensors and plain values, "
                               f"which galgen never unpickles ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # a corrupt or foreign file: torch raises many types here
        raise GalgenInputError(f"{path}: not a readable torch checkpoint ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise GalgenInputError(f"{path}: not a galgen checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT!r})")
    out = dict(payload)
    for key in ("config", "provenance", "metrics"):
        out[key] = json.loads(payload[key])
    if expect_config is not None:
        keys = list(config_keys) if config_keys is not None else sorted(expect_config)
        diff = [k for k in keys if out["config"].get(k) != expect_config.get(k)]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {out['config'].get(k)!r} vs model {expect_config.get(k)!r}"
                               for k in diff)
            raise GalgenInputError(f"{path}: checkpoint of another architecture/config ({detail})")
    return out


def load_model(path, *, device="cpu"):
    """Load a trained model from a run directory or a checkpoint file.

    Parameters
    ----------
    path : str or os.PathLike
        A run directory (its ``model.pt``, else ``last.pt``) or a checkpoint file.
    device : str or torch.device, optional
        Where to put the model.

    Returns
    -------
    galgen.models.GenerativeModel
        In eval mode, with ``provenance`` (data the model was trained on: survey,
        pixel scale, oversampling, ...), ``metrics`` (quality figures), ``run_config``
        and ``checkpoint_path`` attributes. An amortised posterior stored beside the
        checkpoint (:func:`amortized_posterior_path`) is attached to it
        (:func:`galgen.inference.amortized.attach_amortized_posterior`).

    Raises
    ------
    GalgenInputError
        No checkpoint there, an unsafe or foreign file, or weights that do not fit the
        stored architecture.
    """
    from .models.registry import build_model

    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.pt", path / "last.pt"]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise GalgenInputError(f"{path}: no model.pt or last.pt in this run directory")
        path = found[0]
    ck = load_checkpoint(path, map_location="cpu")
    cfg = ck["config"]
    model_cfg = cfg.get("model", cfg)
    model = build_model(model_cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise GalgenInputError(f"{path}: weights do not fit the stored {model_cfg.get('kind')} config "
                               f"({str(exc).splitlines()[0]})") from None
    model.provenance = ck["provenance"]
    model.metrics = ck["metrics"]
    model.run_config = cfg
    model.checkpoint_path = str(path)
    model = model.to(device).eval()
    sidecar = amortized_posterior_path(path)
    if sidecar.exists():
        from .inference.amortized import attach_amortized_posterior, load_amortized_posterior

        attach_amortized_posterior(model, load_amortized_posterior(sidecar, device=device))
    return model


def amortized_posterior_path(path) -> Path:
    """Where the amortised posterior of a model checkpoint is stored: ``<name>.posterior.pt`` beside it.

    Parameters
    ----------
    path : str or os.PathLike
        A model checkpoint file.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    return path.with_name(path.stem + ".posterior.pt")
