"""Training: the loop (devices, bf16, logs, validation, exact resume), data parallelism, checkpoints."""

from ..checkpoints import CHECKPOINT_FORMAT, load_checkpoint, load_model, save_checkpoint
from .config import RunConfig, TrainConfig, load_run_config
from .data import TrainingData, epoch_order, split_indices
from .distributed import DistributedContext, average_gradients, init_distributed
from ..errors import TrainingDiverged
from ..runtime import resolve_device
from .run import train
from .trainer import Trainer

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "load_model", "TrainingData",
           "epoch_order", "split_indices", "DistributedContext", "average_gradients", "init_distributed",
           "RunConfig", "TrainConfig", "Trainer", "TrainingDiverged", "load_run_config", "resolve_device",
           "train"]
