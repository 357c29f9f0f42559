"""The training recipe behind ``dorafit train``: config, data, trainer, checkpoints, processes."""

from dorafit.train.config import TrainConfig, TrainConfigError
from dorafit.train.data import DataError
from dorafit.train.hf import AdapterCheckpointCallback
from dorafit.train.trainer import TrainingError, TrainResult, train

__all__ = [
    "AdapterCheckpointCallback",
    "DataError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainingError",
    "train",
]
