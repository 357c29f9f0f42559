"""The run folder of ``dorafit train``: created with a marker, never mixed with other files.

``prepare_output(out, cfg)`` runs before anything is written:
- ``--resume`` needs a run folder with config.yaml that has not finished;
- a new run needs ``out`` absent or empty, and never equal to the model folder or a data file
  (or holding one of them);
- ``--overwrite`` replaces only a run folder dorafit made, recognised by the marker file
  (``dorafit.files.MARKER_NAME``) written here when the folder is created. It removes only the
  entries a run writes (``RUN_ENTRIES``), says which, and keeps anything else found there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dorafit.files import MARKER_NAME, is_same_or_inside, read_marker, write_marker
from dorafit.train.config import TrainConfig, TrainConfigError

RUN_KIND = "run"
# What a run writes into its folder (see dorafit.train.trainer); --overwrite removes these only.
RUN_ENTRIES = ("config.yaml", "checkpoints", "best", "adapter", "model", "log.jsonl", "predictions.json", "results.json",
               MARKER_NAME)


def _inputs(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """(option, path) of the run's inputs that exist on disk (a hub id is not a path)."""
    found = []
    for option in ("model", "data", "test_data", "val_data", "data_dir"):
        value = getattr(cfg, option)
        if value and Path(value).exists():
            found.append((option, Path(value)))
    return found


def _refuse_inputs_inside(out: Path, cfg: TrainConfig) -> None:
    for option, path in _inputs(cfg):
        if is_same_or_inside(path, out) or (option == "model" and is_same_or_inside(out, path)):
            raise TrainConfigError(
                f"--output {out} overlaps --{option.replace('_', '-')} {path}: the run folder must not be an "
                "input, lie inside the model folder or contain an input; choose another --output")


def _remove_run(out: Path) -> None:
    """Remove what a previous run wrote into ``out`` and print it; other files stay."""
    removed = []
    for name in RUN_ENTRIES:
        entry = out / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            removed.append(name + "/")
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
            removed.append(name)
    kept = sorted(p.name for p in out.iterdir())
    print(f"--overwrite: removed {', '.join(removed) or 'nothing'} from {out}"
          + (f" (kept files dorafit did not write: {', '.join(kept)})" if kept else ""), flush=True)


def prepare_output(out: Path, cfg: TrainConfig) -> None:
    """Check that ``out`` may receive this run and make it a marked run folder (rank 0 only)."""
    out = Path(out)
    _refuse_inputs_inside(out, cfg)
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--output {out} is a file, not a folder")
    if cfg.resume:
        if not (out / "config.yaml").is_file():
            raise TrainConfigError(f"--resume: {out} holds no run (no config.yaml)")
        if (out / "results.json").is_file():
            raise TrainConfigError(f"--resume: the run in {out} has already finished")
        return
    if out.exists() and any(out.iterdir()):
        is_run = read_marker(out) == RUN_KIND
        if not cfg.overwrite:
            state = "a finished run" if (out / "results.json").is_file() else (
                "an unfinished run (continue it with --resume)" if (out / "config.yaml").is_file() else "other files")
            raise TrainConfigError(f"output folder {out} already holds {state}; pass --overwrite to replace it")
        if not is_run:
            raise TrainConfigError(f"--overwrite: {out} is not a dorafit run folder (no {MARKER_NAME} marker); "
                                   "not deleting anything in it; choose another --output or empty it yourself")
        _remove_run(out)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, RUN_KIND)
