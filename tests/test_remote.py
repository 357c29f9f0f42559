"""What you name is what is loaded: only hf://owner/name reaches the hub; a path that does not
exist is an error saying how to ask for the hub, never a lookup of whoever owns that name."""

from __future__ import annotations

import pytest

import dorafit
from dorafit import remote
from dorafit.train.models import ModelError, resolve_model_path


@pytest.fixture
def no_hub(monkeypatch):
    """Every hub call fails the test: none may happen for a name without hf://."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"hub called with {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.mark.parametrize("name", ["runs/best", "best", "someone/adapter", "./runs/best", "/nowhere/at/all", "a/b/c"])
def test_a_missing_adapter_path_is_never_a_hub_id(no_hub, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(dorafit.AdapterFileError, match=rf"^adapter path {name} does not exist"):
        remote.resolve_adapter_path(name)
    hint = remote.looks_like_repo_id(name)
    with pytest.raises(dorafit.AdapterFileError) as err:
        dorafit.load_adapter(torch_model(), name)
    assert ("write hf://" in str(err.value)) == hint


@pytest.mark.parametrize("name", ["runs/base", "base", "someone/model", "/nowhere/model"])
def test_a_missing_model_path_is_never_a_hub_id(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=rf"^model folder {name} does not exist"):
        resolve_model_path(name)


def test_hf_prefix_names_the_hub_and_only_it(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kwargs):
        calls.append(repo_id)
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert remote.resolve_adapter_path("hf://someone/adapter") == tmp_path / "snapshot"
    assert remote.resolve_model_source("hf://someone/model") == "someone/model"
    assert calls == ["someone/adapter"]
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "adapter").mkdir()
    monkeypatch.chdir(tmp_path)
    assert remote.resolve_adapter_path("someone/adapter") == tmp_path.joinpath("someone/adapter").relative_to(tmp_path)
    assert calls == ["someone/adapter"]  # an existing folder is read as it is
    for bad in ("hf://", "hf://../etc", "hf://a/b/c", "hf://" + "x" * 500):
        with pytest.raises(dorafit.AdapterFileError, match="is not a hub repository id"):
            remote.resolve_adapter_path(bad)


def torch_model():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(2, 2))
