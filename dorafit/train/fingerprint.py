"""What a run was started on, so that ``--resume`` continues that run and no other.

At the start of a new run, rank 0 records in ``<run>/fingerprint.json`` the size and sha256 of
every file the run reads: each file of the model folder (weights, config, tokenizer) and each
data file (every file of a data folder). ``--resume`` computes them again and refuses, listing
what changed, when a file was added, removed or changed: continuing with other weights or other
rows would report one run that is really two.

Cost: each file is read once at the start (about a second per GB). On resume a file whose
size, modification time and inode equal the recorded ones is taken as unchanged without reading
it again; any other file is hashed anew, so a file rewritten with the same bytes still passes.
A hub model or dataset (``hf://``) is recorded by its name only. A run started before dorafit
kept fingerprints resumes with a note saying that its inputs could not be checked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from dorafit.files import read_json_object, sha256_file, write_json_atomic
from dorafit.train.config import TrainConfigError

FINGERPRINT_NAME = "fingerprint.json"
VERSION = 1


def _files_of(path: Path) -> List[Path]:
    """The files a source consists of: the file itself, or every file under a folder (hidden
    folders such as .git or .cache skipped)."""
    if path.is_file():
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in sorted(names) if (Path(root) / n).is_file()]
    return found


def _describe(path: Path, previous: Optional[Dict[str, dict]] = None) -> Dict[str, dict]:
    """{relative name: {size, mtime_ns, inode, sha256}} of a source's files; a file whose stat
    equals its entry in ``previous`` keeps that entry's sha256 without being read."""
    base = path if path.is_dir() else path.parent
    out = {}
    for f in _files_of(path):
        st = f.stat()
        name = str(f.relative_to(base))
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        old = (previous or {}).get(name)
        if isinstance(old, dict) and all(old.get(k) == v for k, v in entry.items()) and "sha256" in old:
            entry["sha256"] = old["sha256"]
        else:
            entry["sha256"] = sha256_file(f)
        out[name] = entry
    return out


def collect(sources: Dict[str, Optional[str]], previous: Optional[dict] = None) -> Dict[str, dict]:
    """{label: {"path", "files"}} for local sources, {label: {"name"}} for others (hub ids)."""
    out = {}
    for label, source in sources.items():
        if not source:
            continue
        path = Path(source)
        if path.exists():
            old = ((previous or {}).get(label) or {}).get("files")
            out[label] = {"path": str(path.resolve()), "files": _describe(path, old if isinstance(old, dict) else None)}
        else:
            out[label] = {"name": str(source)}
    return out


def changes(saved: Dict[str, dict], current: Dict[str, dict]) -> List[str]:
    """What differs between two ``collect`` results, one short phrase per change."""
    found = []
    for label in sorted(set(saved) | set(current)):
        old, new = saved.get(label), current.get(label)
        if old is None or new is None:
            found.append(f"{label} {'added' if old is None else 'no longer given'}")
            continue
        if "files" not in old or "files" not in new:
            if old.get("name") != new.get("name") or ("files" in old) != ("files" in new):
                found.append(f"{label} {old.get('name') or old.get('path')} -> {new.get('name') or new.get('path')}")
            continue
        before, after = old["files"], new["files"]
        for name in sorted(set(before) | set(after)):
            a, b = before.get(name), after.get(name)
            if a is None:
                found.append(f"{label}: {name} is new")
            elif b is None:
                found.append(f"{label}: {name} is gone")
            elif a.get("sha256") != b.get("sha256"):
                size = "" if a.get("size") == b.get("size") else f", {a.get('size'):,} -> {b.get('size'):,} bytes"
                found.append(f"{label}: {name} changed{size}")
    return found


def record(out: Path, sources: Dict[str, Optional[str]]) -> None:
    """Write the fingerprint of a new run's inputs into its folder."""
    write_json_atomic(Path(out) / FINGERPRINT_NAME, {"version": VERSION, "inputs": collect(sources)})


def check(out: Path, sources: Dict[str, Optional[str]]) -> Optional[str]:
    """Refuse (TrainConfigError) a resume whose inputs differ from the recorded ones, listing the
    changes; returns a note when the run has no fingerprint to check against, else None. The stat
    part of the fingerprint is brought up to date (a touched but equal file is not hashed twice)."""
    path = Path(out) / FINGERPRINT_NAME
    if not path.is_file():
        return f"note: {out} holds no {FINGERPRINT_NAME} (a run started by an older dorafit); its model and data " \
               "could not be checked against the ones it started with"
    saved = read_json_object(path, TrainConfigError).get("inputs")
    if not isinstance(saved, dict):
        raise TrainConfigError(f"{path}: damaged (no \"inputs\" object); not resuming a run whose inputs cannot be checked")
    current = collect(sources, saved)
    found = changes(saved, current)
    if found:
        shown = "; ".join(found[:8]) + (f"; and {len(found) - 8} more" if len(found) > 8 else "")
        raise TrainConfigError(
            f"--resume: the inputs of the run in {out} changed since it started ({shown}); continuing would mix "
            "two runs. Put the original files back, or start a new run (--overwrite or another --output)")
    write_json_atomic(path, {"version": VERSION, "inputs": current})
    return None


def record_or_check(out: Path, resume: bool, sources: Dict[str, Optional[str]], info) -> None:
    """On rank 0: a new run (or a resumed one with no checkpoint yet) records its fingerprint; a
    resumed one is checked against it and then names this process in its marker. Every rank
    raises the same TrainConfigError."""
    from dorafit.train import distributed as dist_utils
    from dorafit.train.checkpoint import list_checkpoints
    from dorafit.train.rundir import mark_running

    error = None
    if info.is_main:
        try:
            note = check(out, sources) if resume and list_checkpoints(Path(out) / "checkpoints") else record(out, sources)
            if note:
                print(note, file=sys.stderr, flush=True)
            if resume:
                mark_running(out)  # every check passed: the folder now names this process
        except TrainConfigError as err:
            error = str(err)
    error = dist_utils.broadcast_object(error, info)
    if error:
        raise TrainConfigError(error)
