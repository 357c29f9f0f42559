"""Two CPU processes (torchrun, gloo): DDP and FSDP2 runs end with the adapter of a single
process run with the same global batch (max abs difference <= 1e-5); a sharded FSDP2 run killed
with SIGKILL and resumed ends bit for bit where the uninterrupted one did."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dorafit.cli import main
from dorafit.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def _args(model, files, out, batch_size, *extra):
    return ["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
            "--val-size", "8", "--batch-size", str(batch_size), "--grad-accum", "2", "--epochs", "1",
            "--lr", "5e-3", "--max-length", "160", "--save-steps", "3", "--no-progress", "--threads", "1",
            "--no-eval-before", "--max-test-rows", "4", "--max-new-tokens", "2", *extra]


def _torchrun_command(args, processes: int = 2) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--standalone", "--nproc_per_node", str(processes), "-m", "dorafit", *args]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(args, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_command(args, processes), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _like_one_process(tiny_llama, arc_files, tmp_path, batch_size, distributed, *extra,
                      processes: int = 2, tp_size: int = 0) -> tuple[Path, Path]:
    """A one-process run (batch 8) and a ``processes``-process ``--distributed`` run
    (``batch_size`` rows per data-parallel replica; ``--tp-size`` when given) with the same
    ``extra`` options: their run folders, once the multi-process run printed one result table
    (rank 0's) and trained the one-process adapter within 1e-5."""
    single = tmp_path / "single"
    assert main(_args(tiny_llama, arc_files, single, 8, *extra)) == 0
    multi = tmp_path / distributed
    split = ["--tp-size", str(tp_size)] if tp_size else []
    done = _torchrun(_args(tiny_llama, arc_files, multi, batch_size, "--distributed", distributed, *split, *extra),
                     ROOT, processes)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]  # the ranks' own errors come first
    assert done.stdout.count("accuracy after") == 1
    assert _max_diff(_adapter(single), _adapter(multi)) <= 1e-5
    return single, multi


def test_ddp_matches_one_process(tiny_llama, arc_files, tmp_path):
    single, multi = _like_one_process(tiny_llama, arc_files, tmp_path, 4, "ddp")
    # The checkpoints hold the full adapter and optimizer state, written by rank 0.
    last = sorted((multi / "checkpoints").iterdir())[-1]
    state = load_file(str(last / "trainable.safetensors"))
    assert state and all(t.shape == _adapter(single)[k].shape for k, t in state.items() if k in _adapter(single))


def test_fsdp_matches_one_process_and_resumes_bit_for_bit_after_kill(tiny_llama, arc_files, tmp_path):
    single, whole = _like_one_process(tiny_llama, arc_files, tmp_path, 4, "fsdp", "--save-steps", "2")
    # Each process wrote its own shard (torch.distributed.checkpoint), and the folder records
    # every file's sha256; no whole-tensor files.
    last = ckpt.list_checkpoints(whole / "checkpoints")[0]
    shards = sorted(p.name for p in (last / ckpt.SHARDS).iterdir())
    assert len(shards) == 2 and not (last / "trainable.safetensors").exists()
    loaded = ckpt.load_checkpoint(last)
    assert {k.split(":", 1)[1] for k in loaded["shards"]} >= {f"model.{k}" for k in _names(single)}
    # Beside the shards, the checkpoint's adapter folder holds whole tensors (written by rank 0).
    in_checkpoint = load_file(str(last / "adapter" / "adapter_model.safetensors"))
    assert {k: t.shape for k, t in in_checkpoint.items()} == {k: t.shape for k, t in _adapter(single).items()}

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_command(_args(tiny_llama, arc_files, killed, 4, "--distributed", "fsdp",
                                                    "--save-steps", "2")),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        # SIGKILL to torchrun and both ranks as soon as the first checkpoint exists.
        while not (killed / "checkpoints" / "step-000002").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun starts its ranks in sessions of their own
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before the kill"
    done = _torchrun(["train", "--resume", "--output", str(killed), "--no-progress"], ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-8000:]
    assert "resumed from" in done.stdout
    a, b = _adapter(whole), _adapter(killed)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_tensor_parallel_matches_one_process_and_writes_sharded_checkpoints(tiny_llama, arc_files, tmp_path):
    """--distributed tp: every process holds half of each split layer (the model's plan) and sees
    every row; the adapter equals a one-process run's, the checkpoints hold a shard per process,
    and a run stopped after its first checkpoint resumes to the same adapter bit for bit."""
    _, tp = _like_one_process(tiny_llama, arc_files, tmp_path, 8, "tp", "--save-steps", "2")
    last = ckpt.list_checkpoints(tp / "checkpoints")[0]
    assert len(list((last / ckpt.SHARDS).iterdir())) == 2 and not (last / "trainable.safetensors").exists()
    # Stopped after its first checkpoint and resumed from the shards: bit for bit the whole run.
    stopped = tmp_path / "tp-stopped"
    done = _torchrun(_args(tiny_llama, arc_files, stopped, 8, "--distributed", "tp", "--save-steps", "2",
                           "--stop-after-steps", "2"), ROOT)
    assert done.returncode == 0 and not (stopped / "adapter").exists(), done.stderr[-4000:]
    done = _torchrun(["train", "--resume", "--output", str(stopped), "--no-progress"], ROOT)
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stdout[-3000:] + done.stderr[-6000:]
    a, b = _adapter(tp), _adapter(stopped)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_fsdp_by_tensor_parallel_on_4_processes_matches_one_process(tiny_llama, arc_files, tmp_path):
    """--distributed fsdp --tp-size 2 on 4 processes: 2 data-parallel replicas (4 rows each) of 2
    tensor-parallel ranks on a 2-D mesh. The adapter equals a one-process run's; each of the 4
    processes wrote its own shard of the checkpoints; the final adapter is one whole file."""
    single, mesh = _like_one_process(tiny_llama, arc_files, tmp_path, 4, "fsdp", "--save-steps", "2", processes=4,
                                     tp_size=2)
    last = ckpt.list_checkpoints(mesh / "checkpoints")[0]
    assert len(list((last / ckpt.SHARDS).iterdir())) == 4 and not (last / "trainable.safetensors").exists()
    assert sorted(p.name for p in (mesh / "adapter").iterdir()) == sorted(p.name for p in (single / "adapter").iterdir())


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _names(run: Path) -> list[str]:
    """Trainable parameter names of a one-process run's checkpoint."""
    return list(load_file(str(ckpt.list_checkpoints(run / "checkpoints")[0] / "trainable.safetensors")))


def test_processes_form_a_data_by_tensor_mesh():
    from dorafit.train.distributed import DistInfo, Parallel, ParallelError

    fsdp_tp = Parallel(DistInfo(rank=3, world_size=4), "fsdp", tp_size=2)
    assert (fsdp_tp.replicas, fsdp_tp.tp, fsdp_tp.replica, fsdp_tp.sharded) == (2, 2, 1, True)
    tp = Parallel(DistInfo(rank=1, world_size=2), "tp")  # every process shares each layer
    assert (tp.replicas, tp.tp, tp.replica) == (1, 2, 0)
    assert Parallel(DistInfo(rank=1, world_size=2), "fsdp").tp == 1
    with pytest.raises(ParallelError, match="--tp-size 2 does not divide the 3 processes"):
        Parallel(DistInfo(world_size=3), "tp", tp_size=2)


def test_tp_size_needs_a_mode_that_splits_layers():
    from dorafit.train.config import TrainConfig, TrainConfigError

    with pytest.raises(TrainConfigError, match="tp_size 2 needs --distributed tp or fsdp"):
        TrainConfig(tp_size=2)
    assert TrainConfig(distributed="tp", tp_size=2).tp_size == 2
