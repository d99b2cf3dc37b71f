"""galgen: deep generative models of galaxy morphology in a physical forward model.

Subpackages
-----------
simulate
    GalSim training-set simulator: population catalogs, survey presets, rendering.
data
    The HDF5 cutout format, FITS ingest, PyTorch datasets.
physics
    Differentiable PSF convolution, pixel integration, noise and likelihood.
models
    Auto-encoder, VAE with a latent flow prior, WGAN-GP.
train
    Training loop, checkpoints, data parallelism.

The command-line interface is :mod:`galgen.cli` (``galgen --help``).
"""

from ._version import __version__
from .errors import GalgenInputError, SchemaError, TrainingDiverged
from .pretrained import available_pretrained, load_pretrained

__all__ = ["__version__", "GalgenInputError", "SchemaError", "TrainingDiverged", "available_pretrained",
           "load_pretrained"]
