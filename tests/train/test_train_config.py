"""TrainConfig: validation, YAML files (unknown keys refused), flags winning, --help text."""

from __future__ import annotations

import argparse

import pytest

from dorafit.train.config import TrainConfig, TrainConfigError, add_config_arguments, config_from_args, field_docs


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser, parser.parse_args(argv)


def test_flags_win_over_yaml_over_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rank: 4\nlr: 0.01\ntargets: [q_proj]\ngradient-checkpointing: true\n")
    _, args = _parse(["--config", str(yaml_file), "--lr", "0.5", "--no-gradient-checkpointing"])
    cfg = config_from_args(args)
    assert cfg.rank == 4 and cfg.lr == 0.5 and cfg.targets == ["q_proj"] and cfg.gradient_checkpointing is False
    assert cfg.alpha == TrainConfig().alpha


def test_unknown_yaml_key_and_bad_values(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rnak: 4\n")
    _, args = _parse(["--config", str(yaml_file)])
    with pytest.raises(TrainConfigError, match=r"c.yaml, line 1: unknown option\(s\) \['rnak'\] \(did you mean 'rank'\?\)"):
        config_from_args(args)
    with pytest.raises(TrainConfigError, match="rank must be > 0"):
        TrainConfig(rank=0)
    with pytest.raises(TrainConfigError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(TrainConfigError, match="prompt_template must be one of .* got 'caht' \\(did you mean 'chat'\\?\\)"):
        TrainConfig(prompt_template="caht")
    with pytest.raises(TrainConfigError, match="response_format must be one of .* got 'choices' \\(did you mean 'choice'\\?\\)"):
        TrainConfig(response_format="choices")
    with pytest.raises(TrainConfigError, match="--resume needs --output"):
        TrainConfig(resume=True)


def test_attribute_docstrings_are_the_help():
    docs = field_docs(TrainConfig)
    assert docs["rank"] == "Rank r of the low-rank update."
    parser, _ = _parse([])
    assert "Rank r of the low-rank update." in parser.format_help()
    assert set(docs) == set(TrainConfig.__dataclass_fields__)
