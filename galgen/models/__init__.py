"""Generative models of galaxy morphology (building blocks so far: encoder, decoder)."""

from .networks import Decoder, Encoder, halvings

__all__ = ["Encoder", "Decoder", "halvings"]
