"""Full fine-tuning as a method of the one recipe: ``dorafit train --method full``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dorafit.cli import main


def _args(model, files, out, *extra):
    return ["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
            "--method", "full", "--val-size", "8", "--batch-size", "8", "--epochs", "2", "--lr", "1e-3",
            "--max-length", "160", "--save-steps", "4", "--no-progress", "--threads", "1", "--max-test-rows", "6",
            "--max-new-tokens", "4", *extra]


def test_every_parameter_trains_and_the_run_keeps_a_plain_model(tiny_llama, arc_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(_args(tiny_llama, arc_files, out)) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "full" and results["trainable"] == results["total"]
    assert f"model             {out / 'model'}" in printed or str(out / "model") in printed
    assert not (out / "adapter").exists() and (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "model" / "task.json").read_text())["method"] == "full"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]  # it learned
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(tuned.parameters()))  # every parameter moved, embeddings and norms too
    assert tuned.config.use_cache is True  # the saved model generates as the original did
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out / "model"), "--data-dir", str(arc_files["dir"]), "--task", "ARC-Easy",
                 "--max-rows", "6", "--max-new-tokens", "4", "--no-progress", "--prompt-template", "paper",
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())[0]["accuracy"] == pytest.approx(results["accuracy_after"])


def test_a_stopped_full_run_resumes_to_the_same_weights(tiny_llama, arc_files, tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert main(_args(tiny_llama, arc_files, reference, "--no-eval-before")) == 0
    assert main(_args(tiny_llama, arc_files, stopped, "--no-eval-before", "--stop-after-steps", "4")) == 0
    assert not (stopped / "results.json").exists()
    assert not (stopped / "checkpoints" / "step-000004" / "adapter").exists()  # no adapter to write
    assert main(["train", "--resume", "--output", str(stopped), "--no-progress"]) == 0
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (reference, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_refuses_a_4bit_base(tiny_llama, arc_files, tmp_path, capsys):
    assert main(_args(tiny_llama, arc_files, tmp_path / "q", "--quantize", "nf4")) == 2
    assert "--method full trains every parameter" in capsys.readouterr().err
