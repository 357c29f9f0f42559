"""Magnitude/direction analysis of fine-tuned weights (DoRA paper, section 3 and Figure 2).

Every weight W (out, in) of a fine-tuned model is compared with its pretrained W0 row by row,
one row per output feature i (the axis of DoRA's magnitude vector m):

    ΔM = mean_i | ‖W_i‖ − ‖W0_i‖ |          (change of magnitude, m_i = ‖W_i‖)
    ΔD = mean_i ( 1 − cos(W_i, W0_i) )       (change of direction)

(`axis=0` takes columns instead.) The statistics themselves are computed by
`dorafit.functional.magnitude_direction_delta`, the same function the layers' tests use.

A checkpoint can be
- a full fine-tune: a folder with ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``), or a single ``.safetensors`` file, with the base's keys
  (a prefix such as ``model.`` or ``bert.`` on either side is tolerated);
- an adapter folder (dorafit's or PEFT's ``adapter_config.json``): loaded onto the base model
  with `dorafit.load_adapter`, and W is the adapter's merged weight.

The paper's observation: over the layers and intermediate checkpoints of one method, full
fine-tuning and DoRA show a negative correlation between ΔD and ΔM (FT −0.62, DoRA −0.31 over
6 layers x 4 checkpoints of query matrices), LoRA a positive one (+0.83): LoRA changes magnitude
and direction together. `plot_figure2` draws that figure (ΔD on x, ΔM on y, one colour per layer,
one marker per checkpoint, one panel per method) with the Pearson correlation and fitted slope on
each panel. `panel_stats` also gives the correlation within checkpoints, which removes the growth
that all layers share over training (early in training it makes every method look positive).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .functional import magnitude_direction_delta

PathLike = Union[str, os.PathLike]

# Default module selection for full fine-tunes when no adapter tells which modules were adapted:
# the query projection of attention, as in the paper's Figure 2 (names used by common models).
DEFAULT_FULL_MODULES = r"(.*\.)?(query|q_proj|q_lin|q|wq|Wq)"

METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "dvora": "DVoRA", "magnitude": "magnitude"}


class AnalysisError(ValueError):
    """A checkpoint or module selection that can't be analysed; the message names the file/module."""


@dataclass
class Checkpoint:
    """One fine-tuned checkpoint to compare with the base.

    `run` groups the checkpoints of one training run and `order` is the position in it (the
    marker in Figure 2); `method` is read from the checkpoint unless given.
    """

    path: str
    run: int = 0
    order: int = 0
    method: Optional[str] = None
    label: Optional[str] = None


@dataclass
class DeltaRow:
    """One line of the analysis table: one checkpoint x one module."""

    checkpoint: str
    label: str
    method: str
    run: int
    order: int
    module: str
    kind: str                 # module name with its layer index replaced by "*"
    layer: Optional[int]
    delta_m: float
    delta_d: float
    axis: int
    features: int             # number of rows (axis=1) or columns (axis=0) averaged


@dataclass
class PanelStats:
    """Correlation of ΔD and ΔM over one method's points for one kind of module."""

    method: str
    kind: str
    points: int
    pearson: float
    slope: float              # least-squares fit ΔM = slope * ΔD + intercept
    intercept: float
    # Pearson r after centring ΔD and ΔM within each checkpoint: the coupling across layers with
    # the common growth over training removed (NaN with one point per checkpoint)
    pearson_within: float = float("nan")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def plain_weight_2d(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A plain module's weight as (out, in_flat), rows = output features, the layout of
    DoRA's magnitude (same as the adapter layers' `base_weight_2d`)."""
    if isinstance(module, nn.Linear):
        return weight
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return weight.flatten(1)
    if isinstance(module, nn.Embedding):
        return weight.t()  # (dim, vocab): one feature per embedding dimension, as DoRA's embedding layer
    if type(module).__name__ == "Conv1D" and weight.dim() == 2:
        return weight.t()  # transformers' Conv1D stores (in, out)
    raise AnalysisError(f"module of type {type(module).__name__} is not a Linear/Conv/Conv1D/Embedding; "
                        "pick other modules with a module pattern")


def _is_weighted(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)) or (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None)


def layer_index(name: str) -> Optional[int]:
    """The first all-digit component of a dotted module name ("encoder.layer.3.query" -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def module_kind(name: str) -> str:
    """The module name with its layer index replaced by "*" ("encoder.layer.*.query")."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            parts[k] = "*"
            break
    return ".".join(parts)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN with fewer than 3 points or a constant coordinate."""
    n = len(x)
    if n < 3:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    if sxx <= 0 or syy <= 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def fit_line(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Least-squares (slope, intercept) of y on x; NaNs with fewer than 2 distinct x."""
    n = len(x)
    if n < 2:
        return float("nan"), float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx <= 0:
        return float("nan"), float("nan")
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return slope, my - slope * mx


def _compile(pattern: Optional[str]) -> Optional[re.Pattern]:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise AnalysisError(f"module pattern {pattern!r} is not a valid regular expression: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoint_type(path: PathLike) -> str:
    """"adapter" (a folder with adapter_config.json) or "full" (safetensors weights)."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "full"
        raise AnalysisError(f"{path}: a checkpoint file must be .safetensors (other formats are not read, "
                            "to avoid unpickling); convert it or pass its folder")
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return "full"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise AnalysisError(f"{path}: only safetensors weights are read (pickled .bin/.pt files are refused); "
                            "re-save the model with save_pretrained(..., safe_serialization=True)")
    raise AnalysisError(f"{path} is neither an adapter folder (adapter_config.json) nor a model folder "
                        "(model.safetensors or model.safetensors.index.json)")


def checkpoint_method(path: PathLike) -> str:
    """The method to label a checkpoint with: "FT" for full weights, else the adapter's method."""
    path = Path(path)
    if checkpoint_type(path) == "full":
        return "FT"
    cfg_file = path / "adapter_config.json"
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnalysisError(f"{cfg_file} is not valid JSON: {exc}") from None
    if "peft_type" in data:
        peft_type = str(data["peft_type"]).upper()
        if peft_type == "LORA":
            return "DoRA" if data.get("use_dora") else "LoRA"
        return {"VERA": "VeRA"}.get(peft_type, peft_type)
    method = (data.get("config") or {}).get("method")
    if method is None:
        raise AnalysisError(f"{cfg_file}: no \"config\".\"method\" and no \"peft_type\"; not an adapter config")
    return METHOD_NAMES.get(method, str(method))


def _safetensors_files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise AnalysisError(f"{index}: not a safetensors index (no weight_map): {exc}") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    return [path / "model.safetensors"]


def _match_key(name: str, keys: Iterable[str], source: Path) -> Optional[str]:
    """The checkpoint key holding `name` (a "<module>.weight" of the base), tolerating a prefix
    on either side (e.g. "bert." on a task model, "model." on a causal LM)."""
    candidates = [k for k in keys if k == name or k.endswith("." + name) or name.endswith("." + k)]
    if len(candidates) > 1:
        exact = [k for k in candidates if k == name]
        if exact:
            return exact[0]
        raise AnalysisError(f"{source}: several keys could hold {name}: {candidates[:5]}")
    return candidates[0] if candidates else None


def read_full_weights(path: PathLike, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """{base key: tensor} for the given "<module>.weight" names, read from safetensors only."""
    from safetensors import safe_open

    path = Path(path)
    out: Dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        if not file.is_file():
            raise AnalysisError(f"{file} is missing (named by {path})")
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise AnalysisError(f"{file} is not a readable safetensors file: {exc}") from None
        with handle as f:
            keys = list(f.keys())
            for name in names:
                if name not in out:
                    key = _match_key(name, keys, file)
                    if key is not None:
                        out[name] = f.get_tensor(key)
    missing = [n for n in names if n not in out]
    if missing:
        raise AnalysisError(f"{path}: no weight for {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                            f"({len(missing)} of {len(names)} selected modules); is it a fine-tune of this base?")
    return out


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------

def weighted_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{name: module} for every Linear/Conv/Conv1D/Embedding of a plain model."""
    return {name: m for name, m in model.named_modules() if name and _is_weighted(m)}


def select_modules(model: nn.Module, pattern: Optional[str], default: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the modules to analyse: those whose name matches `pattern` (re.fullmatch), else
    `default`, else the query projections (DEFAULT_FULL_MODULES)."""
    modules = weighted_modules(model)
    if pattern is None and default:
        unknown = [n for n in default if n not in modules]
        if unknown:
            raise AnalysisError(f"adapted modules {unknown[:5]} are not Linear/Conv/Embedding modules of the base model")
        return list(default)
    from .config import bounded_matching, match_pattern

    regex = _compile(pattern if pattern is not None else DEFAULT_FULL_MODULES)
    with bounded_matching():  # a pattern that backtracks without end is an error, not a hang
        chosen = [n for n in modules if match_pattern(regex.pattern, n, "module pattern")]
    if not chosen:
        sample = list(modules)[:8]
        raise AnalysisError(f"no Linear/Conv/Embedding module of the base matches {regex.pattern!r} "
                            f"(names look like {sample}); pass another module pattern")
    return chosen


def delta_rows(w0: Dict[str, torch.Tensor], w: Dict[str, torch.Tensor], checkpoint: Checkpoint,
               axis: int = 1) -> List[DeltaRow]:
    """Rows of ΔM/ΔD for matching {module: (out, in_flat) weight} dicts of base and fine-tune."""
    rows = []
    for name, base in w0.items():
        if name not in w:
            raise AnalysisError(f"{checkpoint.path}: no fine-tuned weight for module {name}")
        tuned = w[name]
        if tuned.shape != base.shape:
            raise AnalysisError(f"{checkpoint.path}: module {name} has shape {tuple(tuned.shape)}, "
                                f"the base {tuple(base.shape)}")
        delta_m, delta_d = magnitude_direction_delta(base, tuned, axis=axis)
        rows.append(DeltaRow(
            checkpoint=str(checkpoint.path), label=checkpoint.label or Path(checkpoint.path).name,
            method=checkpoint.method or checkpoint_method(checkpoint.path), run=checkpoint.run,
            order=checkpoint.order, module=name, kind=module_kind(name), layer=layer_index(name),
            delta_m=delta_m, delta_d=delta_d, axis=axis, features=base.shape[0 if axis == 1 else 1],
        ))
    return rows


def _adapter_weights(base_model: nn.Module, path: Path) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{module: (W0_2d, merged W_2d)} of an adapter folder, base model left as it was."""
    import dorafit

    dorafit.load_adapter(base_model, path)
    try:
        with torch.no_grad():
            return {name: (a.base_weight_2d().detach().clone(), a.merged_weight_2d().detach().clone())
                    for name, a in dorafit.adapter_modules(base_model)}
    finally:
        dorafit.detach(base_model)


def analyze(base_model: nn.Module, checkpoints: Sequence[Union[Checkpoint, PathLike]],
            modules: Optional[str] = None, axis: int = 1) -> List[DeltaRow]:
    """ΔM and ΔD of every selected module of every checkpoint against `base_model`.

    modules: a regex matched (re.fullmatch) against module names. By default an adapter is
    analysed on the modules it adapts, and a full fine-tune on the modules adapted by the
    adapters in the same call, or, with none, on the attention query projections.
    The base model must be plain (no adapters attached); it is left unchanged.
    """
    if axis not in (0, 1):
        raise AnalysisError(f"axis must be 1 (per output feature) or 0 (per input feature), got {axis}")
    import dorafit

    if dorafit.adapter_modules(base_model):
        raise AnalysisError("the base model already carries adapters; pass the plain pretrained model")
    specs = [c if isinstance(c, Checkpoint) else Checkpoint(str(c), run=k) for k, c in enumerate(checkpoints)]
    if not specs:
        raise AnalysisError("no checkpoint to analyse")
    regex = _compile(modules)
    plain = weighted_modules(base_model)

    per_spec: List[List[DeltaRow]] = [[] for _ in specs]
    adapted: List[str] = []
    for k, spec in enumerate(specs):
        if checkpoint_type(spec.path) != "adapter":
            continue
        pairs = _adapter_weights(base_model, Path(spec.path))
        chosen = [n for n in pairs if regex is None or regex.fullmatch(n)]
        if not chosen:
            raise AnalysisError(f"{spec.path}: none of its adapted modules matches {modules!r} "
                                f"(it adapts {list(pairs)[:5]})")
        adapted += [n for n in chosen if n not in adapted]
        per_spec[k] = delta_rows({n: pairs[n][0] for n in chosen}, {n: pairs[n][1] for n in chosen}, spec, axis)

    full = [k for k, spec in enumerate(specs) if checkpoint_type(spec.path) == "full"]
    if full:
        # full fine-tunes are read on the modules the adapters of this call adapt, so that the
        # panels compare like with like
        names = select_modules(base_model, modules, default=adapted if modules is None else None)
        w0 = {n: plain_weight_2d(plain[n], plain[n].weight.detach()) for n in names}
        for k in full:
            tensors = read_full_weights(specs[k].path, [f"{n}.weight" for n in names])
            w = {n: plain_weight_2d(plain[n], tensors[f"{n}.weight"]) for n in names}
            per_spec[k] = delta_rows(w0, w, specs[k], axis)
    return [r for rows in per_spec for r in rows]


def panel_stats(rows: Sequence[DeltaRow]) -> List[PanelStats]:
    """Pearson correlation and fitted slope per (method, module kind), in first-seen order, plus
    the correlation within checkpoints (each checkpoint's points centred on their mean)."""
    groups: Dict[Tuple[str, str], List[DeltaRow]] = {}
    for r in rows:
        groups.setdefault((r.method, r.kind), []).append(r)
    out = []
    for (method, kind), rs in groups.items():
        x = [r.delta_d for r in rs]
        y = [r.delta_m for r in rs]
        slope, intercept = fit_line(x, y)
        by_ckpt: Dict[Tuple[int, int, str], List[DeltaRow]] = {}
        for r in rs:
            by_ckpt.setdefault((r.run, r.order, r.checkpoint), []).append(r)
        xc, yc = [], []
        for members in by_ckpt.values():
            if len(members) > 1:
                mx = sum(r.delta_d for r in members) / len(members)
                my = sum(r.delta_m for r in members) / len(members)
                xc += [r.delta_d - mx for r in members]
                yc += [r.delta_m - my for r in members]
        within = pearson(xc, yc) if len(by_ckpt) > 1 else float("nan")
        out.append(PanelStats(method, kind, len(rs), pearson(x, y), slope, intercept, within))
    return out


# ---------------------------------------------------------------------------------------------
# Output: table and figure
# ---------------------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    from .files import write_bytes_atomic

    write_bytes_atomic(path, text.encode("utf-8"))


def _json_float(v: float) -> Optional[float]:
    return None if isinstance(v, float) and math.isnan(v) else v


def write_table(rows: Sequence[DeltaRow], csv_path: Optional[PathLike] = None,
                json_path: Optional[PathLike] = None) -> None:
    """One CSV line per checkpoint x module; the JSON adds the per-panel correlations."""
    if csv_path is not None:
        import io

        buf = io.StringIO()
        names = list(DeltaRow.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
        _write_atomic(Path(csv_path), buf.getvalue())
    if json_path is not None:
        stats = [{k: _json_float(v) for k, v in asdict(s).items()} for s in panel_stats(rows)]
        _write_atomic(Path(json_path), json.dumps({"rows": [asdict(r) for r in rows], "panels": stats}, indent=1))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LEGEND_COLUMNS = 10  # legend entries per row below the panels


def short_kind_names(kinds: Sequence[str]) -> Dict[str, str]:
    """The shortest dotted tail of each module kind that tells it from the other kinds, for panel
    titles: "bert.encoder.layer.*.attention.self.query" -> "query" (beside "...value")."""
    parts = {k: [p for p in k.split(".") if p != "*"] for k in kinds}
    short = {}
    for kind, own in parts.items():
        others = [q for k, q in parts.items() if k != kind]
        name = kind
        for n in range(1, len(own) + 1):
            if all(q[-n:] != own[-n:] for q in others):
                name = ".".join(own[-n:])
                break
        short[kind] = name
    return short


def checkpoint_marker_labels(positions: Dict[int, List[str]]) -> Dict[int, str]:
    """Legend text of each marker. A marker is a checkpoint's position in its run, shared by every
    panel, so it is named by the label all panels agree on ("checkpoint-500", or the folder name
    when only the runs' folders differ); if they disagree at any position, every marker is named
    by its position ("checkpoint 2 of each run"), never by one run's folder."""
    agreed = {}
    for k, labels in positions.items():
        tails = {Path(label).name for label in labels}
        if len(set(labels)) == 1:
            agreed[k] = labels[0]
        elif len(tails) == 1:
            agreed[k] = tails.pop()
        else:
            return {k: f"checkpoint {k + 1} of each run" for k in positions}
    return agreed


def _tick_text(value: float, _position=None) -> str:
    """A tick label that is short at any scale: 0.0045, 2.4e-4, 6e-6 (no shared offset text)."""
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _panel_stats_text(s: Optional[PanelStats], reference: Optional[float]) -> str:
    """Two short lines for the top right of a panel: r (and the reference), slope, r within."""
    if s is None:
        return "no points"
    first = f"r = {s.pearson:+.2f}" + (f"  (paper {reference:+.2f})" if reference is not None else "")
    second = f"slope {s.slope:.3g}"
    if not math.isnan(s.pearson_within):
        second += f",  r within ckpt {s.pearson_within:+.2f}"
    return f"{first}\n{second}"


def plot_figure2(rows: Sequence[DeltaRow], path: PathLike, title: Optional[str] = None,
                 reference: Optional[Dict[str, float]] = None) -> Path:
    """The paper's Figure 2 as a PNG: per method (columns) and module kind (rows) a scatter of
    ΔD (x) against ΔM (y), colour = layer, marker = checkpoint (in the order given), with the
    fitted line. Each panel is titled "method · module" on the left and carries "r = ..., slope
    ..." on the right, above the axes, so no text hides a point. `reference` maps a method to a
    correlation to print beside the measured one (e.g. the paper's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    if not rows:
        raise AnalysisError("nothing to plot: no rows")
    methods = list(dict.fromkeys(r.method for r in rows))
    kinds = list(dict.fromkeys(r.kind for r in rows))
    short = short_kind_names(kinds)
    layers = sorted({r.layer for r in rows if r.layer is not None})
    # qualitative maps keep neighbouring layers apart; past 20 layers only a gradient is left
    cmap_name = "tab10" if len(layers) <= 10 else "tab20" if len(layers) <= 20 else "viridis"
    cmap = plt.get_cmap(cmap_name)
    colour = {l: cmap(k if cmap_name != "viridis" else k / max(1, len(layers) - 1)) for k, l in enumerate(layers)}
    stats = {(s.method, s.kind): s for s in panel_stats(rows)}

    positions: Dict[int, List[str]] = {}
    panels = []
    for kind in kinds:
        for method in methods:
            pts = [r for r in rows if r.method == method and r.kind == kind]
            # marker = position of the checkpoint among this panel's checkpoints
            ckpts = list(dict.fromkeys((r.run, r.order, r.checkpoint) for r in pts))
            for k, c in enumerate(ckpts):
                positions.setdefault(k, []).append(next(r.label for r in pts if (r.run, r.order, r.checkpoint) == c))
            panels.append((kind, method, pts, ckpts))
    markers = checkpoint_marker_labels(positions) if len(positions) > 1 else {}

    handles = [Line2D([], [], ls="", marker="o", color=colour[l], markeredgecolor="black", label=f"layer {l}")
               for l in layers]
    if any(r.layer is None for r in rows):
        handles.append(Line2D([], [], ls="", marker="o", color="0.4", markeredgecolor="black", label="no layer index"))
    marker_handles = [Line2D([], [], ls="", marker=MARKERS[k % len(MARKERS)], color="white", markeredgecolor="black",
                             label=markers[k]) for k in sorted(markers)]
    legend_rows = math.ceil(len(handles) / LEGEND_COLUMNS) + math.ceil(len(marker_handles) / LEGEND_COLUMNS)
    legend_height = 0.3 + 0.25 * legend_rows  # inches below the panels
    title_height = 0.45 if title else 0.0
    height = 3.8 * len(kinds) + title_height + legend_height
    fig, axes = plt.subplots(len(kinds), len(methods), figsize=(4.6 * len(methods), height), squeeze=False)
    for index, (kind, method, pts, ckpts) in enumerate(panels):
        i, j = divmod(index, len(methods))
        ax = axes[i][j]
        for r in pts:
            k = ckpts.index((r.run, r.order, r.checkpoint))
            ax.scatter(r.delta_d, r.delta_m, s=40, marker=MARKERS[k % len(MARKERS)],
                       color=colour.get(r.layer, "0.4"), edgecolors="black", linewidths=0.4, zorder=3)
        s = stats.get((method, kind))
        if s is not None and not math.isnan(s.slope):
            xs = [min(r.delta_d for r in pts), max(r.delta_d for r in pts)]
            ax.plot(xs, [s.slope * x + s.intercept for x in xs], color="0.3", lw=1, ls="--", zorder=2)
        name = method if len(kinds) == 1 else f"{method} · {short[kind]}"
        ax.set_title(name, loc="left", fontsize=11, fontweight="bold")
        ax.set_title(_panel_stats_text(s, (reference or {}).get(method)), loc="right", fontsize=8.5)
        ax.set_xlabel("ΔD: mean (1 − cos) per row")
        if j == 0:
            ax.set_ylabel("ΔM: mean |‖W‖ − ‖W0‖| per row")
        # plain tick labels on every panel: no "1e-3" offset text in one corner and none in another
        ax.xaxis.set_major_formatter(FuncFormatter(_tick_text))
        ax.yaxis.set_major_formatter(FuncFormatter(_tick_text))
        ax.grid(alpha=0.3)

    bottom = legend_height / height
    kw = dict(ncol=LEGEND_COLUMNS, fontsize=8.5, frameon=False, handletextpad=0.2, columnspacing=1.2)
    if handles:
        row = 0.25 * math.ceil(len(handles) / LEGEND_COLUMNS) / height
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, bottom - row - 0.15 / height),
                   **{**kw, "ncol": min(LEGEND_COLUMNS, len(handles))})
    if marker_handles:
        fig.legend(handles=marker_handles, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height),
                   **{**kw, "ncol": min(LEGEND_COLUMNS, len(marker_handles))})
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    from .files import write_file_atomic

    path = Path(path)
    try:
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    finally:
        plt.close(fig)
    return path
