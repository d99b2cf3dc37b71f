"""Pretrained models shipped with galgen, each with a model card.

A pretrained model is a final checkpoint (``<name>.pt``: weights, config, training-data
provenance, quality figures) and a card (``<name>.json``) in this package directory.
:func:`load_pretrained` loads one with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GalgenInputError

__all__ = ["PRETRAINED_DIR", "available_pretrained", "model_card", "load_pretrained"]

#: Directory holding the pretrained checkpoints and cards.
PRETRAINED_DIR = Path(__file__).resolve().parent


def available_pretrained() -> list[str]:
    """Names of the pretrained models installed with galgen.

    Returns
    -------
    list of str
        E.g. ``["sdss-gan", "sdss-vae"]``.
    """
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt") if not p.name.endswith(".posterior.pt"))


def model_card(name: str) -> dict:
    """The card of a pretrained model: training config, data provenance, quality figures.

    Parameters
    ----------
    name : str
        A name of :func:`available_pretrained`.

    Returns
    -------
    dict
    """
    path = PRETRAINED_DIR / f"{name}.json"
    if not path.exists():
        raise GalgenInputError(f"pretrained model {name!r}: no card (available: {available_pretrained()})")
    return json.loads(path.read_text())


def load_pretrained(name: str, device="cpu"):
    """Load a pretrained model by name.

    Parameters
    ----------
    name : str
        E.g. ``"sdss-vae"`` (see :func:`available_pretrained`).
    device : str or torch.device, optional

    Returns
    -------
    galgen.models.GenerativeModel
        In eval mode, with ``provenance`` and ``metrics`` attributes.

    Examples
    --------
    >>> import galgen
    >>> vae = galgen.load_pretrained("sdss-vae")  # doctest: +SKIP
    >>> images = vae.sample(16)  # intrinsic galaxies at SDSS's 0.396"/pixel  # doctest: +SKIP
    """
    from ..checkpoints import load_model

    path = PRETRAINED_DIR / f"{name}.pt"
    if not path.exists():
        raise GalgenInputError(f"pretrained model {name!r}: not installed (available: "
                               f"{', '.join(available_pretrained()) or 'none'})")
    return load_model(path, device=device)
