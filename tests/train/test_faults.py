"""Numerical faults and changed options never reach a run's checkpoints.

A NaN gradient with a finite loss (injected by a gradient hook on one step's loss) stops the
run before the update, naming the step and the last checkpoint that verifies finite; a
checkpoint holding NaN is never resumed from; ``--resume`` refuses options that would change
the result and accepts those that do not.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dorafit.cli import main
from dorafit.train import checkpoint as ckpt
from dorafit.train import trainer
from dorafit.train.kinds import CausalLM


def _args(model, files, out, *extra):
    return ["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
            "--val-size", "8", "--batch-size", "8", "--epochs", "2", "--lr", "5e-3", "--max-length", "160",
            "--save-steps", "2", "--no-progress", "--threads", "1", "--no-eval-before", "--max-test-rows", "4",
            "--max-new-tokens", "2", *extra]


def _poison_gradient_at(monkeypatch, step_index: int) -> list:
    """Make every gradient of optimizer step ``step_index`` (1-based) NaN; the loss stays finite."""
    real = CausalLM.loss_sum
    seen = []

    def loss_sum(self, model, batch):
        loss = real(self, model, batch)
        if model.training and torch.is_grad_enabled():
            seen.append(float(loss))
            if len(seen) == step_index:  # one micro-batch per step in these runs
                loss.register_hook(lambda grad: grad * math.nan)
        return loss

    monkeypatch.setattr(CausalLM, "loss_sum", loss_sum)
    return seen


def _trainable(folder):
    return load_file(str(folder / "trainable.safetensors"))


def test_nan_gradient_with_finite_loss_stops_before_the_update(tiny_llama, arc_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    losses = _poison_gradient_at(monkeypatch, 3)
    assert main(_args(tiny_llama, arc_files, out)) == 1
    err = capsys.readouterr().err
    assert all(math.isfinite(x) for x in losses)  # the loss itself never was the problem
    assert "gradient norm is nan at step 3" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in err
    assert [c.name for c in ckpt.list_checkpoints(out / "checkpoints")] == ["step-000002"]
    assert all(torch.isfinite(t).all() for t in _trainable(out / "checkpoints" / "step-000002").values())
    assert not (out / "results.json").exists()
    # The log ends with the last finite step; resuming continues from the named checkpoint.
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 2
    monkeypatch.undo()
    assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] > 2


def _poison_checkpoint(folder) -> None:
    """Write NaN into a checkpoint's weights and re-record its checksum, as a run without the
    finite checks would have saved it."""
    state = json.loads((folder / "state.json").read_text())
    weights = _trainable(folder)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], math.nan)
    save_file(weights, str(folder / "trainable.safetensors"))
    state["sha256"]["trainable.safetensors"] = hashlib.sha256((folder / "trainable.safetensors").read_bytes()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))


def test_resume_never_picks_a_non_finite_checkpoint(tiny_llama, arc_files, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_llama, arc_files, out, "--stop-after-steps", "4")) == 0
    newest, older = ckpt.list_checkpoints(out / "checkpoints")
    _poison_checkpoint(newest)
    with pytest.raises(ckpt.CheckpointError, match="non-finite values"):
        ckpt.load_checkpoint(newest)
    assert ckpt.last_good(out / "checkpoints") == older
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint {newest}"):
        assert main(["train", "--resume", "--output", str(out), "--no-progress"]) == 0
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


def test_resume_refuses_options_that_change_the_result(tiny_llama, arc_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_llama, arc_files, out, "--stop-after-steps", "2")) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    code = main(["train", "--resume", "--output", str(out), "--lr", "1e-2", "--seed", "3", "--rank", "4",
                 "--method", "lora", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    for change in ("lr 0.005 -> 0.01", "seed 0 -> 3", "rank 16 -> 4", "method 'dora' -> 'lora'"):
        assert change in err
    assert "progress" not in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # nothing touched
    # Options that do not change what is computed are accepted.
    assert main(["train", "--resume", "--output", str(out), "--no-progress", "--threads", "1",
                 "--keep-checkpoints", "3"]) == 0
    assert (out / "results.json").is_file()


def test_the_list_of_options_a_resume_may_change_is_explicit():
    from dorafit.train.config import TrainConfig

    fields = set(TrainConfig().to_dict())
    assert trainer.RESUME_MAY_CHANGE <= fields  # no stale names
    for name in ("lr", "seed", "model", "data", "rank", "method", "batch_size", "grad_accum", "epochs",
                 "warmup_steps", "max_grad_norm", "val_size", "targets", "precision", "quantize"):
        assert name not in trainer.RESUME_MAY_CHANGE
