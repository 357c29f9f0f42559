"""Serving exports of an adapter: a plain LoRA, and pre-normalized DoRA.

**LoRA export.** Serving engines (vLLM, SGLang, TGI, LoRAX, llama.cpp) read LoRA's A and B but no
magnitude. The DoRA update of a layer, ΔW = W' − W0 with W' = g ⊙ (W0 + s B A), is not of rank r
(the row scaling g touches every row of W0), so it is approximated by its truncated SVD:

    ΔW = U Σ Vᵀ  (out, in_flat)      B_lora = U[:, :R] Σ[:R]  (out, R)     A_lora = Vᵀ[:R]  (R, in_flat)

so W0 + B_lora A_lora is the best rank-R approximation of W' (Eckart–Young). Reported per layer
and overall:

    weight error  ‖ΔW − B_lora A_lora‖_F / ‖ΔW‖_F = sqrt(Σ_{k>R} σ_k²) / sqrt(Σ_k σ_k²)
                  (the share of the fine-tune's weight update that is lost; overall: sums over layers)
    logits drift  ‖L_lora − L_dora‖_F / ‖L_dora‖_F  on the given inputs, and the same difference
                  relative to the fine-tune's own change ‖L_dora − L_base‖_F

With ``max_error`` the smallest R whose overall weight error is at most that is chosen. A
layer's own rank is capped at min(out, in_flat) (there its error is 0 up to float error).

One scale for every reader: the file is a PEFT LoRA adapter in which every layer has the same
rank R (a layer capped below R gets zero rows in A and zero columns in B) and lora_alpha = R, no
rank_pattern or alpha_pattern, so s = alpha / r = 1 whether a reader takes r per layer (PEFT,
llama.cpp's converter) or once for the file (vLLM); the singular values are folded into B.
Merging (``dorafit.merge``) stays the exact path; this one trades exactness for serving many
adapters over one base.

**Pre-normalized DoRA** (TensorRT-LLM's convention): with the norm computed offline against
the base, DoRA's output is y = g ⊙ (W0 x + s B A x) + b, g = m / ‖W0 + s B A‖ per output
feature: LoRA kernels plus one per-row scale. ``export_dora_normalized`` writes PEFT's layout
with g (float32) in the magnitude's place and a ``dora_normalized`` record in the config (the
convention, the sha256 of the base weights g was computed against, their dtype); g is exact
only on those weights. ``dorafit.load_adapter`` rebuilds m = g ⊙ ‖W0 + s B A‖ from such a folder.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .adapters import active_adapter, disable_adapter, set_adapter
from .config import AdapterConfig
from .inject import CONFIG_ATTR, ModulesToSave, adapter_modules, attach, delete_adapter
from .layers import AdapterError

_EXPORT_NAME = "lora-export"


@dataclass
class LayerSpectrum:
    """The SVD of one layer's update ΔW = W' − W0, (out, in_flat), float64."""

    u: torch.Tensor  # (out, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, in_flat)
    weight_norm: float  # ‖W'‖_F

    def tail(self, rank: int) -> float:
        """‖ΔW − (rank-R truncation)‖_F = sqrt(Σ_{k>R} σ_k²)."""
        return float(self.s[rank:].pow(2).sum().sqrt())

    @property
    def update_norm(self) -> float:
        return float(self.s.pow(2).sum().sqrt())


@dataclass
class ExportReport:
    """What ``export_lora`` wrote and how close it is."""

    rank: int
    path: Optional[Path] = None
    layer_errors: Dict[str, float] = field(default_factory=dict)  # ‖ΔW − BA‖ / ‖ΔW‖ per layer
    layer_ranks: Dict[str, int] = field(default_factory=dict)
    weight_error: float = 0.0  # overall, over all layers
    logits_drift: Optional[float] = None  # ‖L_lora − L_dora‖ / ‖L_dora‖
    drift_of_change: Optional[float] = None  # ‖L_lora − L_dora‖ / ‖L_dora − L_base‖

    def __str__(self) -> str:
        lines = [f"{'layer':<60} {'rank':>5} {'weight error':>13}"]
        for name, err in self.layer_errors.items():
            lines.append(f"{name:<60} {self.layer_ranks[name]:>5} {100 * err:>12.3f}%")
        lines.append(f"overall weight error (share of ‖ΔW‖ lost)   {100 * self.weight_error:.3f}%  at rank {self.rank}")
        if self.logits_drift is not None:
            lines.append(f"logits drift ‖L_lora − L_dora‖ / ‖L_dora‖   {100 * self.logits_drift:.3f}%")
        if self.drift_of_change is not None:
            lines.append(f"  relative to the fine-tune's change          {100 * self.drift_of_change:.3f}%")
        return "\n".join(lines)


def update_spectra(model: nn.Module) -> Dict[str, LayerSpectrum]:
    """{module: SVD of W' − W0} for every layer of the active adapter (float64)."""
    spectra = {}
    with torch.no_grad():
        for name, adapter in adapter_modules(model):
            w0 = adapter.base_weight_2d().double()
            w = adapter.merged_weight_2d().double()
            u, s, vh = torch.linalg.svd(w - w0, full_matrices=False)
            spectra[name] = LayerSpectrum(u, s, vh, float(torch.linalg.matrix_norm(w)))
    return spectra


def overall_error(spectra: Dict[str, LayerSpectrum], rank: int) -> float:
    """sqrt(Σ_layers tail²) / sqrt(Σ_layers ‖ΔW‖²) at one rank for all layers."""
    total = sum(sp.update_norm ** 2 for sp in spectra.values())
    lost = sum(sp.tail(rank) ** 2 for sp in spectra.values())
    return math.sqrt(lost / total) if total > 0 else 0.0


def choose_rank(spectra: Dict[str, LayerSpectrum], max_error: float) -> int:
    """The smallest rank whose overall weight error is at most ``max_error``."""
    if not 0 <= max_error < 1:
        raise ValueError(f"max_error must be in [0, 1) (a share of ‖ΔW‖, e.g. 0.05), got {max_error}")
    full = max(len(sp.s) for sp in spectra.values())
    for rank in range(1, full + 1):
        if overall_error(spectra, rank) <= max_error:
            return rank
    return full


def _output_tensor(out) -> torch.Tensor:
    """The logits of a model output (or its last hidden state for a model without a head)."""
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if t is not None:
            return t
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def model_outputs(model: nn.Module, inputs: Sequence) -> List[torch.Tensor]:
    """The model's output tensor (float32) on every input (a dict of keyword arguments or a tensor)."""
    outs = []
    with torch.no_grad():
        for batch in inputs:
            out = model(**batch) if isinstance(batch, dict) else model(batch)
            outs.append(_output_tensor(out).detach().float())
    return outs


def _distance(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    """‖a − b‖_F over all tensors."""
    return math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)))


def _norm(a: List[torch.Tensor]) -> float:
    return math.sqrt(sum(float(x.pow(2).sum()) for x in a))


def export_lora(
    model: nn.Module,
    path: Optional[Union[str, os.PathLike]] = None,
    rank: Optional[int] = None,
    max_error: Optional[float] = None,
    inputs: Optional[Sequence] = None,
    format: str = "peft",
) -> ExportReport:
    """Approximate the model's active DoRA (or any) adapter by a plain rank-``rank`` LoRA.

    Writes the LoRA adapter to ``path`` (when given): a PEFT folder (``format="peft"``) or a
    llama.cpp LoRA file (``format="gguf"``, a llama-family base; ``dorafit.gguf_export``), with one
    rank and one scale for all layers; returns the report. Give ``rank`` or ``max_error`` (then
    the smallest rank within it is used). ``inputs``: a few model inputs (dicts of keyword
    arguments or tensors) on which the logits drift is measured. The model is left as it was
    (the LoRA is built as a temporary named adapter and deleted).
    """
    if format not in ("peft", "gguf"):
        raise ValueError(f"format must be 'peft' or 'gguf', got {format!r}")
    if active_adapter(model) is None or not adapter_modules(model):
        raise AdapterError("the model has no active dorafit adapter to export")
    if (rank is None) == (max_error is None):
        raise ValueError("give exactly one of rank and max_error")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    spectra = update_spectra(model)
    if max_error is not None:
        rank = choose_rank(spectra, max_error)
    report = ExportReport(rank=rank)
    for name, sp in spectra.items():
        layer_rank = min(rank, len(sp.s))
        report.layer_ranks[name] = layer_rank
        report.layer_errors[name] = sp.tail(layer_rank) / sp.update_norm if sp.update_norm > 0 else 0.0
    report.weight_error = overall_error(spectra, rank)

    source = active_adapter(model)
    source_config: AdapterConfig = getattr(model, CONFIG_ATTR)
    if inputs is not None:
        tuned = model_outputs(model, inputs)
        with disable_adapter(model):
            base = model_outputs(model, inputs)
    saves = {n: m.trainable.state_dict() for n, m in model.named_modules() if isinstance(m, ModulesToSave)}
    exact = {n: "^" + re.escape(n) + "$" for n in spectra}
    lora_config = AdapterConfig(
        method="lora",
        rank=rank,
        alpha=float(rank),
        targets=list(exact.values()),
        rank_pattern={exact[n]: r for n, r in report.layer_ranks.items() if r != rank},
        alpha_pattern={exact[n]: float(r) for n, r in report.layer_ranks.items() if r != rank},
        modules_to_save=[exact[n] for n in saves],
        dropout=source_config.dropout,
    )
    attach(model, lora_config, name=_EXPORT_NAME)
    try:
        set_adapter(model, _EXPORT_NAME)
        with torch.no_grad():
            for name, adapter in adapter_modules(model):
                sp, r = spectra[name], report.layer_ranks[name]
                b = (sp.u[:, :r] * sp.s[:r]).reshape(adapter.lora_b.shape)  # (out, R) scaled by Σ
                a = sp.vh[:r].reshape(adapter.lora_a.shape)  # (R, in...)
                adapter.lora_a.copy_(a.to(adapter.lora_a.dtype))
                adapter.lora_b.copy_(b.to(adapter.lora_b.dtype))
            for n, m in model.named_modules():
                if isinstance(m, ModulesToSave):
                    m.trainable.load_state_dict(saves[n])
        if inputs is not None:
            exported = model_outputs(model, inputs)
            lost = _distance(exported, tuned)
            report.logits_drift = lost / _norm(tuned) if _norm(tuned) > 0 else 0.0
            change = _distance(tuned, base)
            report.drift_of_change = lost / change if change > 0 else 0.0
        if path is not None:
            report.path = write_lora_export(model, path, format)
    finally:
        set_adapter(model, source)
        delete_adapter(model, _EXPORT_NAME)
    return report


def uniform_rank_lora(model: nn.Module):
    """(PEFT config, state) of the model's active LoRA adapter with one rank and one scale for all
    layers: every layer padded to the largest rank R with zero rows of A and zero columns of B, its
    own scaling s folded into B, r = lora_alpha = R (so every reader's alpha / r is 1)."""
    from .interop import PREFIX, peft_config_and_state

    cfg, state = peft_config_and_state(model)
    adapters = dict(adapter_modules(model))
    if any(a.method != "lora" for a in adapters.values()):
        raise AdapterError("uniform_rank_lora needs a LoRA adapter (export a DoRA adapter with export_lora)")
    rank = max(a.rank for a in adapters.values())
    for name, adapter in adapters.items():
        keys = {k[len(PREFIX) + len(name) + 1:]: k for k in state if k.startswith(f"{PREFIX}{name}.")}
        a_key = keys.get("lora_A.weight") or keys["lora_embedding_A"]
        b_key = keys.get("lora_B.weight") or keys["lora_embedding_B"]
        a, b = state[a_key], state[b_key] * adapter.scaling  # (r, in...), (out, r...)
        pad = rank - adapter.rank
        state[a_key] = torch.cat([a, a.new_zeros((pad,) + tuple(a.shape[1:]))], dim=0).contiguous()
        state[b_key] = torch.cat([b, b.new_zeros((b.shape[0], pad) + tuple(b.shape[2:]))], dim=1).contiguous()
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return cfg, state


def write_lora_export(model: nn.Module, path: Union[str, os.PathLike], format: str = "peft") -> Path:
    """Write the model's active LoRA adapter with one global scale (``uniform_rank_lora``) as a
    PEFT folder or (``format="gguf"``) a llama.cpp LoRA file; returns the path."""
    from . import __version__
    from .adapter_files import WRITER, WRITER_KEY, write_adapter_pair

    cfg, state = uniform_rank_lora(model)
    if format == "gguf":
        from .gguf_export import write_lora_gguf

        return write_lora_gguf(model, cfg, state, path)
    return write_adapter_pair(Path(path), cfg, state, {"format": "pt", WRITER_KEY: WRITER, "dorafit_version": __version__},
                              sort_keys=True)


# ------------------------------------------------------------------------------------------------
# Pre-normalized DoRA
def dora_normalized_contents(model: nn.Module):
    """(PEFT config with the ``dora_normalized`` record, state with g in each magnitude's place)
    of the model's active DoRA adapter."""
    from .interop import PREFIX, peft_config_and_state
    from .normalized import NORMALIZED_CONVENTION, NORMALIZED_KEY, base_weights_hash, normalized_scale

    adapters = adapter_modules(model)
    if active_adapter(model) is None or not adapters:
        raise AdapterError("the model has no active dorafit adapter to export")
    methods = sorted({a.method for _, a in adapters})
    if methods != ["dora"]:
        raise AdapterError(f"pre-normalized DoRA needs a DoRA adapter on every module; this one has method(s) {methods} "
                           "(export a LoRA adapter as it is, or with --to lora)")
    cfg, state = peft_config_and_state(model)
    with torch.no_grad():
        for name, adapter in adapters:
            key = f"{PREFIX}{name}.lora_magnitude_vector"
            state[key] = normalized_scale(adapter).reshape(state[key].shape).contiguous()
    names = sorted(name for name, _ in adapters)
    dtypes = sorted({str(getattr(a.base, "weight").dtype).replace("torch.", "") for _, a in adapters})
    cfg[NORMALIZED_KEY] = {
        "convention": NORMALIZED_CONVENTION,
        "served_by": "TensorRT-LLM's DoRA plugin (trtllm-build --dora_plugin enable)",
        "magnitude_dtype": "float32",
        "base_weights_sha256": base_weights_hash(model, names),
        "base_weights_dtype": "/".join(dtypes),
        "base_modules": len(names),
    }
    return cfg, state


def export_dora_normalized(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the model's active DoRA adapter pre-normalized against its base (see the module
    docstring) as a PEFT-layout folder ``path``; returns the path."""
    from .adapter_files import write_adapter_pair
    from .interop import peft_metadata

    cfg, state = dora_normalized_contents(model)
    return write_adapter_pair(Path(path), cfg, state, peft_metadata(model), sort_keys=True)


@dataclass
class NormalizedCheck:
    """How far serving a pre-normalized adapter on another base drifts from the fine-tune."""

    drift: float  # ‖L_served − L_tuned‖ / ‖L_tuned‖: g kept as exported (what the engine computes)
    drift_of_change: float  # the same difference over the fine-tune's own change ‖L_tuned − L_base‖
    drift_recomputed: float  # g recomputed on the serving base (what merging on that base gives)


def check_dora_normalized(tuned: nn.Module, served: nn.Module, recomputed: nn.Module, inputs: Sequence) -> NormalizedCheck:
    """Compare, on ``inputs``, the fine-tuned model (the adapter on the base it was trained on)
    with ``served`` (the serving base with the pre-normalized folder loaded, g as exported,
    ``load_adapter(..., allow_base_mismatch=True)``) and ``recomputed`` (the serving base with the
    ordinary adapter: g recomputed for it). Each model runs once before it is measured: a DoRA
    layer's first no-grad call computes g on the way (its A W0ᵀ through the base matmul) and the
    later calls reuse it, and on a deep float32 model the two differ by about 1e-6 (SmolLM2's 150
    layers: 2.4e-6 of the logits), which would hide what is measured here."""
    for model in (tuned, served, recomputed):
        model_outputs(model, inputs[:1])
    want = model_outputs(tuned, inputs)
    with disable_adapter(tuned):
        base = model_outputs(tuned, inputs)
    got, again = model_outputs(served, inputs), model_outputs(recomputed, inputs)
    scale, change = _norm(want), _distance(want, base)
    lost = _distance(got, want)
    return NormalizedCheck(drift=lost / scale if scale else 0.0, drift_of_change=lost / change if change else 0.0,
                           drift_recomputed=_distance(again, want) / scale if scale else 0.0)
