"""Two CPU processes (torchrun, gloo): DDP and FSDP2 runs end with the adapter of a single
process run with the same global batch (max abs difference <= 1e-5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dorafit.cli import main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def _args(model, files, out, batch_size, *extra):
    return ["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
            "--val-size", "8", "--batch-size", str(batch_size), "--grad-accum", "2", "--epochs", "1",
            "--lr", "5e-3", "--max-length", "160", "--save-steps", "3", "--no-progress", "--threads", "1",
            "--no-eval-before", "--max-test-rows", "4", "--max-new-tokens", "2", *extra]


def _torchrun(args, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "dorafit", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, tiny_llama, arc_files, tmp_path):
    single = tmp_path / "single"
    assert main(_args(tiny_llama, arc_files, single, 8)) == 0
    multi = tmp_path / mode
    done = _torchrun(_args(tiny_llama, arc_files, multi, 4, "--distributed", mode), ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]  # the ranks' own errors come first
    # Only rank 0 prints the result table.
    assert done.stdout.count("accuracy after") == 1
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(multi / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    # The checkpoints hold the full (gathered) adapter and optimizer state.
    last = sorted((multi / "checkpoints").iterdir())[-1]
    state = load_file(str(last / "trainable.safetensors"))
    assert all(state[k].shape == a[k].shape for k in a if k in state)
