"""dorafit: DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al., ICML 2024) for PyTorch."""

__version__ = "0.1.0"

from .config import AdapterConfig, ConfigError
from .inject import (
    TrainableReport,
    adapter_modules,
    adapter_state_dict,
    attach,
    detach,
    trainable_report,
)
from .io import AdapterFileError, load_adapter, save_adapter
from .layers import AdapterError, AdapterLayer
from .layers.base import invalidate_norm_caches
from .merge import merge, merged_weights

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterFileError",
    "AdapterLayer",
    "ConfigError",
    "TrainableReport",
    "adapter_modules",
    "adapter_state_dict",
    "attach",
    "detach",
    "invalidate_norm_caches",
    "load_adapter",
    "merge",
    "merged_weights",
    "save_adapter",
    "trainable_report",
]
