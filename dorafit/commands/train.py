"""``dorafit train``: fine-tune a model with an adapter; with no options, the embedded default.

Options come from TrainConfig (flags, or a YAML file with --config; flags win). With
--resume the run folder's saved config.yaml is the starting point instead of the defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "fine-tune a model with an adapter (default: DoRA on SmolLM2-135M-Instruct, ARC-Easy)"


def add_arguments(parser) -> None:
    from dorafit.train.config import add_config_arguments

    add_config_arguments(parser)


def run(args) -> int:
    import dorafit
    from dorafit.loading import check_local_model
    from dorafit.train.checkpoint import CheckpointError
    from dorafit.train.config import TrainConfigError, config_from_args, load_yaml_file
    from dorafit.train.data import DataError
    from dorafit.train.models import ModelError
    from dorafit.train.trainer import TrainingError, train

    try:
        base = None
        if getattr(args, "resume", False):
            output = getattr(args, "output", "")
            saved = Path(output) / "config.yaml" if output else None
            if saved is None or not saved.is_file():
                raise TrainConfigError(f"--resume needs --output pointing at a run folder with config.yaml (got {output!r})")
            base, _ = load_yaml_file(saved, "--resume:")  # bounded: size, depth, no aliases
            if not isinstance(base, dict):
                raise TrainConfigError(f"{saved}: expected a mapping of option -> value, got {type(base).__name__}")
            # Run-control options of the first invocation do not carry over.
            base.update(resume=True, overwrite=False, stop_after_steps=0)
        cfg = config_from_args(args, base=base)
        check_local_model(cfg.model)
        train(cfg)
    except (TrainConfigError, DataError, ModelError, dorafit.ConfigError, dorafit.AdapterError,
            CheckpointError, FileNotFoundError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"dorafit train: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"dorafit train: stopped: {err}", file=sys.stderr)
        return 1
    return 0
