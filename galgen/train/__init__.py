"""Training infrastructure (so far: safe checkpoints)."""

from .checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint"]
