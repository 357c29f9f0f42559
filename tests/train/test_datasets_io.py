"""--data as a datasets.save_to_disk folder (Dataset or DatasetDict), a folder of data files or a
hub id: the rows equal the JSON file's and meet the same checks; bad sources are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dorafit.train import data as D
from dorafit.train.datasets_io import looks_like_hub_id, split_source

datasets = pytest.importorskip("datasets")

ARC = D.BUNDLED_DATA / "ARC-Easy"


@pytest.fixture(scope="module")
def arc_rows():
    return {split: json.loads((ARC / f"{split}.json").read_text())[:20] for split in ("train", "test")}


def test_saved_dataset_folder_reads_the_same_rows(arc_rows, tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(arc_rows["test"]).save_to_disk(str(folder))
    assert D.read_rows(folder) == arc_rows["test"]
    with pytest.raises(D.DataError, match="single saved Dataset"):
        D.read_rows(f"{folder}:test")
    data = tmp_path / "test.json"
    data.write_text(json.dumps(arc_rows["test"]))
    with pytest.raises(D.DataError, match="a data file has no splits; drop the split 'test'"):
        D.read_rows(data, split="test")


def test_saved_dataset_dict_needs_a_split_when_it_has_several(arc_rows, tmp_path, capsys):
    folder = tmp_path / "dd"
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in arc_rows.items()}).save_to_disk(str(folder))
    assert D.read_rows(f"{folder}:train") == arc_rows["train"]
    assert D.read_rows(folder, split="test") == arc_rows["test"]
    with pytest.raises(D.DataError, match=r"holds the splits test, train; choose one"):
        D.read_rows(folder)
    with pytest.raises(D.DataError, match=r"has no split 'validation'; its splits are test, train"):
        D.read_rows(folder, split="validation")
    with pytest.raises(D.DataError, match="names split 'train' but the split option says 'test'"):
        D.read_rows(f"{folder}:train", split="test")
    one = tmp_path / "one"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(arc_rows["test"])}).save_to_disk(str(one))
    assert D.read_rows(one) == arc_rows["test"]
    assert "using its only split 'test'" in capsys.readouterr().err


def test_rows_from_a_saved_dataset_meet_the_json_checks(arc_rows, tmp_path):
    rows = [dict(r) for r in arc_rows["test"]]
    rows[3]["answer"] = "answer9"
    folder = tmp_path / "bad"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    read = D.read_rows(folder)
    with pytest.raises(D.DataError, match=r"row 4: answer 'answer9' is not one of"):
        D.to_choice_examples(read, D.detect_format(read, folder), folder)


def test_folder_of_data_files_and_folders_that_are_neither(arc_rows, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "test.json").write_text(json.dumps(arc_rows["test"]))
    assert D.read_rows(files) == arc_rows["test"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(D.DataError, match=r"neither a datasets.save_to_disk folder nor holds a data file") as err:
        D.read_rows(empty)
    assert "\n" not in str(err.value)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """datasets' own cache as a hub download leaves it, offline: <cache>/<owner>___<name>/<config>/
    <version>/<hash>/ holding <name>-<split>.arrow and dataset_info.json (written here by the real
    parquet builder, then moved into that layout)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no folder named like the id next to the test

    def add(owner: str, name: str, splits: dict) -> None:
        files = {}
        for split, rows in splits.items():
            files[split] = str(tmp_path / f"{name}-{split}.parquet")
            datasets.Dataset.from_list(rows).to_parquet(files[split])
        builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name=name, data_files=files)
        builder.download_and_prepare()
        target = cache / f"{owner}___{name}" / "default" / "0.0.0" / "0123456789abcdef"
        target.parent.mkdir(parents=True)
        Path(builder.cache_dir).rename(target)

    return add


def test_hub_id_reads_the_offline_cache(arc_rows, offline_cache):
    offline_cache("someone", "arc_small", arc_rows)
    assert D.read_rows("hf://someone/arc_small:test") == arc_rows["test"]
    assert D.read_rows("hf://someone/arc_small", split="train") == arc_rows["train"]
    with pytest.raises(D.DataError, match=r"^hf://someone/arc_small: holds the splits test, train"):
        D.read_rows("hf://someone/arc_small")
    # Without hf:// the name is a path that does not exist: an error, never a hub lookup.
    with pytest.raises(D.DataError, match=r"someone/arc_small:test: no such file \(a dataset on the Hugging Face "
                                          r"hub is written hf://someone/arc_small:test\)"):
        D.read_rows("someone/arc_small:test")


def test_unknown_hub_id_offline_is_one_line(offline_cache, tmp_path):
    with pytest.raises(D.DataError, match=r"^hf://nobody/no_such_set: not a dataset on the hub or in its local cache") as err:
        D.read_rows("hf://nobody/no_such_set")
    assert "\n" not in str(err.value)
    with pytest.raises(D.DataError, match="no such file"):
        D.read_rows(tmp_path / "missing.json")


def test_source_names():
    assert split_source("hf://owner/name:test") == ("hf://owner/name", "test")
    assert split_source("hf://owner/name") == ("hf://owner/name", "")
    assert looks_like_hub_id("hf://owner/name") and looks_like_hub_id("hf://name")
    assert not looks_like_hub_id("owner/name") and not looks_like_hub_id("missing.json")
    assert not looks_like_hub_id("/abs/path")


def test_train_reads_train_and_test_splits_of_one_saved_dataset_dict(tiny_llama, arc_rows, tmp_path):
    from dorafit.cli import main

    folder = tmp_path / "dd"
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in arc_rows.items()}).save_to_disk(str(folder))
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama), "--data", f"{folder}:train", "--test-data", f"{folder}:test",
                 "--output", str(out), "--val-size", "4", "--batch-size", "8", "--max-length", "160",
                 "--max-test-rows", "4", "--max-new-tokens", "4", "--no-eval-before", "--no-progress",
                 "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["test_rows"] == 4
