"""Exceptions raised by galgen.

Every error that a user can cause by giving bad input derives from
:class:`GalgenInputError`, itself a :class:`ValueError`, and its message names the
file or argument concerned and what is wrong with it.
"""

__all__ = ["GalgenInputError", "SchemaError", "TrainingDiverged"]


class GalgenInputError(ValueError):
    """Bad input given to galgen: a file, an argument or a configuration value.

    The message always names the offending file or argument.
    """


class SchemaError(GalgenInputError):
    """An HDF5 file is not a galgen cutout file of a schema version this galgen reads."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""
