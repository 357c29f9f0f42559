"""One adapter class per layer type; see ``dorafit.inject`` for the dispatch table."""

from .base import AdapterError, AdapterLayer
from .conv import ConvAdapter
from .embedding import EmbeddingAdapter
from .linear import Conv1DAdapter, LinearAdapter
from .vera import VeraConv1DAdapter, VeraLinearAdapter, VeraShared

__all__ = [
    "AdapterError",
    "AdapterLayer",
    "ConvAdapter",
    "EmbeddingAdapter",
    "Conv1DAdapter",
    "LinearAdapter",
    "VeraConv1DAdapter",
    "VeraLinearAdapter",
    "VeraShared",
]
