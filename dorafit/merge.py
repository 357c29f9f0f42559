"""Merge adapters into plain modules for serving.

    LoRA:  W = W0 + s B A           DoRA:  W = g ⊙ (W0 + s B A),  g = m / ‖W0 + s B A‖

rows scaled per output feature, bias unchanged. The result is made of the original module
classes (nn.Linear, Conv1D, ...), so ``save_pretrained`` after a merge writes a checkpoint that
loads without dorafit. Merging a model without adapters changes nothing (idempotent). Merging
4-bit layers dequantizes them; ``merge`` says so in one warning for the whole model.
"""

from __future__ import annotations

import warnings
from typing import Dict

import torch
from torch import nn

from .inject import CONFIG_ATTR, REQUIRES_GRAD_ATTR, ModulesToSave, _set_submodule, adapter_modules


def merged_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{"<module>.weight": merged weight in the base layout and dtype}, leaving the model as is."""
    with torch.no_grad():
        return {f"{name}.weight": a.weight_from_2d(a.merged_weight_2d()) for name, a in adapter_modules(model)}


def _untie_shared_weights(model: nn.Module) -> None:
    """A merged weight that was shared (an output head tied to the embedding) is untied.

    The adapted model used the merged table in one place and the original in the other, so the
    merged model keeps both; a transformers config is told not to tie them again at load.
    """
    adapted = {id(a.base.weight) for _, a in adapter_modules(model)}
    users: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    if not any(users.get(i, 0) > 1 for i in adapted):
        return
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        text_config = getattr(config, "get_text_config", None)
        if callable(text_config) and text_config() is not config:
            text_config().tie_word_embeddings = False
    warnings.warn(
        "dorafit.merge: an adapted weight was shared with another module (tied embeddings); the merged "
        "model keeps the two apart" + (" and its config now says tie_word_embeddings=False" if config is not None else ""),
        stacklevel=3,
    )


def _warn_dequantized(model: nn.Module) -> None:
    """One warning for all 4-bit layers of a merge (a 30-layer model would otherwise print 200)."""
    states = [getattr(getattr(a.base, "weight", None), "quant_state", None) for _, a in adapter_modules(model)]
    states = [q for q in states if q is not None]
    if not states:
        return
    dtypes = ", ".join(sorted({str(q.dtype) for q in states}))
    warnings.warn(
        f"dorafit.merge: {len(states)} layers in 4-bit (bitsandbytes Linear4bit) were merged into dequantized "
        f"nn.Linear layers of dtype {dtypes}; the merged model is no longer quantized",
        UserWarning, stacklevel=3,
    )


def merge(model: nn.Module) -> nn.Module:
    """Replace every adapter by its base module carrying the merged weight; returns the model.

    modules_to_save copies replace their originals. Calling it again is a no-op.
    """
    _untie_shared_weights(model)
    _warn_dequantized(model)
    with torch.no_grad():
        for name, adapter in adapter_modules(model):
            _set_submodule(model, name, adapter.to_plain_module())
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        for p in module.trainable.parameters():
            p.requires_grad_(False)
        _set_submodule(model, name, module.trainable)
    for attr in (CONFIG_ATTR, REQUIRES_GRAD_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
