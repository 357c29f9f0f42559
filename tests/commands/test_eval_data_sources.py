"""dorafit eval --data with a datasets.save_to_disk folder scores the same rows as the JSON file;
a folder that is no data set and an unsplit DatasetDict are one-line errors."""

from __future__ import annotations

import json

import pytest
from cli_models import ARC, adapter, tiny_model  # noqa: F401 (fixtures)
from test_cli_errors import one_line_error, run_cli

datasets = pytest.importorskip("datasets")


def test_eval_reads_a_saved_dataset_dict(tiny_model, adapter, tmp_path, capsys):
    rows = json.loads((ARC / "test.json").read_text())[:6]
    data = tmp_path / "test.json"
    data.write_text(json.dumps(rows))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows),
                          "train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(saved))
    base = ["eval", "--adapter", adapter, "--no-progress", "--max-new-tokens", "4", "--batch-size", "6"]
    results = {}
    for name, extra in {"json": ["--data", data], "flag": ["--data", saved, "--data-split", "test"],
                        "suffix": ["--data", f"{saved}:test"]}.items():
        out = tmp_path / f"{name}.json"
        code, err = run_cli(capsys, *base, *extra, "--json", out)
        assert code == 0, err
        results[name] = json.loads(out.read_text())[0]
    assert results["json"]["rows"] == 6
    assert results["flag"] == results["json"] and results["suffix"] == results["json"]

    one_line_error(*run_cli(capsys, *base, "--data", saved), "eval", "holds the splits test, train")
    one_line_error(*run_cli(capsys, *base, "--data-split", "test"), "eval", "--data-split picks a split of --data")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "readme.txt").write_text("no data here")
    one_line_error(*run_cli(capsys, *base, "--data", tmp_path / "plain"), "eval",
                   "neither a datasets.save_to_disk folder nor holds a data file")
