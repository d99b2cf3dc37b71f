"""Generative models of galaxy morphology: auto-encoder, VAE with a latent flow prior, WGAN-GP.

Every model is a :class:`GenerativeModel`: built from a JSON-serialisable config,
trained one :class:`Batch` at a time by :class:`galgen.train.Trainer`, and it
produces intrinsic (PSF-free) images that :class:`galgen.physics.Observation` observes.
"""

from .autoencoder import AutoEncoder
from .base import Batch, GenerativeModel, good_pixels, make_optimizer, no_sync
from .networks import Decoder, Encoder, halvings
from .registry import MODEL_KINDS, build_model, model_class
from .prior import LatentFlowPrior
from .vae import VAE
from .wgan import WGANGP, Critic

__all__ = ["AutoEncoder", "VAE", "LatentFlowPrior", "WGANGP", "Critic", "MODEL_KINDS", "build_model", "model_class", "Batch", "GenerativeModel", "Encoder", "Decoder", "good_pixels", "halvings",
           "make_optimizer", "no_sync"]
