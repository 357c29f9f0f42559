"""The run folder: --overwrite replaces only what a dorafit run wrote, in a folder carrying its marker."""

from __future__ import annotations

import hashlib
import json

import pytest

from dorafit.cli import main
from dorafit.files import MARKER_NAME, read_marker, write_marker
from dorafit.train.config import TrainConfig, TrainConfigError
from dorafit.train.rundir import prepare_output


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_folder_gets_the_marker(tmp_path):
    out = tmp_path / "runs" / "a"
    prepare_output(out, TrainConfig(output=str(out)))
    assert read_marker(out) == "run" and (out / MARKER_NAME).is_file()


def test_overwrite_removes_only_run_entries_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    prepare_output(out, TrainConfig(output=str(out)))
    for name in ("config.yaml", "log.jsonl", "results.json"):
        (out / name).write_text("x")
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "adapter").mkdir()
    (out / "my-notes.md").write_text("the user's own notes")
    prepare_output(out, TrainConfig(output=str(out), overwrite=True))
    printed = capsys.readouterr().out
    assert "--overwrite: removed config.yaml, checkpoints/, adapter/, log.jsonl, results.json" in printed
    assert "kept files dorafit did not write: my-notes.md" in printed
    assert (out / "my-notes.md").read_text() == "the user's own notes"
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "my-notes.md"]


@pytest.mark.parametrize("contents", [{"config.yaml": "rank: 8\n", "results.json": "{}"}, {"notes.txt": "mine"}])
def test_overwrite_refuses_a_folder_without_the_marker(tmp_path, contents):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in contents.items():
        (out / name).write_text(text)
    before = _hashes(out)
    with pytest.raises(TrainConfigError, match=f"not a dorafit run folder \\(no {MARKER_NAME} marker\\)"):
        prepare_output(out, TrainConfig(output=str(out), overwrite=True))
    assert _hashes(out) == before


def test_output_that_is_a_file_or_holds_the_data_is_refused(tmp_path):
    data = tmp_path / "project" / "train.json"
    data.parent.mkdir()
    data.write_text("[]")
    with pytest.raises(TrainConfigError, match="overlaps --data"):
        prepare_output(tmp_path / "project", TrainConfig(output=str(tmp_path / "project"), data=str(data), overwrite=True))
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(TrainConfigError, match="is a file, not a folder"):
        prepare_output(afile, TrainConfig(output=str(afile)))
    assert data.read_text() == "[]" and afile.read_text() == "x"


def test_output_below_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder would go")
    assert main(["train", "--output", str(blocker / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dorafit train: error:") and "results/run" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "a file where a folder would go"


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(TrainConfigError, match="holds no run"):
        prepare_output(tmp_path, TrainConfig(output=str(tmp_path), resume=True))
    (tmp_path / "config.yaml").write_text(json.dumps({}))
    with pytest.raises(TrainConfigError, match="is not a dorafit run folder"):  # a config.yaml of the user's
        prepare_output(tmp_path, TrainConfig(output=str(tmp_path), resume=True))
    write_marker(tmp_path, "run")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(TrainConfigError, match="already finished"):
        prepare_output(tmp_path, TrainConfig(output=str(tmp_path), resume=True))
