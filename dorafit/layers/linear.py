"""Adapters for linear maps: nn.Linear (weight (out, in)) and transformers' GPT-2 ``Conv1D``
(weight stored transposed, (in, out), y = x W + b).

    lowrank(x) = (x Aᵀ) Bᵀ            A (r, in), B (out, r)
    cross      = A W0ᵀ  (r, out)      the frozen base applied to A's rows
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as DF
from .base import AdapterLayer


class LinearAdapter(AdapterLayer):
    """LoRA / DoRA on nn.Linear (with or without bias)."""

    def base_weight_2d(self) -> torch.Tensor:
        return self.base.weight

    def lora_a_shape(self) -> Tuple[int, ...]:
        return (self.rank, self.base.in_features)

    def lora_b_shape(self) -> Tuple[int, ...]:
        return (self.base.out_features, self.rank)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight)

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(a.dtype), a), b)  # (..., r) -> (..., out)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        b = self.base.bias if bias else None
        return F.linear(x.float(), weight_2d, None if b is None else b.float())

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.to(self.base.weight.dtype)


class Conv1DAdapter(AdapterLayer):
    """LoRA / DoRA on transformers' ``Conv1D`` (GPT-2 style, weight (in, out), y = x W + b)."""

    def base_weight_2d(self) -> torch.Tensor:
        return self.base.weight.t()  # (out, in) view

    def lora_a_shape(self) -> Tuple[int, ...]:
        return (self.rank, self.base.weight.shape[0])

    def lora_b_shape(self) -> Tuple[int, ...]:
        return (self.base.weight.shape[1], self.rank)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base.weight

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(a.dtype), a), b)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        b = self.base.bias if bias else None
        return F.linear(x.float(), weight_2d, None if b is None else b.float())

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.t().contiguous().to(self.base.weight.dtype)
