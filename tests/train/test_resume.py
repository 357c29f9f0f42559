"""Checkpoints and --resume: a run killed with SIGKILL and resumed ends with the adapter of an
uninterrupted run; a damaged last checkpoint falls back to the previous one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dorafit.cli import main
from dorafit.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def _args(model, files, out, *extra):
    return ["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
            "--val-size", "8", "--batch-size", "4", "--grad-accum", "2", "--epochs", "3", "--lr", "5e-3",
            "--dropout", "0.1", "--max-length", "160", "--save-steps", "2", "--no-progress", "--threads", "1",
            "--no-eval-before", "--max-test-rows", "4", "--max-new-tokens", "2", *extra]


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_resume_after_kill_matches_uninterrupted_run(tiny_llama, arc_files, tmp_path):
    reference = tmp_path / "reference"
    assert main(_args(tiny_llama, arc_files, reference)) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dorafit", *_args(tiny_llama, arc_files, out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        # Kill as soon as the second checkpoint exists: mid-run, with more steps to go.
        while not (out / "checkpoints" / "step-000004").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "results.json").exists(), "the run finished before the kill"

    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    assert _max_diff(_adapter(reference), _adapter(out)) <= 1e-6
    resumed_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = json.loads((reference / "results.json").read_text())["steps"]
    # Records written after the last checkpoint by the killed run are dropped on resume.
    assert [r["step"] for r in resumed_log if "loss" in r] == list(range(1, steps + 1))


def test_damaged_last_checkpoint_falls_back_with_warning(tiny_llama, arc_files, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_llama, arc_files, out, "--stop-after-steps", "6")) == 0
    checkpoints = ckpt.list_checkpoints(out / "checkpoints")
    assert [c.name for c in checkpoints] == ["step-000006", "step-000004"]
    # Each checkpoint carries a loadable adapter next to the resumable state.
    assert (checkpoints[0] / "adapter" / "adapter_model.safetensors").is_file()
    weights = checkpoints[0] / "optimizer.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step-000006"):
        folder, loaded = ckpt.load_latest(out / "checkpoints")
    assert folder.name == "step-000004" and loaded["state"]["step"] == 4

    # The resumed run continues from step 4 and still matches an uninterrupted one.
    with pytest.warns(UserWarning, match="damaged"):
        assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    reference = tmp_path / "reference"
    assert main(_args(tiny_llama, arc_files, reference)) == 0
    assert _max_diff(_adapter(reference), _adapter(out)) <= 1e-6


def test_optimizer_state_roundtrip_by_name():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    names = ["weight", "bias"]
    tensors, groups = ckpt.optimizer_to_flat(opt, names)
    assert set(tensors) == {f"{n}::{k}" for n in names for k in ("step", "exp_avg", "exp_avg_sq")}
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    ckpt.optimizer_from_flat(fresh, names, tensors, groups)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert fresh.param_groups[0]["lr"] == 0.1
