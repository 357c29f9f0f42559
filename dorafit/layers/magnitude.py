"""Magnitude-only adapters: DoRA with the direction frozen, training m alone.

    W' = m ⊙ W0 / ‖W0‖        m (out,) initialised to ‖W0‖ per output feature, so W' = W0

There is no low-rank update, so the norm ‖W0‖ is a constant: it is the ``w0_norm_sq`` buffer
cached when the adapter is attached, and the forward is y = (m / ‖W0‖) ⊙ x W0ᵀ + b. This is the
official DoRA code's option for modules (e.g. the MLP) where only magnitudes are trained; a
``method_pattern`` selects it per module.

The method itself lives in ``AdapterLayer``; the classes here only say that the cached norm
depends on W0 alone (there are no A and B whose version counters could be read).
"""

from __future__ import annotations

from typing import List

import torch

from .conv import ConvAdapter
from .embedding import EmbeddingAdapter
from .linear import Conv1DAdapter, LinearAdapter


class MagnitudeOnly:
    """Mixin (before the layer class): the norm cache depends only on the frozen weight."""

    def norm_dependencies(self) -> List[torch.Tensor]:
        return [self.base_weight_2d()]


class MagnitudeLinearAdapter(MagnitudeOnly, LinearAdapter):
    """Magnitude-only on nn.Linear."""


class MagnitudeConv1DAdapter(MagnitudeOnly, Conv1DAdapter):
    """Magnitude-only on transformers' GPT-2 Conv1D."""


class MagnitudeConvAdapter(MagnitudeOnly, ConvAdapter):
    """Magnitude-only on nn.Conv1d / Conv2d / Conv3d."""


class MagnitudeEmbeddingAdapter(MagnitudeOnly, EmbeddingAdapter):
    """Magnitude-only on nn.Embedding (norm per embedding dimension, as PEFT)."""


# Layer class -> its magnitude-only class (other modules may add entries, e.g. quantized layers).
MAGNITUDE_CLASSES = {
    LinearAdapter: MagnitudeLinearAdapter,
    Conv1DAdapter: MagnitudeConv1DAdapter,
    ConvAdapter: MagnitudeConvAdapter,
    EmbeddingAdapter: MagnitudeEmbeddingAdapter,
}


def build_magnitude_adapter(module, layer_cls: type, config, name: str, **kwargs):
    """METHOD_BUILDERS entry for "magnitude" (classes not listed handle it themselves)."""
    return MAGNITUDE_CLASSES.get(layer_cls, layer_cls)(module, **kwargs)
