"""Adapter for nn.Embedding, in PEFT's layout so that adapters interoperate.

An embedding is the linear map one-hot(token) -> row of W (vocab, dim); as a linear layer its
weight is Wᵀ (dim, vocab). So, as in PEFT:

    A (r, vocab), B (dim, r), ΔWᵀ = s · B A,   lowrank(x) = embed(x, Aᵀ) Bᵀ
    magnitude (dim,): the norm is per embedding dimension, over the vocabulary (a column norm
    of the stored (vocab, dim) weight)
    cross = A W (r, dim)

Dropout on token ids has no meaning; the adapter applies none (as PEFT). A scaled embedding
(``embed_scale``, as Gemma's) multiplies the looked-up rows by a constant; the low-rank path is
scaled alike, so that the merged table W' gives the adapted output (as PEFT does).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer


class EmbeddingAdapter(AdapterLayer):
    """LoRA / DoRA on nn.Embedding."""

    def __init__(self, base: nn.Module, **kwargs) -> None:
        kwargs["dropout"] = 0.0
        super().__init__(base, **kwargs)

    def base_weight_2d(self) -> torch.Tensor:
        return self.base.weight.t()  # (dim, vocab) view

    def lora_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        return (self.rank, self.base.num_embeddings), (self.base.embedding_dim, self.rank)

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        e = self.base
        return F.embedding(x, table, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def _embed_scale(self, out: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.base, "embed_scale", None)
        if scale is None:
            return out
        return out * (scale.to(out.dtype) if torch.is_tensor(scale) else scale)

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._embed_scale(F.linear(self._embed(x, a.t()), b))  # (..., r) -> (..., dim)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return self._embed_scale(self._embed(x, weight_2d.t().float()))

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.t().contiguous().to(self.base.weight.dtype)
