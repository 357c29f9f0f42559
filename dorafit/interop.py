"""Hugging Face PEFT interop: load PEFT LoRA / DoRA adapters, save dorafit adapters as PEFT.

PEFT's directory (``save_pretrained``, checked against PEFT 0.21.2) holds ``adapter_config.json``
(a ``LoraConfig``: ``"peft_type": "LORA"``, ``r``, ``lora_alpha``, ``target_modules``, ...) and
``adapter_model.safetensors`` whose keys drop PEFT's adapter name ("default"):

    base_model.model.<module>.lora_A.weight          A  (r, in)            Linear, GPT-2 Conv1D
    base_model.model.<module>.lora_B.weight          B  (out, r)
    base_model.model.<module>.lora_A.weight          A  (r, in, *k)        Conv1d/2d/3d
    base_model.model.<module>.lora_B.weight          B  (out, r, 1, ...)
    base_model.model.<module>.lora_embedding_A       A  (r, vocab)         Embedding
    base_model.model.<module>.lora_embedding_B       B  (dim, r)
    base_model.model.<module>.lora_magnitude_vector  m  (out,); (1, out, 1, ...) for conv; (dim,) for
                                                        an embedding (no ".weight" suffix)
    base_model.model.<module>.base_layer.weight      an embedding's own table, written when an
                                                        embedding is targeted (must equal the base)
    base_model.model.<module>.<key>                  a modules_to_save copy's state dict

dorafit's adapter layers use the same tensor layouts (``dorafit.layers``), so the weights move
as they are; only the conv magnitude changes shape. The scaling is s = alpha / r
(rsLoRA: alpha / sqrt(r)), with r and alpha per module from ``rank_pattern`` / ``alpha_pattern``.

Loading takes the set of adapted modules from the weights file itself and checks it against
PEFT's own target rules (``target_modules`` list or regex, ``exclude_modules``,
``layers_to_transform``, ``modules_to_save``), so the dorafit model holds exactly the modules
PEFT would adapt, each with its rank and alpha. Options dorafit cannot represent are refused
with an error naming the option; nothing is approximated. See docs/peft.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, WRITER, WRITER_KEY, AdapterFileError, read_adapter_config, read_safetensors
from .config import (
    AdapterConfig,
    MAX_PATTERN_LENGTH,
    ConfigError,
    bounded_matching,
    check_bool,
    check_int,
    check_number,
    lookup_pattern,
    match_pattern,
    pattern_matches,
)
from .files import brief, write_into_directory
from .inject import CONFIG_ATTR, ModulesToSave, adapter_modules, attach, check_patterns_match, detach, find_targets
from .layers import AdapterLayer, Conv1DAdapter, ConvAdapter, EmbeddingAdapter, LinearAdapter

PREFIX = "base_model.model."
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors became its default

# PEFT keys (after the module name) -> the dorafit factor they hold.
_FACTOR_SUFFIXES = {
    "lora_A.weight": "lora_a",
    "lora_B.weight": "lora_b",
    "lora_embedding_A": "lora_a",
    "lora_embedding_B": "lora_b",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",  # the in-memory name, in case a file kept it
}

# Options of a PEFT LoraConfig whose non-default value changes what the adapter computes or
# how it trains in a way dorafit has no equivalent for: (key, default, why).
_REFUSED_OPTIONS = [
    ("lora_bias", False, "B carries a bias vector; dorafit adapters have none"),
    ("target_parameters", None, "adapters on bare nn.Parameters (e.g. MoE experts) are not supported"),
    ("megatron_config", None, "Megatron tensor-parallel layers are not supported"),
    ("layer_replication", None, "layer replication rebuilds the base model"),
    ("trainable_token_indices", None, "trainable token rows are not supported"),
    ("use_qalora", False, "QA-LoRA pools the input; not supported"),
    ("use_bdlora", None, "block-diagonal LoRA factors are not supported"),
    ("alora_invocation_tokens", None, "activated LoRA depends on invocation tokens; not supported"),
    ("arrow_config", None, "Arrow routing between several adapters is not supported"),
    ("velora_config", None, "VeLoRA is not supported"),
    ("monteclora_config", None, "MonteCLoRA is not supported"),
    ("kasa_config", None, "KaSA is not supported"),
    ("ensure_weight_tying", False, "tied adapters between embedding and output head are not supported"),
]
# init_lora_weights values that change the base weights (the adapter only fits the modified base)
# or freeze a factor during training.
_REFUSED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


class PeftFormatError(AdapterFileError):
    """A PEFT adapter (or PEFT export) that dorafit cannot represent exactly."""


# ------------------------------------------------------------------------------------------------
# Reading PEFT's directory
def read_peft_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory (safetensors; a legacy .bin only as weights)."""
    st = path / WEIGHTS_NAME
    if st.is_file():
        return read_safetensors(st)
    legacy = path / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        # Older PEFT wrote a torch file; read it as plain tensors, never by unpickling objects.
        try:
            state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PeftFormatError(f"{legacy} cannot be read as a tensor file: {exc}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise PeftFormatError(f"{legacy} does not hold a flat dict of tensors")
        return state
    raise AdapterFileError(
        f"adapter weights file missing in {path}: expected {WEIGHTS_NAME} (or the older {LEGACY_WEIGHTS_NAME})"
    )


def check_peft_config(cfg: Dict[str, Any], source: Path) -> None:
    """Raise PeftFormatError naming the first PEFT option dorafit cannot represent."""
    where = source / CONFIG_NAME
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise PeftFormatError(
            f"{where}: peft_type {peft_type!r} is not supported; dorafit reads PEFT LORA adapters "
            "(plain LoRA or use_dora=True)"
        )
    bias = cfg.get("bias", "none")
    if bias not in ("none", None):
        raise PeftFormatError(
            f"{where}: bias={bias!r} trains the base layers' biases, which dorafit adapters do not hold; "
            "only bias='none' is supported"
        )
    for key, default, why in _REFUSED_OPTIONS:
        value = cfg.get(key, default)
        if value not in (default, None, False, [], {}):
            raise PeftFormatError(f"{where}: {key}={value!r} is not supported ({why})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REFUSED_INITS):
        raise PeftFormatError(
            f"{where}: init_lora_weights={init!r} is not supported: this initialisation modifies the base "
            "weights or freezes a factor, so the adapter does not apply to the original base model "
            "(PEFT converts such adapters to plain LoRA when saved with "
            "path_initial_model_for_weight_conversion)"
        )
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise PeftFormatError(f"{where}: {key} must be a positive number, got {value!r}")
    _check_peft_types(cfg, where)


def _check_peft_types(cfg: Dict[str, Any], where: Path) -> None:
    """Types of the options dorafit reads: a string "false" for use_dora would otherwise turn DoRA on."""
    def error(message: str) -> PeftFormatError:
        return PeftFormatError(f"{where}: {message}")

    check_int("r", cfg["r"], minimum=1, error=error)
    check_number("lora_alpha", cfg["lora_alpha"], low=0, low_open=True, error=error)
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(key) is not None:
            check_bool(key, cfg[key], error=error)
    if cfg.get("lora_dropout") is not None:
        check_number("lora_dropout", cfg["lora_dropout"], low=0, high=1, high_open=True, error=error)
    for key, check in (("rank_pattern", lambda k, v: check_int(k, v, minimum=1, error=error)),
                       ("alpha_pattern", lambda k, v: check_number(k, v, low=0, low_open=True, error=error))):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise error(f"{key} must be an object of module pattern -> value, got {patterns!r}")
        for pattern, value in patterns.items():
            check(f"{key}[{brief(pattern)}]", value)
    for key in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
        value = cfg.get(key)
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for item in items:
            if not isinstance(item, str) or len(item) > MAX_PATTERN_LENGTH:
                raise error(f"{key} entries must be strings of at most {MAX_PATTERN_LENGTH:,} characters, got "
                            f"{brief(item)}")


def split_peft_state(
    state: Dict[str, torch.Tensor], source: Path
) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Group a PEFT state dict: ({module: {"lora_a", "lora_b", "magnitude", "bias"}}, {module: base
    embedding table}, {other key: tensor}), keys relative to the base model."""
    if state and all(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items()}
    # (transformers' own PEFT integration writes the same keys without the prefix)
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    tables: Dict[str, torch.Tensor] = {}
    other: Dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for suffix, factor in _FACTOR_SUFFIXES.items():
            if key.endswith("." + suffix):
                factors.setdefault(key[: -len(suffix) - 1], {})[factor] = tensor
                break
        else:
            if key.endswith(".lora_B.bias"):
                raise PeftFormatError(f"{source}: key {key!r} is a LoRA bias (lora_bias=True), which dorafit does not support")
            if key.endswith(".base_layer.weight"):
                tables[key[: -len(".base_layer.weight")]] = tensor
            else:
                other[key] = tensor
    return factors, tables, other


# ------------------------------------------------------------------------------------------------
# PEFT's name-matching rules, restated (dorafit does not import peft at run time)
def _peft_match(pattern: str, name: str, option: str, how: str = "match"):
    """PEFT's ``re.<how>`` of a pattern built from ``option`` of an adapter_config.json, bounded in
    time (``dorafit.config.match_pattern``); an invalid pattern is a PeftFormatError naming the option."""
    try:
        return match_pattern(pattern, name, option, how)
    except re.error as exc:
        raise PeftFormatError(f"{option}: {brief(pattern)} is not a valid regular expression: {exc}") from None


def peft_pattern_value(patterns: Dict[str, Any], name: str, default: Any, option: str = "rank_pattern") -> Any:
    """rank_pattern / alpha_pattern lookup as PEFT does it: the first key (in order) that matches
    the end of the module name as a regex, ``(.*\\.)?(key)$``."""
    with bounded_matching():
        for key in patterns:
            if _peft_match(rf"(.*\.)?({key})$", name, option):
                return patterns[key]
    return default


def _peft_layer_index_ok(cfg: Dict[str, Any], name: str) -> bool:
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = cfg.get("layers_pattern")
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = _peft_match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name, "layers_pattern")
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _peft_in_modules_to_save(names: List[str], name: str) -> bool:
    return any(_peft_match(rf"(^|.*\.){m}($|\..*)", name, "modules_to_save") for m in names)


def peft_targets(model: nn.Module, cfg: Dict[str, Any]) -> Optional[List[str]]:
    """Module names PEFT's ``target_modules`` selects on ``model`` (None for "all-linear", whose
    expansion depends on PEFT's model-type tables)."""
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear" or (isinstance(targets, list) and "all-linear" in targets):
        return None
    exclude = cfg.get("exclude_modules")
    to_save = list(cfg.get("modules_to_save") or [])
    selected = []
    with bounded_matching():
        for name, _ in model.named_modules():
            if name and _peft_selects(cfg, targets, exclude, to_save, name):
                selected.append(name)
    return selected


def _peft_selects(cfg: Dict[str, Any], targets, exclude, to_save: List[str], name: str) -> bool:
    """Whether PEFT's ``target_modules`` / ``exclude_modules`` rules select module ``name``."""
    if exclude:
        if isinstance(exclude, str):
            if _peft_match(exclude, name, "exclude_modules", "fullmatch"):
                return False
        elif name in exclude or any(name.endswith("." + e) for e in exclude):
            return False
    if _peft_in_modules_to_save(to_save, name):
        return False
    if isinstance(targets, str):
        return _peft_match(targets, name, "target_modules", "fullmatch") is not None
    if name in targets:
        return True
    return any(name.endswith("." + t) for t in targets) and _peft_layer_index_ok(cfg, name)


def peft_modules_to_save(model: nn.Module, names: List[str]) -> List[str]:
    """Module names PEFT wraps for ``modules_to_save`` (a name matches when it ends with an entry;
    modules inside a matched one are part of it)."""
    hits: List[str] = []
    for name, _ in model.named_modules():
        if name and any(name.endswith(entry) for entry in names):
            if not any(name.startswith(h + ".") for h in hits):
                hits.append(name)
    return hits


# ------------------------------------------------------------------------------------------------
# Shapes: what the PEFT tensors of one module must look like
def _adapter_kind(module: nn.Module) -> Optional[type]:
    from .inject import adapter_class_for

    return adapter_class_for(module)


def _expected_shapes(module: nn.Module, kind: type, rank: int) -> Dict[str, Tuple[int, ...]]:
    """PEFT shapes of A, B and the magnitude for ``module`` (a base layer) at ``rank``."""
    w = module.weight
    if issubclass(kind, LinearAdapter):
        # in/out_features rather than the weight's shape: a 4-bit base stores its weight packed.
        out_f, in_f = module.out_features, module.in_features
    elif issubclass(kind, Conv1DAdapter):
        in_f, out_f = w.shape
    elif issubclass(kind, EmbeddingAdapter):
        in_f, out_f = w.shape  # (vocab, dim): as a linear map one-hot -> dim
    elif issubclass(kind, ConvAdapter):
        out_f, in_ch = w.shape[:2]
        spatial = tuple(w.shape[2:])
        return {
            "lora_a": (rank, in_ch) + spatial,
            "lora_b": (out_f, rank) + (1,) * len(spatial),
            "magnitude": (1, out_f) + (1,) * len(spatial),
        }
    else:
        raise PeftFormatError(f"no PEFT layout known for {type(module).__name__}")
    return {"lora_a": (rank, in_f), "lora_b": (out_f, rank), "magnitude": (out_f,)}


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{type(module).__name__}({module.in_features} -> {module.out_features})"
    return f"{type(module).__name__} with weight {tuple(module.weight.shape)}"


def _check_conv_semantics(name: str, module: nn.Module, direction: str) -> None:
    """PEFT builds a conv's A without the base's dilation and padding mode; warn where its
    unmerged forward therefore differs from the merged weights (which dorafit follows)."""
    dilation = getattr(module, "dilation", None)
    odd_dilation = dilation is not None and any(d != 1 for d in dilation)
    odd_padding = getattr(module, "padding_mode", "zeros") != "zeros"
    if odd_dilation or odd_padding:
        what = f"dilation={tuple(dilation)}" if odd_dilation else f"padding_mode={module.padding_mode!r}"
        warnings.warn(
            f"{direction} module {name!r} ({type(module).__name__}, {what}): PEFT runs the adapter's A "
            "convolution without the base's dilation / padding mode, so PEFT's unmerged forward on this "
            "layer fails or differs from its own merged weights. dorafit computes the merged-weight "
            "result (the same as PEFT's merge_and_unload). See docs/peft.md.",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------
# PEFT -> dorafit
def _exact(name: str) -> str:
    """A dorafit pattern that matches module ``name`` and nothing else (regex full match)."""
    return re.escape(name)


def _resolve_dorafit(model: nn.Module, config: AdapterConfig) -> Tuple[Dict[str, Tuple[int, float]], List[str]]:
    """What ``attach(model, config)`` would adapt: ({name: (rank, alpha)}, modules_to_save names)."""
    names = find_targets(model, config)
    names = [n for n in names if not any(o.startswith(n + ".") for o in names)]
    check_patterns_match(model, config, names)  # attach refuses patterns PEFT would skip silently
    layers = {}
    for n in names:
        rank = int(lookup_pattern(config.rank_pattern, n, config.rank))
        alpha = float(lookup_pattern(config.alpha_pattern, n, config.alpha))
        layers[n] = (rank, alpha)
    saves: List[str] = []
    for pattern in config.modules_to_save:
        hits = [n for n, _ in model.named_modules() if n and pattern_matches(pattern, n) and n not in layers]
        hits = [n for n in hits if not any(n.startswith(o + ".") for o in hits if o != n)]
        saves.extend(h for h in hits if h not in saves)
    return layers, saves


def _dorafit_config(
    model: nn.Module,
    cfg: Dict[str, Any],
    layers: Dict[str, Tuple[int, float]],
    saves: List[str],
) -> AdapterConfig:
    """An AdapterConfig that adapts exactly ``layers`` (with their rank and alpha) and copies
    exactly ``saves``: PEFT's own patterns when dorafit's matching rules give the same result on
    this model (readable), else one exact pattern per module."""
    common = dict(
        method="dora" if cfg.get("use_dora") else "lora",
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        dropout_mode="input",  # PEFT's semantics: dropout on the input of the whole DoRA update
        rslora=bool(cfg.get("use_rslora", False)),
        detach_norm=True,  # PEFT always treats the norm as a constant (paper section 4.3)
        adapter_dtype="float32",  # PEFT's default (autocast_adapter_dtype=True) keeps adapters in fp32
    )
    targets = cfg.get("target_modules")
    exclude = cfg.get("exclude_modules")
    candidate = None
    if targets and not cfg.get("layers_to_transform"):
        try:
            candidate = AdapterConfig(
                targets=[targets] if isinstance(targets, str) else sorted(targets),
                exclude=[exclude] if isinstance(exclude, str) else sorted(exclude or []),
                rank_pattern={k: int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
                alpha_pattern={k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
                modules_to_save=[_exact(s) for s in saves],
                **common,
            )
            if _resolve_dorafit(model, candidate) != (layers, saves):
                candidate = None
        except (ConfigError, re.error):
            candidate = None
    if candidate is not None:
        return candidate
    rank_pattern = {_exact(n): r for n, (r, _) in layers.items() if r != common["rank"]}
    alpha_pattern = {_exact(n): a for n, (_, a) in layers.items() if a != common["alpha"]}
    exact = AdapterConfig(
        targets=[_exact(n) for n in layers],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=[_exact(s) for s in saves],
        **common,
    )
    resolved = _resolve_dorafit(model, exact)
    if resolved != (layers, saves):  # cannot happen unless module names collide; never guess
        raise PeftFormatError(f"cannot express the adapted module set exactly as a dorafit config: {resolved} vs {layers}")
    return exact


def load_peft_adapter(base_model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Attach the PEFT LoRA / DoRA adapter saved in directory ``path`` to ``base_model``.

    Returns ``base_model`` with dorafit adapters (and modules_to_save copies) carrying PEFT's
    weights: the same outputs as ``PeftModel.from_pretrained(base_model, path)``. Every key,
    shape and option is checked first; on error the model is left as it was.
    """
    source = Path(path)
    cfg = read_adapter_config(source)
    check_peft_config(cfg, source)
    weights_file = source / WEIGHTS_NAME
    factors, tables, other = split_peft_state(read_peft_weights(source), source)
    if not factors:
        raise PeftFormatError(f"{weights_file}: no LoRA weights (no key ending in .lora_A.weight or .lora_embedding_A)")
    modules = dict(base_model.named_modules())
    use_dora = bool(cfg.get("use_dora", False))

    # 1. The adapted modules: from the file, checked against the base model and PEFT's rules.
    layers: Dict[str, Tuple[int, float]] = {}
    for name in sorted(factors):
        found = factors[name]
        module = modules.get(name)
        if module is None or not name:
            raise PeftFormatError(
                f"{weights_file}: module {name!r} of the adapter does not exist in this base model "
                f"({type(base_model).__name__}); was the adapter trained on another model class?"
            )
        kind = _adapter_kind(module)
        if kind is None:
            raise PeftFormatError(f"{weights_file}: module {name!r} is a {type(module).__name__}, which dorafit cannot adapt")
        if issubclass(kind, ConvAdapter) and module.groups != 1:
            raise PeftFormatError(f"module {name!r}: {type(module).__name__} with groups={module.groups} is not supported")
        missing = [f for f in ("lora_a", "lora_b") if f not in found]
        if use_dora and "magnitude" not in found:
            missing.append("magnitude")
        if missing:
            names = {"lora_a": "lora_A", "lora_b": "lora_B", "magnitude": "lora_magnitude_vector"}
            raise PeftFormatError(f"{weights_file}: module {name!r} lacks {[names[m] for m in missing]}")
        if not use_dora and "magnitude" in found:
            raise PeftFormatError(
                f"{weights_file}: module {name!r} has a lora_magnitude_vector but the config says use_dora=false"
            )
        rank = int(found["lora_a"].shape[0])
        config_rank = int(peft_pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"]))
        if rank != config_rank:
            raise PeftFormatError(
                f"{weights_file}: module {name!r} has rank {rank} in the weights but {config_rank} from "
                "adapter_config.json (r / rank_pattern)"
            )
        expected = _expected_shapes(module, kind, rank)
        for factor in ("lora_a", "lora_b", "magnitude"):
            if factor not in found:
                continue
            got = tuple(found[factor].shape)
            want = expected[factor]
            ok = got == want or (factor == "magnitude" and issubclass(kind, ConvAdapter) and got == (want[1],))
            if not ok:
                raise PeftFormatError(
                    f"{weights_file}: module {name!r}: {factor} has shape {got} but this base model's "
                    f"{_describe(module)} needs {want} (an adapter for another base model?)"
                )
            if not found[factor].is_floating_point():
                raise PeftFormatError(f"{weights_file}: module {name!r}: {factor} has dtype {found[factor].dtype}")
        alpha = float(peft_pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"], "alpha_pattern"))
        layers[name] = (rank, alpha)
        if issubclass(kind, ConvAdapter):
            _check_conv_semantics(name, module, "loading PEFT adapter:")

    targeted = peft_targets(base_model, cfg)
    if targeted is not None:
        absent = [n for n in targeted if n not in layers and _adapter_kind(modules[n]) is not None]
        if absent:
            raise PeftFormatError(
                f"{weights_file} has no weights for {len(absent)} module(s) that target_modules="
                f"{cfg.get('target_modules')!r} selects on this model, e.g. {absent[:5]} (an adapter for "
                "another base model?)"
            )
        unlisted = sorted(set(layers) - set(targeted))
        if unlisted:
            raise PeftFormatError(
                f"{weights_file} has weights for module(s) {unlisted[:5]} that target_modules="
                f"{cfg.get('target_modules')!r} does not select on this model"
            )

    # 2. Embedding tables written alongside the adapter must be the base's own.
    for name, table in tables.items():
        module = modules.get(name)
        base_weight = getattr(module, "weight", None)
        if base_weight is None or tuple(base_weight.shape) != tuple(table.shape):
            raise PeftFormatError(
                f"{weights_file}: key {name + '.base_layer.weight'!r} has shape {tuple(table.shape)} but the base "
                f"model's {name!r} is {None if base_weight is None else tuple(base_weight.shape)} (resized vocabulary?)"
            )
        if not torch.equal(table.to(base_weight.dtype), base_weight.detach().cpu()):
            raise PeftFormatError(
                f"{weights_file}: key {name + '.base_layer.weight'!r} differs from the base model's weights "
                "(a resized or retrained embedding): dorafit does not replace base weights; load them into the "
                "base model first"
            )

    # 3. modules_to_save: every other key belongs to one of them.
    saves = [s for s in peft_modules_to_save(base_model, list(cfg.get("modules_to_save") or [])) if s not in layers]
    save_states: Dict[str, Dict[str, torch.Tensor]] = {s: {} for s in saves}
    for key, tensor in other.items():
        owner = next((s for s in saves if key.startswith(s + ".")), None)
        if owner is None:
            raise PeftFormatError(
                f"{weights_file}: unexpected key {key!r} (neither a LoRA factor nor part of modules_to_save="
                f"{cfg.get('modules_to_save')!r})"
            )
        save_states[owner][key[len(owner) + 1 :]] = tensor
    saves = [s for s in saves if save_states[s]]  # entries PEFT matched but that hold no weights are skipped
    for s in saves:
        want = modules[s].state_dict()
        missing = sorted(set(want) - set(save_states[s]))
        extra = sorted(set(save_states[s]) - set(want))
        if missing or extra:
            raise PeftFormatError(
                f"{weights_file}: modules_to_save module {s!r} does not match the base model: missing {missing}, "
                f"unexpected {extra}"
            )
        for k, t in save_states[s].items():
            if tuple(t.shape) != tuple(want[k].shape):
                raise PeftFormatError(
                    f"{weights_file}: key {s + '.' + k!r} has shape {tuple(t.shape)} but the base model's is "
                    f"{tuple(want[k].shape)}"
                )

    # 4. Attach and copy. attach validates before touching the model; after it, undo on error.
    config = _dorafit_config(base_model, cfg, layers, saves)
    attach(base_model, config)
    try:
        with torch.no_grad():
            for name, adapter in adapter_modules(base_model):
                for factor in adapter.adapter_parameter_names():
                    param = getattr(adapter, factor)
                    value = factors[name][factor].reshape(param.shape)
                    param.copy_(value.to(device=param.device, dtype=param.dtype))
                rank, alpha = layers[name]
                if adapter.rank != rank or not math.isclose(adapter.alpha, alpha):
                    raise PeftFormatError(f"module {name!r}: attached with rank {adapter.rank}, alpha {adapter.alpha}")
            for s in saves:
                copy = base_model.get_submodule(s)
                if not isinstance(copy, ModulesToSave):
                    raise PeftFormatError(f"modules_to_save module {s!r} was not wrapped")
                copy.trainable.load_state_dict(save_states[s], strict=True)
    except BaseException:
        detach(base_model)
        raise
    return base_model


# ------------------------------------------------------------------------------------------------
# dorafit -> PEFT
def _base_names(module: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) of the model as PEFT will see it: adapters and modules_to_save copies
    replaced by the original modules."""
    if isinstance(module, AdapterLayer):
        module = module.base
    elif isinstance(module, ModulesToSave):
        module = module.original
    if prefix:
        yield prefix, module
    for child_name, child in module.named_children():
        yield from _base_names(child, f"{prefix}.{child_name}" if prefix else child_name)


def _number(value: float) -> Union[int, float]:
    """An integral alpha as a JSON int (PEFT writes lora_alpha as an int)."""
    return int(value) if float(value).is_integer() else float(value)


def _mode(values: List[Any]) -> Any:
    """Most common value (ties: the first seen), so that patterns are only needed for exceptions."""
    return Counter(values).most_common(1)[0][0]


def _pattern_keys(values: Dict[str, Any], default: Any, names: List[str]) -> Dict[str, Any]:
    """rank_pattern / alpha_pattern for PEFT that resolve to ``values`` on every adapted module."""
    plain = {n: v for n, v in values.items() if v != default}
    if all(peft_pattern_value(plain, n, default) == values[n] for n in names):
        return plain
    # A name that is a regex suffix of another: anchor each key at the start of the module name
    # ("^" inside PEFT's "(.*\.)?(key)$" forces the optional prefix group to be empty).
    anchored = {"^" + re.escape(n): v for n, v in plain.items()}
    if all(peft_pattern_value(anchored, n, default) == values[n] for n in names):
        return anchored
    raise PeftFormatError("cannot express the per-module ranks/alphas as PEFT rank_pattern/alpha_pattern")


def _task_type(model: nn.Module, saves: List[str], base_modules: Dict[str, nn.Module]) -> Optional[str]:
    """PEFT's task_type for the model class, so that PEFT builds its task wrapper (generate() for
    causal LMs). A sequence classifier only when its head is saved: PEFT's SEQ_CLS wrapper adds
    every module named *classifier / *score to modules_to_save and would miss their weights."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        heads = [n for n in base_modules if n.endswith("classifier") or n.endswith("score")]
        if heads and all(any(h == s or h.startswith(s + ".") for s in saves) for h in heads):
            return "SEQ_CLS"
    return None


def peft_config_and_state(model: nn.Module) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` dict and the safetensors state dict PEFT expects for ``model``."""
    adapters = adapter_modules(model)
    if not adapters:
        raise AdapterFileError("model has no dorafit adapters to save (attach or load an adapter first)")
    config: Optional[AdapterConfig] = getattr(model, CONFIG_ATTR, None)
    methods = sorted({a.method for _, a in adapters})
    if any(m not in ("lora", "dora") for m in methods) or len(methods) > 1:
        raise PeftFormatError(
            f"the PEFT format holds LoRA or DoRA adapters (one method for all modules); this model has method(s) "
            f"{methods} (method / method_pattern)"
        )
    use_dora = methods == ["dora"]
    rslora = bool(config.rslora) if config is not None else False
    base_modules = dict(_base_names(model))
    state: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    alphas: Dict[str, float] = {}
    fan_in_fan_out = False
    for name, a in adapters:
        expected = a.alpha / math.sqrt(a.rank) if rslora else a.alpha / a.rank
        if not math.isclose(a.scaling, expected, rel_tol=1e-12):
            raise PeftFormatError(
                f"module {name!r}: scaling {a.scaling} is not alpha / {'sqrt(rank)' if rslora else 'rank'} "
                f"(alpha {a.alpha}, rank {a.rank}); PEFT derives the scaling from r and lora_alpha"
            )
        if isinstance(a, ConvAdapter):
            _check_conv_semantics(name, a.base, "saving for PEFT:")
        if isinstance(a, Conv1DAdapter):
            fan_in_fan_out = True
        emb = isinstance(a, EmbeddingAdapter)
        tensors = {
            ("lora_embedding_A" if emb else "lora_A.weight"): a.lora_a,
            ("lora_embedding_B" if emb else "lora_B.weight"): a.lora_b,
        }
        if a.magnitude is not None:
            m = a.magnitude
            if isinstance(a, ConvAdapter):  # PEFT keeps a conv's magnitude as (1, out, 1, ...)
                m = m.reshape((1, -1) + (1,) * (a.base.weight.dim() - 2))
            tensors["lora_magnitude_vector"] = m
        for suffix, t in tensors.items():
            state[f"{PREFIX}{name}.{suffix}"] = t.detach().to("cpu").contiguous()
        ranks[name] = a.rank
        alphas[name] = a.alpha

    saves = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    for s in saves:
        copy = model.get_submodule(s)
        for key, t in copy.trainable.state_dict().items():
            state[f"{PREFIX}{s}.{key}"] = t.detach().to("cpu").contiguous()
        # PEFT matches modules_to_save entries with a plain "ends with".
        clash = [n for n in base_modules if n != s and n.endswith(s) and not n.startswith(s + ".")]
        if clash:
            raise PeftFormatError(
                f"modules_to_save module {s!r}: PEFT would also wrap {clash[:3]} (it matches names by suffix)"
            )
    names = [n for n, _ in adapters]
    inside = [n for n in names if _peft_in_modules_to_save(saves, n)]
    if inside:
        raise PeftFormatError(f"adapted module(s) {inside[:3]} lie inside a modules_to_save module; PEFT cannot hold both")

    # target_modules: the full names when PEFT's list rule (exact or ".name" suffix) picks exactly
    # them; otherwise one regex (full match) of the escaped names.
    name_set = set(names)
    ambiguous = any(
        n not in name_set and any(n.endswith("." + t) for t in names) and _adapter_kind(m) is not None
        for n, m in base_modules.items()
    )
    target_modules: Union[List[str], str] = (
        "(?:" + "|".join(re.escape(n) for n in names) + ")" if ambiguous else sorted(names)
    )
    r = int(_mode([ranks[n] for n in names]))
    alpha = _number(_mode([alphas[n] for n in names]))
    alphas = {n: _number(a) for n, a in alphas.items()}

    dropout = float(config.dropout) if config is not None else 0.0
    if config is not None and dropout > 0 and config.dropout_mode != "input":
        warnings.warn(
            f"dropout_mode={config.dropout_mode!r}: PEFT applies lora_dropout to the input of the whole DoRA "
            "update ('input' mode); further training in PEFT uses that semantics",
            stacklevel=3,
        )
    base_cfg = getattr(model, "config", None)
    name_or_path = getattr(base_cfg, "_name_or_path", None) or None
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": _task_type(model, saves, base_modules),
        "base_model_name_or_path": str(name_or_path) if name_or_path else None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": use_dora,
        "modules_to_save": saves or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern_keys(ranks, r, names),
        "alpha_pattern": _pattern_keys(alphas, alpha, names),
        "lora_bias": False,
        "target_parameters": None,
        "megatron_config": None,
        "layer_replication": None,
        "trainable_token_indices": None,
    }
    return peft_cfg, state


def save_peft_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the model's adapters as a PEFT directory that ``PeftModel.from_pretrained`` loads.

    Only its two files are written (each replaced atomically); other files there stay. Returns the path.
    """
    from safetensors.torch import save_file

    peft_cfg, state = peft_config_and_state(model)
    path = Path(path)
    config_text = json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n"
    return write_into_directory(path, {
        WEIGHTS_NAME: lambda f: save_file(state, str(f), metadata={"format": "pt", WRITER_KEY: WRITER}),
        CONFIG_NAME: lambda f: f.write_text(config_text, encoding="utf-8"),
    })
