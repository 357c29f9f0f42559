"""The embedded default (``dorafit train`` with no options) in a reduced form: fewer rows.

Real all-MiniLM-L6-v2, real ARC-Easy rows shipped with dorafit, fixed seed. Training must
lower the validation loss and raise the test accuracy over the untrained model.
"""

from __future__ import annotations

import json

import pytest

from dorafit.cli import main

pytestmark = pytest.mark.slow

# Fewer rows than the default run; the other options are the defaults.
REDUCED = ["--max-train-rows", "352", "--val-size", "32", "--max-test-rows", "200"]


def test_reduced_default_improves_over_the_untrained_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *REDUCED, "--output", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "accuracy before" in table and "accuracy after" in table
    results = json.loads((out / "results.json").read_text())
    assert results["model_kind"] == "similarity" and results["test_rows"] == 200
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0
    assert results["best_val_loss"] < log[0]["val_loss"]
    assert results["accuracy_after"] > results["accuracy_before"] > 0.25
