"""YAML configurations validated into dataclasses, with errors that name the file and key.

Every stage that reads a YAML file (``galgen run``, ``galgen train``) goes through
:func:`read_yaml` (``yaml.safe_load``, never arbitrary objects) and
:func:`build_dataclass` (unknown keys, wrong types and malformed sections are errors).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .errors import GalgenInputError

__all__ = ["read_yaml", "build_dataclass"]


def read_yaml(path) -> dict:
    """Read a YAML mapping safely.

    Parameters
    ----------
    path : str or os.PathLike
        YAML file.

    Returns
    -------
    dict
        The mapping (empty for an empty file).

    Raises
    ------
    GalgenInputError
        If the file is missing, not YAML, or not a mapping.
    """
    path = Path(path)
    if not path.exists():
        raise GalgenInputError(f"{path}: no such configuration file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GalgenInputError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GalgenInputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _check_type(value, tp, where):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return value
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float:
        raise GalgenInputError(f"{where}: expected a number, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise GalgenInputError(f"{where}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise GalgenInputError(f"{where}: expected true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise GalgenInputError(f"{where}: expected a string, got {value!r}")
    if (tp is dict or origin is dict) and not isinstance(value, dict):
        raise GalgenInputError(f"{where}: expected a mapping, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise GalgenInputError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        if item is not typing.Any:
            value = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(value)
    return value


def build_dataclass(cls, data, where: str):
    """Validate a mapping into a (possibly nested) dataclass.

    Parameters
    ----------
    cls : type
        A dataclass whose fields have type hints (int, float, bool, str, dict,
        ``tuple[str, ...]``, Optional, nested dataclasses, optional ones and tuples of them).
    data : dict or None
        The values (None means all defaults).
    where : str
        Where the values came from (file name), used in error messages.

    Returns
    -------
    object
        An instance of ``cls``.

    Raises
    ------
    GalgenInputError
        Unknown keys or values of the wrong type, naming ``where`` and the key.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     n: int = 1
    >>> build_dataclass(C, {"n": 3}, "c.yaml")
    C(n=3)
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GalgenInputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise GalgenInputError(f"{where}: unknown key(s) {unknown}; allowed {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _check_type(data[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kwargs)
