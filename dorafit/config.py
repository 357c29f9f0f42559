"""AdapterConfig: the one description of which modules are adapted and how.

The same dataclass is the Python API, the saved ``adapter_config.json`` and (through the
training recipe) the command-line flags. It is validated on construction, so a bad value is
reported before any module of a model is touched: every value is type-checked (a string
"false" is not a boolean), numbers are finite and in range, every pattern is a valid regular
expression of bounded length, and unknown keys are refused with the closest known key. That
each pattern also matches a module of the model is checked by ``attach``, where config and
model meet. Messages show at most a short excerpt of a bad value, however large it is.

Module-name patterns come from files other people wrote (a downloaded adapter_config.json), so
matching them is bounded: they run on the ``regex`` engine with a time budget per pattern
(``MATCH_SECONDS`` over all of one model's module names, inside ``bounded_matching``), and a
pattern that exceeds it (catastrophic backtracking such as ``(a|aa)+``) is an error naming its
key. Without the ``regex`` package, patterns with nested repeats are refused up front instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import functools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from .files import brief

try:  # the engine that can stop a runaway match; a dependency of dorafit and of transformers
    import regex as _regex
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _regex = None

# Methods whose adapter layers exist. "lora" and "dora" share one code path (DoRA adds the
# magnitude and the norm), so the two are always measured on equal terms.
METHODS = ("lora", "dora", "vera", "dvora", "magnitude")
DROPOUT_MODES = ("input", "lowrank")
ADAPTER_DTYPES = ("float32", "base")


class ConfigError(ValueError):
    """A configuration that cannot describe a valid adapter."""


# Longest module-name pattern accepted, and the matching time one pattern may use over the module
# names of one model (a real pattern needs microseconds per name).
MAX_PATTERN_LENGTH = 10_000
MATCH_SECONDS = 1.0


# ---------------------------------------------------------------------------- value checks
# Shared by AdapterConfig and the training recipe's TrainConfig: each raises ``error`` with a
# message naming the key and the value, so a typo never turns into a silent default.


def did_you_mean(value: Any, choices) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''."""
    by_lower = {str(c).lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def check_bool(name: str, value: Any, error=ConfigError) -> None:
    if not isinstance(value, bool):
        hint = " (a string is not a boolean: write true or false without quotes)" if isinstance(value, str) else ""
        raise error(f"{name} must be true or false, got {brief(value)}{hint}")


def check_int(name: str, value: Any, minimum: Optional[int] = None, error=ConfigError) -> None:
    want = "a positive integer" if minimum == 1 else "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise error(f"{name} must be {want}, got {brief(value)}")


def _range_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "a number"


def check_number(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, error=ConfigError) -> None:
    """A finite int or float (not a bool, not a string) in [low, high] (open ends where asked)."""
    want = _range_text(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number{'' if want == 'a number' else ' ' + want}, got {brief(value)}")
    if not math.isfinite(value):
        raise error(f"{name} must be {'a finite number' if want == 'a number' else want + ' and finite'}, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high)):
        raise error(f"{name} must be {want}, got {brief(value)}")


def check_choice(name: str, value: Any, choices, error=ConfigError) -> None:
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) and len(value) < 100 else ""
        raise error(f"{name} must be one of {tuple(choices)}, got {brief(value)}{hint}")


def check_regex(name: str, pattern: Any, error=ConfigError) -> None:
    """A module-name pattern: a non-empty string of bounded length that compiles as a regular
    expression (and, without the ``regex`` engine to bound its matching, has no nested repeat)."""
    if not isinstance(pattern, str) or not pattern:
        raise error(f"{name}: pattern {brief(pattern)} must be a non-empty string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise error(f"{name}: pattern {brief(pattern)} is {len(pattern):,} characters long; at most "
                    f"{MAX_PATTERN_LENGTH:,} are accepted")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise error(f"{name}: pattern {brief(pattern)} is not a valid regex: {exc}") from None
    if _regex is None:
        problem = nested_repeat(pattern)
        if problem:
            raise error(f"{name}: pattern {brief(pattern)} {problem}, which can take exponential time to match; "
                        "rewrite it (e.g. list the module names) or install the regex package, which bounds matching")


def check_string_list(name: str, value: Any, error=ConfigError) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise error(f"{name} must be a list of non-empty strings, got {brief(value)}")


def check_unknown_keys(data: Dict[str, Any], known, what: str = "adapter config key", error=ConfigError) -> None:
    """Refuse keys not in ``known``, suggesting the closest known key for each."""
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = "".join(did_you_mean(k, known) for k in unknown[:3] if isinstance(k, str) and len(k) < 100)
        shown = brief(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise error(f"unknown {what}(s) {shown}{hints}; known: {', '.join(sorted(known))}")


def _check_patterns(name: str, patterns: Dict[str, Any], check_value) -> None:
    if not isinstance(patterns, dict):
        raise ConfigError(f"{name} must be a dict of module-name pattern -> value, got {brief(patterns)}")
    for pattern, value in patterns.items():
        check_regex(name, pattern)
        check_value(f"{name}[{brief(pattern)}]", value)


# ---------------------------------------------------------------------------- bounded matching


def nested_repeat(pattern: str) -> Optional[str]:
    """'nests a repeat inside a repeat' (or uses a backreference) when ``pattern`` has the shape that
    makes a backtracking engine take exponential time, such as ``([a-z.]+)+!``; else None."""
    try:
        from re import _parser as parser  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse as parser  # type: ignore[no-redef]
    constants = parser  # the opcode names are re-exported by the parser module

    def walk(items, inside_repeat: bool) -> Optional[str]:
        for op, av in items:
            if op in (constants.MAX_REPEAT, constants.MIN_REPEAT, getattr(constants, "POSSESSIVE_REPEAT", None)):
                low, high, sub = av
                repeats = high is constants.MAXREPEAT or high > 1
                if repeats and inside_repeat:
                    return "nests a repeat inside a repeat"
                found = walk(sub, inside_repeat or repeats)
            elif op is constants.SUBPATTERN:
                found = walk(av[-1], inside_repeat)
            elif op is constants.BRANCH:
                found = next((p for p in (walk(b, inside_repeat) for b in av[1]) if p), None)
            elif op in (constants.ASSERT, constants.ASSERT_NOT) or op is getattr(constants, "ATOMIC_GROUP", None):
                found = walk(av[-1] if isinstance(av, tuple) else av, inside_repeat)
            elif op in (constants.GROUPREF, getattr(constants, "GROUPREF_EXISTS", None)):
                found = "uses a backreference"
            else:
                found = None
            if found:
                return found
        return None

    try:
        return walk(parser.parse(pattern), False)
    except Exception:  # an unparsable pattern is refused by re.compile already
        return None


# Seconds each pattern has used in the current ``bounded_matching`` block ({} outside one: every
# call then has the whole budget).
_spent: contextvars.ContextVar[Optional[Dict[str, float]]] = contextvars.ContextVar("dorafit_match_spent", default=None)


@contextlib.contextmanager
def bounded_matching() -> Iterator[None]:
    """Within the block, each pattern may spend ``MATCH_SECONDS`` in all on matching module names
    (attach, load and analysis wrap their matching in one block per model)."""
    if _spent.get() is not None:  # an outer block already counts
        yield
        return
    token = _spent.set({})
    try:
        yield
    finally:
        _spent.reset(token)


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    if _regex is not None:
        try:
            return _regex.compile(pattern, flags=_regex.VERSION0)
        except Exception:  # a construct only ``re`` knows: fall back to it (refused if nested)
            pass
    return re.compile(pattern)


def match_pattern(pattern: str, text: str, key: str = "pattern", how: str = "fullmatch"):
    """``re.<how>(pattern, text)`` (how: "fullmatch", "match" or "search"), bounded in time: a
    ConfigError naming ``key`` when the pattern exhausts its budget (see ``bounded_matching``)."""
    compiled = _compiled(pattern)
    if _regex is None or not isinstance(compiled, _regex.Pattern):  # no time limit: only shapes that cannot explode
        problem = nested_repeat(pattern)
        if problem:
            raise ConfigError(f"{key}: pattern {brief(pattern)} {problem}, which can take exponential time to match; "
                              "rewrite it or install the regex package, which bounds matching")
        return getattr(compiled, how)(text)
    spent = _spent.get()
    used = spent.get(pattern, 0.0) if spent is not None else 0.0
    started = time.perf_counter()
    try:
        return getattr(compiled, how)(text, timeout=max(MATCH_SECONDS - used, 1e-3))
    except TimeoutError:
        raise ConfigError(
            f"{key}: pattern {brief(pattern)} needs more than {MATCH_SECONDS:g} s to match this model's module names "
            "(catastrophic backtracking, e.g. overlapping alternatives or nested repeats); rewrite it or list the "
            "module names") from None
    finally:
        if spent is not None:
            spent[pattern] = used + time.perf_counter() - started


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
        for name in ("targets", "exclude", "modules_to_save"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        check_choice("method", self.method, METHODS)
        check_int("rank", self.rank, minimum=1)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check_choice("dropout_mode", self.dropout_mode, DROPOUT_MODES)
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        for name in ("rslora", "detach_norm", "save_vera_matrices"):
            check_bool(name, getattr(self, name))
        if not isinstance(self.targets, list) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"targets must be a non-empty list of module-name patterns, got {brief(self.targets)}")
        check_string_list("exclude", self.exclude)
        check_string_list("modules_to_save", self.modules_to_save)
        for name in ("targets", "exclude"):
            for pattern in getattr(self, name):
                if pattern != "all-linear":
                    check_regex(name, pattern)
        _check_patterns("rank_pattern", self.rank_pattern, lambda key, v: check_int(key, v, minimum=1))
        _check_patterns("alpha_pattern", self.alpha_pattern, lambda key, v: check_number(key, v, low=0, low_open=True))
        _check_patterns("method_pattern", self.method_pattern, lambda key, v: check_choice(key, v, METHODS))
        check_int("vera_seed", self.vera_seed)
        check_number("vera_d_init", self.vera_d_init)
        if self.vera_d_init == 0:
            # d = 0 together with b = 0 makes every gradient of d and b zero: VeRA would never train.
            raise ConfigError(f"vera_d_init must be a non-zero number (the VeRA paper uses 0.1), got {self.vera_d_init!r}")

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
        check_unknown_keys(data, [f.name for f in dataclasses.fields(cls)])
        return cls(**data)


def pattern_matches(pattern: str, name: str, key: str = "pattern") -> bool:
    """True when ``pattern`` names module ``name``: exactly, as a dotted suffix, or as a full regex
    (bounded in time: see ``match_pattern``; ``key`` names the pattern's option in errors)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return match_pattern(pattern, name, key) is not None
    except re.error:  # AdapterConfig refuses such patterns; other callers may pass plain names
        return False


def lookup_pattern(patterns: Dict[str, Any], name: str, default: Any, key: str = "pattern") -> Any:
    """The value of the first pattern that matches ``name`` (longest pattern first), else default."""
    for pattern in sorted(patterns, key=len, reverse=True):
        if pattern_matches(pattern, name, key):
            return patterns[pattern]
    return default


def resolve_module_options(config: AdapterConfig, name: str) -> Dict[str, Any]:
    """method, rank, alpha and scaling for module ``name`` after the per-module patterns."""
    method = lookup_pattern(config.method_pattern, name, config.method, "method_pattern")
    rank = int(lookup_pattern(config.rank_pattern, name, config.rank, "rank_pattern"))
    alpha = float(lookup_pattern(config.alpha_pattern, name, config.alpha, "alpha_pattern"))
    return {"method": method, "rank": rank, "alpha": alpha, "scaling": config.scaling_for(rank, alpha)}

