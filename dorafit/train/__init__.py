"""The training recipe behind ``dorafit train``: config, data, trainer, checkpoints, processes."""

from dorafit.train.config import TrainConfig, TrainConfigError
from dorafit.train.data import DataError
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


def __getattr__(name: str):
    # AdapterCheckpointCallback subclasses transformers' TrainerCallback, so importing it loads
    # transformers: done on first use, so that `dorafit SUBCOMMAND --help` (which reads
    # dorafit.train.config) and `import dorafit.train` stay free of it.
    if name == "AdapterCheckpointCallback":
        from dorafit.train.hf import AdapterCheckpointCallback

        return AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
