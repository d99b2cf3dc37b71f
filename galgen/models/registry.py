"""Model kinds by name: ``ae``, ``vae``, ``wgan-gp``, ``gan``, as they appear in configs and checkpoints."""

from __future__ import annotations

import importlib

from ..errors import GalgenInputError

__all__ = ["MODEL_KINDS", "model_class", "build_model"]

#: ``kind`` -> ``"module:Class"`` inside :mod:`galgen.models` (imported on first use).
MODEL_KINDS = {
    "ae": "autoencoder:AutoEncoder",
    "vae": "vae:VAE",
    "wgan-gp": "wgan:WGANGP",
    "gan": "gan:GAN",
}


def model_class(kind: str):
    """The class of a model kind.

    Parameters
    ----------
    kind : str
        One of :data:`MODEL_KINDS`.

    Returns
    -------
    type
        A :class:`galgen.models.GenerativeModel` subclass.

    Examples
    --------
    >>> model_class("ae").__name__
    'AutoEncoder'
    """
    if kind not in MODEL_KINDS:
        raise GalgenInputError(f"model kind: must be one of {sorted(MODEL_KINDS)}, got {kind!r}")
    module, name = MODEL_KINDS[kind].split(":")
    return getattr(importlib.import_module(f"galgen.models.{module}"), name)


def build_model(config: dict):
    """Build a model from a config dict with a ``kind`` key.

    Parameters
    ----------
    config : dict
        ``kind`` and constructor options (as ``model.config``).

    Returns
    -------
    galgen.models.GenerativeModel

    Examples
    --------
    >>> build_model({"kind": "ae", "stamp": 32, "latent_dim": 4, "width": 8}).kind
    'ae'
    """
    if not isinstance(config, dict) or "kind" not in config:
        raise GalgenInputError(f"model config: needs a 'kind' among {sorted(MODEL_KINDS)}, got {config!r}")
    return model_class(config["kind"]).from_config(config)
