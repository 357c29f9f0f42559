"""A run folder as users hit it: locked while a run uses it, resumed only with the model and data it
started with, and stopped by Ctrl-C or a full disk with one line naming the step ``--resume``
continues from. Every refusal leaves every file of the run as it was."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from dorafit.cli import main
from dorafit.train import trainer
from dorafit.train.config import TrainConfig, TrainConfigError
from dorafit.train.rundir import mark_running, prepare_output, release_run
from tmpfs import small_tmpfs

ROOT = Path(__file__).resolve().parents[2]


def _args(model, files, out, *extra):
    return ["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
            "--val-size", "8", "--batch-size", "8", "--epochs", "1", "--lr", "5e-3", "--max-length", "160",
            "--save-steps", "2", "--no-progress", "--threads", "1", "--no-eval-before", "--max-test-rows", "4",
            "--max-new-tokens", "2", *extra]


def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dorafit train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------- the lock


def _hold(out: str, ready, done) -> None:
    """A run in progress: the folder prepared, locked and marked, until ``done`` is set."""
    prepare_output(Path(out), TrainConfig(output=out))
    ready.set()
    done.wait(60)


def test_a_running_folder_is_refused_naming_the_process(tiny_llama, arc_files, tmp_path, capsys):
    out = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out), ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        (out / "config.yaml").write_text("rank: 16\n")  # what the running one has written so far
        before = _hashes(out)
        for extra in ([], ["--overwrite"]):
            assert main(_args(tiny_llama, arc_files, out, *extra)) == 2
            line = _error_line(capsys)
            assert f"--output {out} is in use by a running dorafit train (process {holder.pid} on " in line
        assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 2
        assert f"is in use by a running dorafit train (process {holder.pid}" in _error_line(capsys)
        assert _hashes(out) == before
    finally:
        done.set()
        holder.join()
    # The holder ended: the kernel dropped its lock, nothing stale blocks the folder.
    prepare_output(out, TrainConfig(output=str(out), overwrite=True))
    release_run(out)


def _race(out: str, go, results, done) -> None:
    go.wait(60)
    try:
        prepare_output(Path(out), TrainConfig(output=out))
        results.put("won")
    except TrainConfigError as err:
        results.put(str(err))
    done.wait(60)


def test_two_runs_starting_in_one_new_folder_never_both_get_it(tmp_path):
    """Four processes start a run in the same new folder at the same moment, 15 times over:
    exactly one gets it each time; the others are refused (in use, or filled by another)."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(15):
        out = tmp_path / f"run{round_}"
        go, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(out), go, results, done)) for _ in range(4)]
        for p in procs:
            p.start()
        go.set()
        got = [results.get(timeout=60) for _ in procs]
        done.set()
        for p in procs:
            p.join()
        assert got.count("won") == 1, got
        assert all("in use by a running dorafit train" in g or "filled by another process" in g or
                   "already holds" in g for g in got if g != "won"), got


# ---------------------------------------------------------------------------- the fingerprint


def test_resume_refuses_a_changed_model_or_data_and_names_them(tiny_llama, arc_files, tmp_path, capsys):
    import shutil

    model = shutil.copytree(tiny_llama, tmp_path / "model")
    out = tmp_path / "run"
    assert main(_args(model, arc_files, out, "--stop-after-steps", "2")) == 0
    assert json.loads((out / "fingerprint.json").read_text())["inputs"]["model"]["files"]["model.safetensors"]["sha256"]
    capsys.readouterr()
    before = _hashes(out)
    train_file = arc_files["train"]
    original_rows = train_file.read_bytes()
    rows = json.loads(original_rows)
    rows[5]["output"] = "the correct answer is answer1"
    train_file.write_text(json.dumps(rows))
    weights = load_file(str(model / "model.safetensors"))
    original_weights = (model / "model.safetensors").read_bytes()
    key = sorted(weights)[0]
    weights[key] = weights[key] + 1e-3
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "--resume: the inputs of the run" in line and "changed since it started" in line
    assert "model: model.safetensors changed" in line and "training data: train.json changed" in line
    assert _hashes(out) == before  # nothing of the run touched
    # The same bytes again (new modification times): the fingerprint holds, the run continues.
    train_file.write_bytes(original_rows)
    (model / "model.safetensors").write_bytes(original_weights)
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    assert (out / "results.json").is_file()


# ---------------------------------------------------------------------------- Ctrl-C, a full disk, stale folders


def test_ctrl_c_stops_with_the_step_and_resume_continues(tiny_llama, arc_files, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_llama, arc_files, out, "--save-steps", "1", "--epochs", "3")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dorafit", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while not (out / "checkpoints" / "step-000002").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("dorafit train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted: stopped at step" in lines[0] and "is intact, and --resume --output" in lines[0]
    assert not (out / "results.json").exists()
    assert not list((out / "checkpoints").glob(".*"))  # no half-written checkpoint
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    assert (out / "results.json").is_file()


@pytest.fixture()
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "small", "4m") as mount:
        yield mount


def test_a_full_disk_during_a_checkpoint_loses_nothing_and_resume_continues(tiny_llama, arc_files, small_disk,
                                                                             monkeypatch, capsys):
    out = small_disk / "run"
    filler = small_disk / "filler"
    real = trainer.save_checkpoint

    def fill_then_save(run, state):
        if state.step == 4:  # the disk fills up just before the second checkpoint
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
        return real(run, state)

    monkeypatch.setattr(trainer, "save_checkpoint", fill_then_save)
    assert main(_args(tiny_llama, arc_files, out)) == 2
    line = _error_line(capsys)
    assert "the disk is full (no space left on the device while writing" in line
    assert "stopped at step 4; nothing was lost: step-000002 is intact, and --resume --output" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    filler.unlink()
    monkeypatch.undo()
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    assert (out / "results.json").is_file()


def test_a_stale_deleting_folder_is_cleaned_and_never_fatal(tiny_llama, arc_files, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_llama, arc_files, out, "--save-steps", "1", "--stop-after-steps", "3")) == 0
    # A prune killed between its rename and its delete, for a checkpoint the next prune removes again.
    stale = out / "checkpoints" / ".step-000001.deleting"
    (stale / "inner").mkdir(parents=True)
    (stale / "inner" / "trainable.safetensors").write_bytes(b"half")
    (out / "checkpoints" / "step-000001").mkdir()
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [n for n in names if "deleting" in n] and len(names) == 2


def test_a_marked_run_folder_names_its_process(tmp_path):
    out = tmp_path / "run"
    prepare_output(out, TrainConfig(output=str(out)))
    try:
        marker = json.loads((out / ".dorafit-folder.json").read_text())
        assert marker["kind"] == "run" and marker["pid"] == os.getpid()
        mark_running(out)
    finally:
        release_run(out)
