"""Checkpoints (moved to :mod:`galgen.checkpoints`, which every stage reads; these names stay importable here)."""

from ..checkpoints import CHECKPOINT_FORMAT, load_checkpoint, load_model, save_checkpoint

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "load_model"]
