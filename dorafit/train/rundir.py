"""The run folder of ``dorafit train``: checked and made before anything is written into it."""

from __future__ import annotations

import shutil
from pathlib import Path

from dorafit.train.config import TrainConfig, TrainConfigError


def prepare_output(out: Path, cfg: TrainConfig) -> None:
    """Refuse to overwrite a finished run (unless --overwrite) or to mix with another run."""
    if cfg.resume:
        if not (out / "config.yaml").is_file():
            raise TrainConfigError(f"--resume: {out} holds no run (no config.yaml)")
        if (out / "results.json").is_file():
            raise TrainConfigError(f"--resume: the run in {out} has already finished")
        return
    if out.exists() and any(out.iterdir()):
        is_run = (out / "config.yaml").is_file()
        if not cfg.overwrite:
            state = "a finished run" if (out / "results.json").is_file() else (
                "an unfinished run (continue it with --resume)" if is_run else "other files")
            raise TrainConfigError(f"output folder {out} already holds {state}; pass --overwrite to replace it")
        if not is_run:
            raise TrainConfigError(f"--overwrite: {out} is not a dorafit run folder (no config.yaml); not deleting it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
