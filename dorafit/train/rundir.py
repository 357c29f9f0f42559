"""The run folder of ``dorafit train``: created with a marker, never mixed with other files, and
locked while a run uses it.

``prepare_output(out, cfg)`` runs before anything is written:
- the run folder is never an input: not the model folder or a data file, not inside the model
  folder, not holding an input (``files.check_output_apart``), and never a link;
- ``--resume`` needs a run folder that dorafit made (its marker file, ``files.MARKER_NAME``)
  with config.yaml, not finished;
- a new run needs ``out`` absent or empty;
- ``--overwrite`` replaces only a run folder dorafit made, recognised by the marker written
  here when the folder is created. It removes only the entries a run writes (``RUN_ENTRIES``),
  says which, and keeps anything else found there;
- a folder another process is running in is refused, naming that process: the run holds an
  exclusive ``fcntl.flock`` on the folder itself for as long as it runs, and its marker records
  the process id. The kernel drops the lock when the process ends, however it ends (a kill -9
  included), so nothing stale ever blocks a later run.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path

from dorafit.files import MARKER_NAME, OutputPathError, check_output_apart, read_marker, read_marker_data, \
    write_marker
from dorafit.train.config import TrainConfig, TrainConfigError

RUN_KIND = "run"
# What a run writes into its folder (see dorafit.train.trainer); --overwrite removes these only.
RUN_ENTRIES = ("config.yaml", "checkpoints", "best", "adapter", "model", "log.jsonl", "predictions.json", "results.json",
               "fingerprint.json", MARKER_NAME)

# {run folder: open descriptor of the folder, holding its lock} of the runs this process holds.
_held: dict[Path, int] = {}
# Run folders this process created (for ``abandon_new_run``).
_created: set[Path] = set()


class RunStopped(ValueError):
    """A run stopped before its end (Ctrl-C, a full disk); the message says where it stopped, what
    is intact and how ``--resume`` continues."""


def stop_message(out: Path, why: str, step: int | None) -> str:
    """'<why>: stopped at step N; ...' naming the checkpoint ``--resume`` continues from."""
    from dorafit.train.checkpoint import last_good

    where = f"stopped at step {step}" if step is not None else "stopped before training began"
    last = last_good(Path(out) / "checkpoints")
    if last is not None:
        then = f"nothing was lost: {last.name} is intact, and --resume --output {out} continues from it"
    elif (Path(out) / "config.yaml").is_file():
        then = f"no checkpoint was written yet: --resume --output {out} starts the run again from step 0"
    else:
        then = "nothing was written"
    free = "; free some space first" if "disk" in why else ""
    return f"{why}: {where}; {then}{free}"


def _inputs(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(flag, path) of the run's inputs (those that do not exist on disk are skipped later)."""
    return [("--" + option.replace("_", "-"), getattr(cfg, option)) for option in
            ("model", "data", "test_data", "val_data", "data_dir") if getattr(cfg, option)]


def _refuse_inputs_inside(out: Path, cfg: TrainConfig) -> None:
    try:
        check_output_apart(out, _inputs(cfg), "--output")
    except OutputPathError as err:
        raise TrainConfigError(str(err)) from None


# ---------------------------------------------------------------------------- the lock


def _holder(out: Path) -> str:
    """'process 1234 on host, started ...' as the run's marker records it."""
    data = read_marker_data(out)
    pid, host, started = data.get("pid"), data.get("host"), data.get("started")
    if not isinstance(pid, int):
        return "another process"
    return f"process {pid}" + (f" on {str(host)[:64]}" if host else "") + (f", started {str(started)[:32]}" if started else "")


def _try_lock(out: Path) -> int | None:
    """A descriptor of folder ``out`` holding its exclusive lock, or None while another process holds it."""
    import fcntl

    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _in_use(out: Path) -> TrainConfigError:
    return TrainConfigError(f"--output {out} is in use by a running dorafit train ({_holder(out)}); wait for it to "
                            "finish or stop it, or choose another --output")


def refuse_if_running(out: Path) -> None:
    """Refuse ``out`` when a dorafit run holds its lock, naming that process."""
    if out in _held:
        return
    fd = _try_lock(out)
    if fd is None:
        raise _in_use(out)
    os.close(fd)


def lock_run(out: Path) -> None:
    """Take the run folder's lock for this process (until ``release_run``), or refuse naming its holder."""
    if out in _held:
        return
    fd = _try_lock(out)
    if fd is None:
        raise _in_use(out)
    _held[out] = fd


def mark_running(out: Path) -> None:
    """The run's marker, naming the process that now uses the folder."""
    write_marker(out, RUN_KIND, pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))


def abandon_new_run(out: Path) -> None:
    """Undo a new run that stopped before its first step (bad data, a model that does not load,
    Ctrl-C while loading): remove what it wrote, and its folder if it made it and it is now empty.
    Nothing else is touched, and nothing once a checkpoint exists."""
    out = Path(out)
    if read_marker(out) != RUN_KIND or (out / "checkpoints").exists():
        return
    for name in ("config.yaml", "fingerprint.json", "log.jsonl", MARKER_NAME):
        entry = out / name
        if entry.is_file() and not entry.is_symlink():
            entry.unlink()
    if out in _created and not any(out.iterdir()):
        out.rmdir()
    _created.discard(out)


def release_run(out: Path) -> None:
    """Drop this process's lock on ``out`` (the lock file stays: it says who ran there last)."""
    fd = _held.pop(Path(out), None)
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------------------- the folder


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


def _state(out: Path) -> str:
    if (out / "results.json").is_file():
        return "a finished run"
    if (out / "config.yaml").is_file():
        return "an unfinished run (continue it with --resume)"
    return "other files"


def prepare_output(out: Path, cfg: TrainConfig) -> None:
    """Check that ``out`` may receive this run, make it a marked run folder and lock it for this
    process (rank 0 only; ``release_run`` gives the lock back). A resumed run's folder is only
    locked here: it is marked (``mark_running``) after the resume's other checks, so a refused
    resume changes no file."""
    out = Path(out)
    _refuse_inputs_inside(out, cfg)
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"--output {out} is a file, not a folder")
    if out.is_symlink():
        raise TrainConfigError(f"--output {out} is a symbolic link (to {os.readlink(out)}); dorafit never writes "
                               "through a link: give the real folder")
    if out.is_dir():
        refuse_if_running(out)
    if cfg.resume:
        if not (out / "config.yaml").is_file():
            raise TrainConfigError(f"--resume: {out} holds no run (no config.yaml)")
        if read_marker(out) != RUN_KIND:
            raise TrainConfigError(f"--resume: {out} is not a dorafit run folder (no {MARKER_NAME} marker); "
                                   "nothing to resume there")
        lock_run(out)
        if (out / "results.json").is_file():
            release_run(out)
            raise TrainConfigError(f"--resume: the run in {out} has already finished")
        return  # marked by ``mark_running`` once every check of the resume has passed
    if out.is_dir() and any(out.iterdir()):
        is_run = read_marker(out) == RUN_KIND
        if not cfg.overwrite:
            raise TrainConfigError(f"output folder {out} already holds {_state(out)}; pass --overwrite to replace it")
        if not is_run:
            raise TrainConfigError(f"--overwrite: {out} is not a dorafit run folder (no {MARKER_NAME} marker); "
                                   "not deleting anything in it; choose another --output or empty it yourself")
        lock_run(out)
        _remove_run(out)
    else:
        if not out.exists():
            _created.add(out)
        out.mkdir(parents=True, exist_ok=True)
        lock_run(out)
        if any(out.iterdir()):  # another run got here between the check and the lock
            release_run(out)
            raise TrainConfigError(f"output folder {out} was filled by another process while this run started; "
                                   "choose another --output")
    mark_running(out)
