"""dorafit: DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al., ICML 2024) for PyTorch."""

__version__ = "0.1.0"

from .adapters import active_adapter, disable_adapter, list_adapters, set_adapter
from .config import AdapterConfig, ConfigError
from .inject import (
    TrainableReport,
    adapter_modules,
    adapter_state_dict,
    attach,
    delete_adapter,
    detach,
    trainable_report,
)
from .io import AdapterFileError, load_adapter, save_adapter
from .layers import AdapterError, AdapterLayer
from .layers.cache import invalidate_norm_caches
from .hub import push_adapter_to_hub
from .merge import merge, merged_weights, unmerge
from .export import export_lora

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterFileError",
    "AdapterLayer",
    "ConfigError",
    "TrainableReport",
    "active_adapter",
    "adapter_modules",
    "adapter_state_dict",
    "attach",
    "delete_adapter",
    "detach",
    "disable_adapter",
    "export_lora",
    "invalidate_norm_caches",
    "list_adapters",
    "load_adapter",
    "merge",
    "merged_weights",
    "push_adapter_to_hub",
    "save_adapter",
    "set_adapter",
    "trainable_report",
    "unmerge",
]
