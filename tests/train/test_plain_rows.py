"""Rows written as context and continuation (--prompt-template plain) and runs without a test
evaluation (--no-test): what an experiment that scores the result itself trains with."""

from __future__ import annotations

import json

from dorafit.cli import main
from dorafit.eval.examples import build_prompt


def test_plain_prompt_is_the_instruction_itself():
    assert build_prompt("plain", "Question: Which gas?\nAnswer:") == "Question: Which gas?\nAnswer:"
    assert build_prompt("plain", "Context", "more") == "Context\n\nmore"


def test_training_on_context_and_continuation_rows_without_test(tiny_llama, arc_files, tmp_path):
    rows = [{"instruction": f"Question: what is {i} plus one?\nAnswer:", "input": "", "output": f" {i + 1}"}
            for i in range(40)]
    data = tmp_path / "plain.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama), "--data", str(data), "--prompt-template", "plain",
                 "--response-format", "paper", "--no-test", "--val-size", "8", "--batch-size", "8",
                 "--epochs", "2", "--lr", "5e-3", "--output", str(out), "--no-progress", "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_rows"] == 0 and results["accuracy_after"] is None and results["loglik_after"] is None
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
