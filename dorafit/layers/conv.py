"""Adapters for nn.Conv1d / Conv2d / Conv3d (groups = 1).

W0 (out, in, *k) is viewed as (out, in·k). A is a convolution with the base's kernel size,
stride, padding, dilation and padding mode, weight (r, in, *k); B is a 1×1 convolution,
weight (out, r, 1, ...). Then ΔW = B ∘ A = (B_flat A_flat) reshaped to W0's shape, and the
norm is per output channel over all other axes.

    cross = A_flat W0_flatᵀ (r, out)
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterError, AdapterLayer

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvAdapter(AdapterLayer):
    """LoRA / DoRA on an N-d convolution."""

    # ReLU(inplace=True) right after a conv is common: keep z + BAx rather than the output.
    always_keep_sum = True

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if base.groups != 1:
            raise AdapterError(
                f"{type(base).__name__} with groups={base.groups}: adapters on grouped convolutions are not "
                "supported (only groups=1)"
            )
        if getattr(base, "transposed", False):
            raise AdapterError(f"{type(base).__name__}: transposed convolutions are not supported")
        super().__init__(base, **kwargs)

    @property
    def spatial_dims(self) -> int:
        return self.base.weight.dim() - 2

    def output_axis(self, ndim: int) -> int:
        # (N, C, *spatial) or unbatched (C, *spatial)
        return ndim - self.spatial_dims - 1

    def base_weight_2d(self) -> torch.Tensor:
        return self.base.weight.flatten(1)

    def lora_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        a_shape = (self.rank, self.base.in_channels, *self.base.kernel_size)
        return a_shape, (self.base.out_channels, self.rank) + (1,) * self.spatial_dims

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, self.base.weight, None)

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # A shares the base's stride/padding/dilation (and padding mode) so that B ∘ A merges.
        h = self.base._conv_forward(x.to(a.dtype), a, None)
        return _CONV_FN[self.spatial_dims](h, b)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        b = self.base.bias if bias else None
        w = weight_2d.reshape(self.base.weight.shape)
        return self.base._conv_forward(x.float(), w, None if b is None else b.float())

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.reshape(self.base.weight.shape).to(self.base.weight.dtype)
