"""galgen: deep generative models of galaxy morphology in a physical forward model.

Subpackages
-----------
simulate
    GalSim training-set simulator: population catalogs, survey presets, rendering.
data
    The HDF5 cutout format, FITS ingest, PyTorch datasets.

The command-line interface is :mod:`galgen.cli` (``galgen --help``).
"""

from ._version import __version__
from .errors import GalgenInputError, SchemaError

__all__ = ["__version__", "GalgenInputError", "SchemaError"]
