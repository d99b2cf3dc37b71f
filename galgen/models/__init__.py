"""Generative models of galaxy morphology: auto-encoder, VAE with a latent flow prior, WGAN-GP and GAN, Sersic.

Every model that inference, sampling and evaluation use follows the latent-model
contract (:class:`LatentModel`: ``latent_dim``, ``decode``, ``prior``, ``encode``).
The trainable ones are :class:`GenerativeModel` s: built from a JSON-serialisable
config, trained one :class:`Batch` at a time by :class:`galgen.train.Trainer`; all
produce intrinsic (PSF-free) images that :class:`galgen.physics.Observation` observes.
"""

from .autoencoder import AutoEncoder
from .base import (Batch, FlatPrior, GenerativeModel, LatentModel, StandardNormal, amortised_guess, encoder_input,
                   good_pixels, make_optimizer, no_sync, sample_latents, standard_normal)
from .networks import Decoder, Encoder, halvings
from .registry import MODEL_KINDS, build_model, model_class
from .prior import CodeMixture, CodeMixturePrior, LatentFlowPrior
from .vae import (VAE, add_bulge_index, add_companion, add_latents, add_symmetry_gate, companion_codes, reseed_bulge_disk,
                  warm_start_companion)
from .wgan import WGANGP, Critic
from .adversarial import AdversarialModel
from .gan import GAN, DetailModulation, FluxShapeGenerator, LatentKnots, PriorDecoder, SNCritic

__all__ = ["LatentModel", "standard_normal", "sample_latents", "amortised_guess", "encoder_input", "StandardNormal", "FlatPrior",
           "AutoEncoder", "VAE", "reseed_bulge_disk", "add_symmetry_gate", "add_latents", "add_companion", "add_bulge_index", "companion_codes", "warm_start_companion", "LatentFlowPrior", "CodeMixturePrior", "CodeMixture", "WGANGP", "Critic", "AdversarialModel", "GAN", "FluxShapeGenerator", "PriorDecoder", "DetailModulation", "LatentKnots", "SNCritic", "MODEL_KINDS", "build_model", "model_class",
           "Batch", "GenerativeModel", "Encoder", "Decoder", "good_pixels", "halvings", "make_optimizer", "no_sync"]
