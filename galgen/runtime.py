"""What every stage needs and no stage owns: devices, models by name, seeds.

The stages (``simulate``, ``train``, ``sample``, ``fit``, ``evaluate``) and the
pipeline scripts all resolve a ``--device`` option, load a model named by a pretrained
name, a run directory or a checkpoint, and derive the seeds of their random streams from
one user seed. They do it here, so that one rule serves them all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import GalgenInputError

__all__ = ["resolve_device", "resolve_model", "derive_seed", "generator"]

#: Multiplier of the seed-mixing rule of :func:`derive_seed` (a prime above 10**6).
_SEED_STRIDE = 1_000_003
_SEED_MODULUS = 2**63 - 1


def resolve_device(name="auto") -> torch.device:
    """The device a ``device`` option names.

    Parameters
    ----------
    name : str or torch.device
        ``auto`` picks CUDA, then Apple MPS, then the CPU; a :class:`torch.device` is
        returned as it is.

    Returns
    -------
    torch.device

    Raises
    ------
    GalgenInputError
        A device this machine does not have.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise GalgenInputError(f"device: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GalgenInputError(f"device: {name!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GalgenInputError(f"device: {name!r} requested but MPS is not available on this machine")
    return dev


def resolve_model(spec, device="cpu", *, data=None, prior: str | None = None):
    """A model from a pretrained name, a run directory, a checkpoint file or a parametric kind.

    Parameters
    ----------
    spec : str, os.PathLike or torch.nn.Module
        ``"sdss-vae"`` (see :func:`galgen.available_pretrained`), a run directory, a
        ``.pt`` file, ``"sersic"`` / ``"bulge-disk"`` (a
        :class:`~galgen.models.parametric.SersicModel` built for ``data``), or a model
        (returned as is, moved to ``device``).
    device : str or torch.device, optional
    data : tuple of (int, int, float), optional
        ``(stamp, oversampling, pixel_scale)`` of the data a parametric model is built
        for; required for a parametric ``spec``.
    prior : str, optional
        One of the model's :attr:`~galgen.models.LatentModel.prior_choices` (e.g.
        ``"normal"`` for a VAE's N(0, I) instead of its flow); default the model's own.

    Returns
    -------
    torch.nn.Module
        On ``device``, in eval mode unless ``spec`` was a module.

    Raises
    ------
    GalgenInputError
        A name that is neither a file, a run directory, a pretrained model nor a
        parametric kind, or a prior the model does not have.
    """
    from torch import nn

    from .models.parametric import PARAMETRIC_KINDS, SersicModel

    device = resolve_device(device)
    if isinstance(spec, nn.Module):
        model = spec.to(device)
    elif isinstance(spec, str) and spec in PARAMETRIC_KINDS and not Path(spec).exists():
        if data is None:
            raise GalgenInputError(f"--model: a {spec!r} model is built for a data file's stamp, oversampling "
                                   "and pixel scale; none was given")
        stamp, oversampling, pixel_scale = data
        model = SersicModel(spec, stamp=stamp, oversampling=oversampling, pixel_scale=pixel_scale).to(device).eval()
    else:
        from .pretrained import available_pretrained, load_pretrained
        from .checkpoints import load_model

        if isinstance(spec, str) and spec in available_pretrained() and not Path(spec).exists():
            model = load_pretrained(spec, device=device)
        elif not Path(spec).exists():
            raise GalgenInputError(f"--model: {spec!r} is neither a file, a run directory, a parametric kind "
                                   f"{list(PARAMETRIC_KINDS)}, nor a pretrained model "
                                   f"({', '.join(available_pretrained()) or 'none installed'})")
        else:
            model = load_model(spec, device=device)
    return model if prior is None else model.with_prior(prior)


def derive_seed(seed: int, *keys: int) -> int:
    """The seed of one random stream of a stage: a batch, an epoch, a step, a shard.

    Every stream of a run is named by integer keys below the user seed, e.g.
    ``derive_seed(seed, first_row)`` for the batch of a fit file that starts at
    ``first_row``, so that a batch draws the same numbers whether the run is sharded,
    resumed or neither. The rule is ``(seed * 1000003 + key) mod (2**63 - 1)``, applied
    key after key; it is the one galgen's files were made with since version 0.1, kept
    so that a seed gives the same files as before.

    Parameters
    ----------
    seed : int
        The user's seed.
    *keys : int
        The stream's name, outermost first.

    Returns
    -------
    int
        A seed for :meth:`torch.Generator.manual_seed`.

    Examples
    --------
    >>> derive_seed(0, 256)
    256
    >>> derive_seed(1, 0) != derive_seed(0, 1_000_003 - 1) or True
    True
    """
    out = int(seed)
    for key in keys:
        out = (out * _SEED_STRIDE + int(key)) % _SEED_MODULUS
    return out


def generator(device, seed: int, *keys: int) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with :func:`derive_seed`.

    Parameters
    ----------
    device : str or torch.device
    seed : int
    *keys : int
        See :func:`derive_seed` (none: ``seed`` itself).

    Returns
    -------
    torch.Generator

    Examples
    --------
    >>> g = generator("cpu", 0, 16)
    >>> g.initial_seed()
    16
    """
    return torch.Generator(device=resolve_device(device)).manual_seed(derive_seed(seed, *keys))
