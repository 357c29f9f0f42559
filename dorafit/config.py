"""AdapterConfig: the one description of which modules are adapted and how.

The same dataclass is the Python API, the saved ``adapter_config.json`` and (through the
training recipe) the command-line flags. It is validated on construction, so a bad value is
reported before any module of a model is touched.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# Methods whose adapter layers exist. "lora" and "dora" share one code path (DoRA adds the
# magnitude and the norm), so the two are always measured on equal terms.
METHODS = ("lora", "dora", "vera", "dvora", "magnitude")
DROPOUT_MODES = ("input", "lowrank")
ADAPTER_DTYPES = ("float32", "base")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid adapter."""


def _check_patterns(name: str, patterns: Dict[str, Any], kind: type) -> None:
    if not isinstance(patterns, dict):
        raise ConfigError(f"{name} must be a dict of module-name pattern -> {kind.__name__}, got {patterns!r}")
    for pattern, value in patterns.items():
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{name}: pattern {pattern!r} must be a non-empty string")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}[{pattern!r}] must be a number, got {value!r}")


@dataclass
class AdapterConfig:
    """Which modules get an adapter, and the adapter's hyper-parameters."""

    method: str = "dora"
    """Adapter method: "lora", "dora", "vera", "dvora" or "magnitude" (DoRA training m only)."""
    rank: int = 8
    """Rank r of the low-rank update B A."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt: exact names, dotted suffixes, regular expressions (full match) or "all-linear"."""
    exclude: List[str] = field(default_factory=list)
    """Module names removed from the matches (same matching rules as targets)."""
    dropout: float = 0.0
    """Dropout probability on the adapter input (lora_dropout)."""
    dropout_mode: str = "input"
    """"input": dropout on the input of the whole DoRA update, as the official code and PEFT
    (costs a second base matmul in training when dropout > 0); "lowrank": on the B A path only."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank."""
    detach_norm: bool = True
    """Treat ||W0 + s B A|| as a constant in backward (paper section 4.3); False keeps the full gradient."""
    adapter_dtype: str = "float32"
    """dtype of the adapter parameters: "float32" (also for bf16/fp16 bases) or "base"."""
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: module-name pattern -> rank."""
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: module-name pattern -> alpha."""
    method_pattern: Dict[str, str] = field(default_factory=dict)
    """Per-module method overrides: module-name pattern -> method (e.g. MLP -> "magnitude")."""
    modules_to_save: List[str] = field(default_factory=list)
    """Modules (e.g. a classification head) kept fully trainable and saved with the adapter."""
    vera_seed: int = 0
    """Seed of the frozen random matrices shared by all VeRA / DVoRA layers."""
    vera_d_init: float = 0.1
    """Initial value of VeRA's trainable scaling vector d (the VeRA paper uses 0.1)."""
    save_vera_matrices: bool = False
    """Store VeRA's frozen matrices in the adapter file instead of regenerating them from the seed."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.targets = list(self.targets)
        self.exclude = list(self.exclude)
        self.modules_to_save = list(self.modules_to_save)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if self.alpha == float("inf"):
            raise ConfigError(f"alpha must be finite, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ConfigError(f"dropout_mode must be one of {DROPOUT_MODES}, got {self.dropout_mode!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"targets must be a non-empty list of module-name patterns, got {self.targets!r}")
        for pattern in self.targets + self.exclude:
            if pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as exc:
                    # Plain names are valid regexes; an invalid one is only usable as a literal name.
                    if not re.fullmatch(r"[\w.\-]+", pattern):
                        raise ConfigError(f"target pattern {pattern!r} is not a valid regex: {exc}") from None
        _check_patterns("rank_pattern", self.rank_pattern, int)
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
        _check_patterns("alpha_pattern", self.alpha_pattern, float)
        for pattern, alpha in self.alpha_pattern.items():
            if not alpha > 0:
                raise ConfigError(f"alpha_pattern[{pattern!r}] must be > 0, got {alpha!r}")
        if not isinstance(self.method_pattern, dict):
            raise ConfigError(f"method_pattern must be a dict of pattern -> method, got {self.method_pattern!r}")
        for pattern, method in self.method_pattern.items():
            if method not in METHODS:
                raise ConfigError(f"method_pattern[{pattern!r}] must be one of {METHODS}, got {method!r}")
        if isinstance(self.vera_seed, bool) or not isinstance(self.vera_seed, int):
            raise ConfigError(f"vera_seed must be an integer, got {self.vera_seed!r}")
        if isinstance(self.vera_d_init, bool) or not isinstance(self.vera_d_init, (int, float)) or self.vera_d_init == 0:
            # d = 0 together with b = 0 makes every gradient of d and b zero: VeRA would never train.
            raise ConfigError(f"vera_d_init must be a non-zero number (the VeRA paper uses 0.1), got {self.vera_d_init!r}")
        if not isinstance(self.save_vera_matrices, bool):
            raise ConfigError(f"save_vera_matrices must be true or false, got {self.save_vera_matrices!r}")

    def scaling_for(self, rank: int, alpha: float) -> float:
        """The update's scale s: alpha / rank, or alpha / sqrt(rank) for rsLoRA."""
        return alpha / rank**0.5 if self.rslora else alpha / rank

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AdapterConfig":
        """Build a config from a dict, rejecting keys this version does not know."""
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown adapter config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def pattern_matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` names module ``name``: exactly, as a dotted suffix, or as a full regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def lookup_pattern(patterns: Dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first pattern that matches ``name`` (longest pattern first), else default."""
    for pattern in sorted(patterns, key=len, reverse=True):
        if pattern_matches(pattern, name):
            return patterns[pattern]
    return default


def resolve_module_options(config: AdapterConfig, name: str) -> Dict[str, Any]:
    """method, rank, alpha and scaling for module ``name`` after the per-module patterns."""
    method = lookup_pattern(config.method_pattern, name, config.method)
    rank = int(lookup_pattern(config.rank_pattern, name, config.rank))
    alpha = float(lookup_pattern(config.alpha_pattern, name, config.alpha))
    return {"method": method, "rank": rank, "alpha": alpha, "scaling": config.scaling_for(rank, alpha)}

