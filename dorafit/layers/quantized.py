"""Adapters on a bitsandbytes 4-bit base (QDoRA), and the dispatch entries for its layers.

The model-level side (quantizing a model's layers, loading a 4-bit checkpoint) lives in
``dorafit.quant``, which re-exports everything here; this module is what ``dorafit.inject``'s
dispatch table needs, so that it does not import the model surgery built on top of it.
bitsandbytes is imported lazily.

bitsandbytes 0.49+ repacks a CPU layer's 4-bit weight the first time the layer runs in eval mode
on an input that needs no gradient (on CPUs with AVX512-BF16): ``weight.data`` then holds another
byte layout, the block scales drop to bf16, and every later forward, in training mode too, goes
through an inference-only bf16 kernel that has no backward. ``dequantize_4bit`` on the repacked
bytes gives a wrong matrix, and gradients through the layer are silently dropped. So the layers
of an adapted model are put back into bnb's standard layout and kept there (see
``keep_4bit_layers_trainable``), and ``dequantize_weight`` reads either layout.
"""

from __future__ import annotations

import copy
import logging
from typing import Dict, List, Type

import torch
from torch import nn

from .base import AdapterError, AdapterLayer
from .linear import LinearAdapter
from .vera import VERA_CLASSES, VeraMixin

logger = logging.getLogger("dorafit")


class QuantizationError(ValueError):
    """A model or module that cannot be quantized or adapted as asked."""


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QuantizationError(
            "4-bit bases need the bitsandbytes package (pip install 'bitsandbytes>=0.45'); "
            f"importing it failed: {exc}"
        ) from None
    return bitsandbytes


def is_quantized_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (checked without importing bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and getattr(weight, "quant_state", None) is not None


def is_packed_for_cpu_inference(module: nn.Module) -> bool:
    """True when bitsandbytes has repacked the layer's weight for its CPU inference kernel."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack_cpu_inference_layout(data: torch.Tensor, state):
    """(codes, quant_state) in bnb's standard layout, from the CPU-inference repacking."""
    unpack = getattr(_bitsandbytes().functional, "_convert_weight_packed_for_cpu_inverse", None)
    if unpack is None:  # pragma: no cover - a bitsandbytes that repacks but cannot undo it
        raise QuantizationError(
            "this 4-bit layer's weight was repacked for bitsandbytes' CPU inference kernel and this "
            "bitsandbytes version offers no way back; quantize the layer again before adapting it"
        )
    return unpack(data, state)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a 4-bit layer stands for, in its original dtype (a new tensor).

    Reads a weight repacked for bnb's CPU inference kernel too, without changing the layer.
    """
    bnb = _bitsandbytes()
    weight = module.weight
    if getattr(weight, "quant_state", None) is None:
        raise QuantizationError(f"{type(module).__name__} has no quantized weight (quant_state is missing)")
    data, state = weight.data, weight.quant_state
    if is_packed_for_cpu_inference(module):
        # The undo rewrites the state's fields: give it a shallow copy so the layer stays as it is.
        data, state = _unpack_cpu_inference_layout(data, copy.copy(state))
    return bnb.functional.dequantize_4bit(data, state)


# bitsandbytes' per-layer switch for the CPU repacking; dorafit keeps the user's value here while
# an adapter model is attached, so that ``detach`` gives it back.
_REPACK_FLAG = "support_avx512bf16_for_cpu"
_SAVED_REPACK_FLAG = "_dorafit_saved_cpu_repack"


def keep_4bit_layers_trainable(model: nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` (adapted or frozen) in bnb's trainable layout.

    A layer bitsandbytes already repacked for CPU inference is unpacked (its block scales stay
    the bf16-rounded ones the repacking left, so W0 is what the layer has been computing), and
    the repacking is switched off: gradients must flow through frozen 4-bit layers to the
    adapters before them, and the norm's cross term needs the trainable kernel.
    """
    for module in model.modules():
        if not is_quantized_4bit(module):
            continue
        if is_packed_for_cpu_inference(module):
            weight = module.weight
            weight.data, weight.quant_state = _unpack_cpu_inference_layout(weight.data, weight.quant_state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state
        if hasattr(module, _REPACK_FLAG) and not hasattr(module, _SAVED_REPACK_FLAG):
            setattr(module, _SAVED_REPACK_FLAG, getattr(module, _REPACK_FLAG))
            setattr(module, _REPACK_FLAG, False)


def release_4bit_layers(model: nn.Module) -> None:
    """Undo ``keep_4bit_layers_trainable``'s switch: bnb may repack the layers for inference again."""
    for module in model.modules():
        if hasattr(module, _SAVED_REPACK_FLAG):
            setattr(module, _REPACK_FLAG, getattr(module, _SAVED_REPACK_FLAG))
            delattr(module, _SAVED_REPACK_FLAG)


# ------------------------------------------------------------------------------------------------
# Adapters on a 4-bit base


class Linear4bitAdapter(LinearAdapter):
    """LoRA / DoRA / magnitude-only on ``bitsandbytes.nn.Linear4bit`` (QDoRA).

    Only the layout hooks differ from ``LinearAdapter``: W0 is reached through the quantized
    layer itself (cross term, dropout path) and dequantized only at attach, merge and in the
    reference path of the tests.
    """

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if not is_quantized_4bit(base):
            raise AdapterError(
                f"{type(base).__name__}: the 4-bit weight is not quantized yet (move the layer to a device, "
                "e.g. .to('cpu') or .cuda(), before attaching)"
            )
        keep_4bit_layers_trainable(base)  # before ‖W0‖² is read; attach does the whole model
        super().__init__(base, **kwargs)

    def base_weight_2d(self) -> torch.Tensor:
        # Materialised (dequantized) copy: attach (‖W0‖² once), merge and reference tests only.
        return dequantize_weight(self.base)

    def base_dtype(self) -> torch.dtype:
        return self.base.weight.quant_state.dtype

    def compute_dtype(self) -> torch.dtype:
        return getattr(self.base, "compute_dtype", None) or self.base_dtype()

    def norm_inputs(self) -> List[torch.Tensor]:
        # The packed weight's version counter stands for W0: never dequantize to build the key.
        return [t for t in (self.lora_a, self.lora_b, self.base.weight) if t is not None]

    def _without_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias
        return out if bias is None else out - bias.to(out.dtype)

    def cross_term(self, a_2d: torch.Tensor) -> torch.Tensor:
        """C = A W0ᵀ (r, out), float32: the 4-bit layer applied to A's r rows, minus its bias."""
        return self._without_bias(self.base(a_2d.to(self.compute_dtype()))).to(torch.float32)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return self._without_bias(self.base(x))

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.to(self.base_dtype())

    def write_merged(self, merged_2d: torch.Tensor) -> nn.Module:
        """A plain nn.Linear with the dequantized merged weight: the 4-bit storage is gone."""
        out_features, in_features = merged_2d.shape
        dtype = self.base_dtype()
        plain = nn.Linear(in_features, out_features, bias=self.base.bias is not None, device="meta")
        plain.weight = nn.Parameter(merged_2d.to(dtype), requires_grad=False)
        if self.base.bias is not None:
            plain.bias = nn.Parameter(self.base.bias.detach().to(dtype).clone(), requires_grad=False)
        # dorafit.merge warns once for the whole model; one line per layer goes to the log only.
        logger.debug("merged 4-bit layer (out, in) = (%d, %d) into a dequantized nn.Linear of dtype %s",
                     out_features, in_features, dtype)
        return plain


class VeraLinear4bitAdapter(VeraMixin, Linear4bitAdapter):
    """VeRA / DVoRA on a 4-bit base (QDVoRA)."""


VERA_CLASSES[Linear4bitAdapter] = VeraLinear4bitAdapter


class Linear8bitUnsupported(LinearAdapter):
    """bitsandbytes' 8-bit layers subclass nn.Linear too: refuse them instead of adapting int8 codes."""

    def __init__(self, base: nn.Module, **kwargs) -> None:
        raise AdapterError(
            f"{type(base).__name__} (8-bit bitsandbytes) bases are not supported; load the model in 4-bit "
            "(bnb_4bit_quant_type='nf4') or in full precision"
        )


def quantized_adapter_types() -> Dict[Type[nn.Module], Type[AdapterLayer]]:
    """Dispatch entries for bitsandbytes' layers (used by ``dorafit.inject.adapter_types``)."""
    bnb = _bitsandbytes()
    table: Dict[Type[nn.Module], Type[AdapterLayer]] = {bnb.nn.Linear4bit: Linear4bitAdapter}
    for name in ("Linear8bitLt", "Linear8bit"):
        if hasattr(bnb.nn, name):
            table[getattr(bnb.nn, name)] = Linear8bitUnsupported
    return table
