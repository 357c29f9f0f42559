"""Bad input stops ``dorafit train`` before training with a message naming the problem."""

from __future__ import annotations

import json


from dorafit.cli import main


def _train(model, files, out, *extra):
    return main(["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
                 "--val-size", "8", "--batch-size", "8", "--epochs", "1", "--max-length", "160",
                 "--no-progress", "--threads", "1", "--no-eval-before", "--max-test-rows", "4",
                 "--max-new-tokens", "2", *extra])


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_missing_file_unknown_task_and_target(tiny_llama, arc_files, tmp_path, capsys):
    assert _train(tiny_llama, arc_files, tmp_path / "a", "--data", str(tmp_path / "nope.json")) == 2
    assert "nope.json: no such file" in _error(capsys)
    assert _train(tiny_llama, arc_files, tmp_path / "b", "--task", "mmlu") == 2
    assert "unknown task 'mmlu'" in _error(capsys)
    assert _train(tiny_llama, arc_files, tmp_path / "c", "--targets", "query_proj") == 2
    assert "match no module" in _error(capsys)
    assert _train(tiny_llama, arc_files, tmp_path / "d", "--max-length", "20") == 2
    assert "max length 20 truncates every example" in _error(capsys)


def test_malformed_row_is_named(tiny_llama, arc_files, tmp_path, capsys):
    rows = json.loads(arc_files["train"].read_text())
    rows[6]["output"] = None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    assert _train(tiny_llama, arc_files, tmp_path / "run", "--data", str(bad)) == 2
    assert "bad.json: row 7: missing or empty 'output'" in _error(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _train(tiny_llama, arc_files, tmp_path / "run2", "--data", str(empty)) == 2
    assert "empty" in _error(capsys)


def test_finished_run_is_not_overwritten(tiny_llama, arc_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_llama, arc_files, out, "--lr", "1e-3") == 0
    assert _train(tiny_llama, arc_files, out) == 2
    assert "already holds a finished run; pass --overwrite" in _error(capsys)
    assert _train(tiny_llama, arc_files, out, "--overwrite") == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert _train(tiny_llama, arc_files, other, "--overwrite") == 2
    assert "not a dorafit run folder" in _error(capsys)
    assert (other / "notes.txt").read_text() == "keep me"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_llama, arc_files, tmp_path, capsys):
    out = tmp_path / "run"
    # A learning rate this large sends the weights to inf after the warm-up steps. Without
    # validation rows the first sign of it is the training loss.
    code = _train(tiny_llama, arc_files, out, "--lr", "1e38", "--warmup-steps", "3", "--save-steps", "1",
                  "--max-grad-norm", "0", "--epochs", "3", "--val-size", "0")
    assert code == 1
    err = _error(capsys)
    assert "loss is nan" in err or "loss is inf" in err
    assert "last good checkpoint is" in err
    assert not (out / "results.json").exists()


def test_non_finite_validation_loss_stops_before_saving(tiny_llama, arc_files, tmp_path, capsys):
    out = tmp_path / "run"
    # The same run with validation rows: the first step already gives a NaN validation loss,
    # and nothing of that step may be saved, neither best/ nor a checkpoint.
    code = _train(tiny_llama, arc_files, out, "--lr", "1e38", "--warmup-steps", "3", "--save-steps", "1",
                  "--max-grad-norm", "0", "--epochs", "3")
    assert code == 1
    err = _error(capsys)
    assert "validation loss is nan after step 1" in err
    assert "no good checkpoint was written yet" in err
    assert not (out / "best").exists() and not list((out / "checkpoints").glob("step-*"))
    assert not (out / "results.json").exists()


def test_remote_code_needs_the_flag(tiny_llama, arc_files, tmp_path, capsys):
    from conftest import copy_folder

    model = copy_folder(tiny_llama, tmp_path / "remote")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoConfig": "custom.MyConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    assert _train(model, arc_files, tmp_path / "run") == 2
    assert "--trust-remote-code" in _error(capsys)
