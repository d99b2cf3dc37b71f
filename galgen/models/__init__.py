"""Generative models of galaxy morphology (so far: encoder, decoder, auto-encoder)."""

from .autoencoder import AutoEncoder
from .networks import Decoder, Encoder, halvings

__all__ = ["AutoEncoder", "Encoder", "Decoder", "halvings"]
