"""Generative models of galaxy morphology: auto-encoder, VAE with a latent flow prior, WGAN-GP.

Every model is a :class:`GenerativeModel`: built from a JSON-serialisable config,
trained one :class:`Batch` at a time by :class:`galgen.train.Trainer`, and it
produces intrinsic (PSF-free) images that :class:`galgen.physics.Observation` observes.
"""

from .autoencoder import AutoEncoder
from .base import Batch, GenerativeModel, good_pixels, make_optimizer, no_sync
from .networks import Decoder, Encoder, halvings

__all__ = ["AutoEncoder", "Batch", "GenerativeModel", "Encoder", "Decoder", "good_pixels", "halvings",
           "make_optimizer", "no_sync"]
