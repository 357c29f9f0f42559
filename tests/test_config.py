"""AdapterConfig: validation with clear messages, dict round trip, per-module patterns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dorafit import AdapterConfig, ConfigError
from dorafit.config import pattern_matches, resolve_module_options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), r"rank must be a positive integer, got 0"),
        (dict(rank=-3), r"rank must be a positive integer, got -3"),
        (dict(rank=2.5), r"rank must be a positive integer"),
        (dict(rank=True), r"rank must be a positive integer"),
        (dict(alpha=0), r"alpha must be > 0, got 0"),
        (dict(alpha=-1.0), r"alpha must be > 0"),
        (dict(alpha=float("nan")), r"alpha must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(dropout=float("nan")), r"dropout must be in \[0, 1\)"),
        (dict(method="qlora"), r"method must be one of .*'qlora'"),
        (dict(dropout_mode="output"), r"dropout_mode must be one of"),
        (dict(adapter_dtype="float16"), r"adapter_dtype must be one of"),
        (dict(targets=[]), r"targets must be a non-empty list"),
        (dict(targets=[""]), r"targets must be a non-empty list"),
        (dict(targets=["q_proj("]), r"not a valid regex"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        (dict(rank_pattern={"q_proj": 2.5}), r"rank_pattern\['q_proj'\]"),
        (dict(alpha_pattern={"q_proj": -2}), r"alpha_pattern\['q_proj'\] must be > 0"),
        (dict(method_pattern={"mlp": "foo"}), r"method_pattern\['mlp'\] must be one of"),
        (dict(rank_pattern=["q_proj"]), r"rank_pattern must be a dict"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**kwargs)


def test_defaults_and_string_targets():
    cfg = AdapterConfig(targets="query", exclude="x", modules_to_save="classifier")
    assert cfg.targets == ["query"] and cfg.exclude == ["x"] and cfg.modules_to_save == ["classifier"]
    assert cfg.method == "dora" and cfg.detach_norm is True and cfg.dropout_mode == "input"
    assert cfg.adapter_dtype == "float32"


def test_scaling_for():
    assert AdapterConfig(rank=8, alpha=16).scaling_for(8, 16) == pytest.approx(2.0)
    assert AdapterConfig(rank=8, alpha=16, rslora=True).scaling_for(16, 16) == pytest.approx(16 / math.sqrt(16))


def test_dict_and_json_round_trip():
    cfg = AdapterConfig(
        method="lora", rank=4, alpha=8, targets=["q", "v"], rank_pattern={"v": 2}, alpha_pattern={"q": 4.0},
        dropout=0.1, dropout_mode="lowrank", rslora=True, detach_norm=False,
    )
    again = AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_rejects_unknown_keys():
    d = AdapterConfig().to_dict()
    d["lora_rank"] = 4
    with pytest.raises(ConfigError, match=r"unknown adapter config key\(s\) \['lora_rank'\]"):
        AdapterConfig.from_dict(d)
    with pytest.raises(ConfigError, match="JSON object"):
        AdapterConfig.from_dict(["rank", 4])


def test_pattern_matching_rules():
    name = "model.layers.0.self_attn.q_proj"
    assert pattern_matches("q_proj", name)  # dotted suffix
    assert pattern_matches("self_attn.q_proj", name)
    assert pattern_matches(name, name)  # exact
    assert pattern_matches(r".*layers\.0\..*proj", name)  # full regex
    assert not pattern_matches("proj", name)  # not a partial word
    assert not pattern_matches("q_pro", name)
    assert not pattern_matches("layers", name)  # not a prefix


def test_resolve_module_options_longest_pattern_wins():
    cfg = AdapterConfig(rank=8, alpha=16, rank_pattern={"proj": 2, "q_proj": 4}, alpha_pattern={"v_proj": 1.0})
    q = resolve_module_options(cfg, "layers.0.q_proj")
    assert q["rank"] == 4 and q["alpha"] == 16 and q["scaling"] == pytest.approx(4.0)
    v = resolve_module_options(cfg, "layers.0.v_proj")
    assert v["rank"] == 8 and v["alpha"] == 1.0 and v["scaling"] == pytest.approx(1 / 8)


# ---------------------------------------------------------------------------- every value type-checked


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rslora="false"), r"rslora must be true or false, got 'false' \(a string is not a boolean"),
        (dict(detach_norm=0), r"detach_norm must be true or false, got 0"),
        (dict(save_vera_matrices="yes"), r"save_vera_matrices must be true or false"),
        (dict(rank="8"), r"rank must be a positive integer, got '8'"),
        (dict(rank=True), r"rank must be a positive integer, got True"),
        (dict(rank=-2), r"rank must be a positive integer, got -2"),
        (dict(alpha="16"), r"alpha must be a number > 0, got '16'"),
        (dict(alpha=float("inf")), r"alpha must be > 0 and finite, got inf"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
        (dict(dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
        (dict(method="DoRA"), r"method must be one of .* got 'DoRA' \(did you mean 'dora'\?\)"),
        (dict(dropout_mode="low_rank"), r"got 'low_rank' \(did you mean 'lowrank'\?\)"),
        (dict(rank_pattern={"q_proj(": 4}), r"rank_pattern: pattern 'q_proj\(' is not a valid regex"),
        (dict(method_pattern={"[mlp": "magnitude"}), r"method_pattern: pattern '\[mlp' is not a valid regex"),
        (dict(alpha_pattern={"*proj": 8}), r"alpha_pattern: pattern '\*proj' is not a valid regex"),
        (dict(alpha_pattern={"q_proj": float("inf")}), r"alpha_pattern\['q_proj'\] must be > 0 and finite, got inf"),
        (dict(alpha_pattern={"q_proj": float("nan")}), r"alpha_pattern\['q_proj'\] must be > 0 and finite, got nan"),
        (dict(rank_pattern={"q_proj": True}), r"rank_pattern\['q_proj'\] must be a positive integer, got True"),
        (dict(exclude=["(unclosed"]), r"exclude: pattern '\(unclosed' is not a valid regex"),
        (dict(targets=5), r"targets must be a non-empty list"),
        (dict(modules_to_save=[3]), r"modules_to_save must be a list of non-empty strings, got \[3\]"),
        (dict(vera_seed=1.5), r"vera_seed must be an integer, got 1.5"),
        (dict(vera_d_init=float("nan")), r"vera_d_init must be a finite number, got nan"),
    ],
)
def test_every_value_is_type_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**kwargs)


def test_unknown_key_suggests_the_known_one():
    with pytest.raises(ConfigError, match=r"\['rslora_'\] \(did you mean 'rslora'\?\)"):
        AdapterConfig.from_dict({"rslora_": True})


def test_pattern_that_matches_no_module_lists_the_modules():
    from torch import nn

    import dorafit

    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8))
    model.add_module("v_proj", nn.Linear(8, 8))
    cases = [
        (dict(targets=["q_proj", "k_proj"]), r"targets entry 'k_proj' matches no module; modules: q_proj, v_proj"),
        (dict(targets=["q_proj"], rank_pattern={"v_proj": 2}),
         r"rank_pattern key 'v_proj' matches none of the adapted modules: q_proj"),
        (dict(targets=["q_proj", "v_proj"], method_pattern={"mlp": "magnitude"}),
         r"method_pattern key 'mlp' matches none of the adapted modules: q_proj, v_proj"),
        (dict(targets=["q_proj"], alpha_pattern={r"layers\.0\..*": 4.0}), r"alpha_pattern key 'layers"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            dorafit.attach(model, AdapterConfig(rank=2, **kwargs))
        assert type(model.q_proj) is nn.Linear and not dorafit.adapter_modules(model)  # untouched
    dorafit.attach(model, AdapterConfig(rank=2, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}))
    assert model.v_proj.rank == 4


# ---------------------------------------------------------------------------- bounded patterns


class Named(torch.nn.Module):
    """A module tree whose names are long runs of one letter: the input that makes overlapping
    alternatives such as (a|aa)+ backtrack exponentially."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("a" * 44 + "_", torch.nn.Linear(4, 4))
        self.add_module("q_proj", torch.nn.Linear(4, 4))


@pytest.mark.parametrize("key", ["targets", "exclude", "rank_pattern", "alpha_pattern", "method_pattern",
                                 "modules_to_save"])
def test_a_pattern_that_backtracks_without_end_is_an_error_naming_its_key(key, monkeypatch):
    """Matching is bounded in time: (a|aa)+ against a 45-letter name would take hours unbounded."""
    import time

    import dorafit
    from dorafit import config

    monkeypatch.setattr(config, "MATCH_SECONDS", 0.2)  # the budget, shortened for the test

    hostile = "(a|aa)+"
    kwargs = {"targets": ["q_proj", "a+_"]}
    if key in ("targets", "exclude", "modules_to_save"):
        kwargs[key] = kwargs.get(key, []) + [hostile] if key == "targets" else [hostile]
    else:
        kwargs[key] = {hostile: {"rank_pattern": 2, "alpha_pattern": 4.0, "method_pattern": "lora"}[key]}
    cfg = AdapterConfig(**kwargs)
    model = Named()
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^{key}: pattern '\(a\|aa\)\+' needs more than 0.2 s to match"):
        dorafit.attach(model, cfg)
    assert time.perf_counter() - started < 10
    assert not dorafit.adapter_modules(model)  # nothing attached


def test_the_issue_pattern_is_answered_at_once():
    """([a-z_.0-9]+)+! over module names: answered quickly (no match) instead of hanging."""
    import time

    started = time.perf_counter()
    assert not pattern_matches("([a-z_.0-9]+)+!", "model.layers.10.self_attn.q_proj" * 3, "targets")
    assert time.perf_counter() - started < 1


def test_without_the_regex_engine_nested_repeats_are_refused_up_front(monkeypatch):
    from dorafit import config

    monkeypatch.setattr(config, "_regex", None)
    config._compiled.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"targets: pattern '\(\[a-z_\.0-9\]\+\)\+!' nests a repeat inside a repeat"):
            AdapterConfig(targets=["([a-z_.0-9]+)+!"])
        with pytest.raises(ConfigError, match="uses a backreference"):
            AdapterConfig(rank_pattern={r"(q)\1": 4})
        AdapterConfig(targets=[r"(.*\.)?q_proj", r"layers\.\d+\.mlp", "q_proj|v_proj"])  # ordinary ones pass
    finally:
        config._compiled.cache_clear()


def test_messages_never_print_unbounded_values():
    huge = "x" * 5_000_000
    for kwargs in (dict(method=huge), dict(targets=[huge + "("]), dict(rank=[1] * 1_000_000),
                   dict(rank_pattern={huge: 0}), dict(dropout=huge)):
        with pytest.raises(ConfigError) as err:
            AdapterConfig(**kwargs)
        assert len(str(err.value)) < 600, (list(kwargs), len(str(err.value)))
    with pytest.raises(ConfigError, match="characters long"):
        AdapterConfig(targets=["q" * 20_000])
    with pytest.raises(ConfigError) as err:
        AdapterConfig.from_dict({f"unknown_{i}": 1 for i in range(100_000)})
    assert len(str(err.value)) < 1000 and "and 99995 more" in str(err.value)
