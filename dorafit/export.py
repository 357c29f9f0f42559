"""Serving export: a DoRA adapter as a plain LoRA adapter that LoRA-only engines load.

Serving engines (vLLM, SGLang, TGI, LoRAX) read LoRA's A and B but no magnitude. The DoRA
update of a layer, ΔW = W' − W0 with W' = g ⊙ (W0 + s B A), is not of rank r (the row scaling g
touches every row of W0), so it is approximated by its truncated SVD:

    ΔW = U Σ Vᵀ  (out, in_flat)      B_lora = U[:, :R] Σ[:R]  (out, R)     A_lora = Vᵀ[:R]  (R, in_flat)

written as a PEFT LoRA adapter with lora_alpha = R (scaling 1), so W0 + B_lora A_lora is the best
rank-R approximation of W' (Eckart–Young). Reported per layer and overall:

    weight error  ‖ΔW − B_lora A_lora‖_F / ‖ΔW‖_F = sqrt(Σ_{k>R} σ_k²) / sqrt(Σ_k σ_k²)
                  (the share of the fine-tune's weight update that is lost; overall: sums over layers)
    logits drift  ‖L_lora − L_dora‖_F / ‖L_dora‖_F  on the given inputs, and the same difference
                  relative to the fine-tune's own change ‖L_dora − L_base‖_F

With ``max_error`` the smallest R whose overall weight error is at most that is chosen. A
layer's rank is capped at min(out, in_flat) (there the error is 0 up to float error). Merging
(``dorafit.merge``) stays the exact path; this one trades exactness for serving many adapters
over one base.
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
) -> ExportReport:
    """Approximate the model's active DoRA (or any) adapter by a plain rank-``rank`` LoRA.

    Writes a PEFT LoRA adapter to ``path`` (when given) and returns the report. Give ``rank`` or
    ``max_error`` (then the smallest rank within it is used). ``inputs``: a few model inputs
    (dicts of keyword arguments or tensors) on which the logits drift is measured. The model is
    left as it was (the LoRA is built as a temporary named adapter and deleted).
    """
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
            from .interop import save_peft_adapter

            report.path = save_peft_adapter(model, path)
    finally:
        set_adapter(model, source)
        delete_adapter(model, _EXPORT_NAME)
    return report
