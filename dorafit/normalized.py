"""Pre-normalized DoRA (TensorRT-LLM's convention): the magnitude key holds g, not m.

With the norm computed offline against the base, a DoRA layer is LoRA's kernels plus one
per-row scale:

    y = g ⊙ (W0 x + s B A x) + b,    g = m / ‖W0 + s B A‖   per output feature, (out,) float32

TensorRT-LLM's DoRA plugin serves exactly this (its ``examples/dora/normalize_weights.py``
rewrites a PEFT adapter's ``lora_magnitude_vector`` into g using the base weights). Such a folder
is PEFT's layout plus a ``dora_normalized`` record in adapter_config.json: the convention, the
sha256 of the base weights g was computed against (``base_weights_hash``: the adapted modules'
names, dtypes, shapes and bytes) and their dtype. g is exact only on those weights.

The norm here is computed directly, the sum W0 + s B A materialised in row blocks in float64
(``direct_weight_norm``), for writing g and for rebuilding m = g ⊙ ‖W0 + s B A‖ when a folder is
loaded: the round trip then returns m up to float32 rounding.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .adapter_files import CONFIG_NAME, AdapterFileError, weights_sha256
from .inject import adapter_modules

NORMALIZED_KEY = "dora_normalized"
NORMALIZED_CONVENTION = "g = m / ||W0 + s B A|| per output feature"


def direct_weight_norm(adapter) -> torch.Tensor:
    """‖W0 + s B A‖ per output feature, (out,) float64, from W0 as the base holds it (row blocks of
    the materialised sum in float64): the reference the factored norm approximates, and what an
    engine's offline normalization computes."""
    w0 = adapter.base_weight_2d().detach()
    a, b = adapter.lowrank_factors()
    a_2d = a.detach().reshape(a.shape[0], -1).double()
    b_2d = b.detach().reshape(b.shape[0], -1).double()
    norms = []
    for start in range(0, w0.shape[0], 1024):  # (rows, in_flat) float64 at a time
        rows = w0[start:start + 1024].double() + adapter.scaling * (b_2d[start:start + 1024] @ a_2d)
        norms.append(rows.norm(dim=1))
    return torch.cat(norms).clamp_min(1e-12)


def normalized_scale(adapter) -> torch.Tensor:
    """g = m / ‖W0 + s B A‖ per output feature, (out,) float32 (``direct_weight_norm``)."""
    return (adapter.magnitude.detach().double() / direct_weight_norm(adapter)).float()


def normalized_record(cfg: Dict[str, Any], source: Path) -> Optional[Dict[str, Any]]:
    """The ``dora_normalized`` record of a PEFT config, checked; None for an ordinary adapter."""
    record = cfg.get(NORMALIZED_KEY)
    if record is None:
        return None
    where = source / CONFIG_NAME
    if not isinstance(record, dict) or not isinstance(record.get("base_weights_sha256"), str):
        raise AdapterFileError(f"{where}: {NORMALIZED_KEY!r} must be an object with the base weights' "
                              "\"base_weights_sha256\"")
    if not cfg.get("use_dora"):
        raise AdapterFileError(f"{where}: {NORMALIZED_KEY!r} is set but use_dora is not: only DoRA has a magnitude to normalize")
    return record


def base_weights_hash(model: nn.Module, names: List[str]) -> str:
    """sha256 of the base weights of modules ``names`` (as stored: dtype and bytes), the hash a
    pre-normalized DoRA adapter records; adapted modules count by their frozen base."""
    weights = {}
    for name in names:
        module = model.get_submodule(name)
        module = getattr(module, "base", module)
        weights[name] = module.weight
    return weights_sha256(weights)


def check_normalized_base(model: nn.Module, record: Dict[str, Any], names: List[str], source: Path,
                           allow_mismatch: bool) -> None:
    got = base_weights_hash(model, names)
    want = record["base_weights_sha256"]
    if got == want:
        return
    dtypes = sorted({str(getattr(model.get_submodule(n), "weight").dtype).replace("torch.", "") for n in names})
    message = (f"{source} is pre-normalized DoRA (g = m / ||W0 + s B A|| computed against base weights with sha256 "
               f"{want[:12]}..., {record.get('base_weights_dtype', '?')}); this base's weights hash to {got[:12]}... "
               f"({'/'.join(dtypes)}), so g does not fit it")
    if not allow_mismatch:
        raise AdapterFileError(message + ": load it onto the base it was normalized against, or pass "
                                        "allow_base_mismatch=True to serve g on this base as an engine would")
    warnings.warn(message + "; the magnitude is rebuilt for this base, so the model computes what an engine serving "
                            "the folder on this base computes, not the fine-tune", UserWarning, stacklevel=4)


def rebuild_magnitudes(model: nn.Module) -> None:
    """Turn the g an adapter's magnitudes hold (just loaded from a pre-normalized folder) into
    m = g ⊙ ‖W0 + s B A‖ on this model's base (in place, no autograd)."""
    with torch.no_grad():
        for _, adapter in adapter_modules(model):
            if adapter.magnitude is not None:
                m = adapter.magnitude.double() * direct_weight_norm(adapter)
                adapter.magnitude.copy_(m.to(adapter.magnitude.dtype))
