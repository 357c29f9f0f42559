"""The HF stack saves adapters: save_pretrained, hub upload and download (dorafit.hub).

No network: uploads go to a stand-in for HfApi that copies into a local folder, downloads read
an offline cache laid out as huggingface_hub lays it out.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import dorafit
from dorafit import AdapterConfig


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _trained(model, config=None):
    dorafit.attach(model, config or AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            for name in a.adapter_parameter_names():
                p = getattr(a, name)
                p.add_(torch.randn(p.shape, generator=gen) * (0.05 if name == "magnitude" else 0.2))
    return model


IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_save_pretrained_writes_the_adapter_in_peft_layout(tmp_path):
    from peft import PeftModel

    model = _trained(_tiny_llama())
    (tmp_path / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    # PEFT reads it and computes what the dorafit model computes
    peft_model = PeftModel.from_pretrained(_tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=1e-5, atol=1e-5)
    # and dorafit
    torch.testing.assert_close(_logits(dorafit.load_adapter(_tiny_llama(), tmp_path)), _logits(model), rtol=1e-6, atol=1e-6)


def test_transformers_load_adapter_reads_save_pretrained(tmp_path):
    """transformers' own ``model.load_adapter``. A LoRA adapter: transformers 5.24 asks for PEFT >= 0.22
    and with the PEFT 0.21 here it misnames DoRA's magnitude key for PEFT's own files too."""
    model = _trained(_tiny_llama(), AdapterConfig(method="lora", rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    hf_model = _tiny_llama()
    hf_model.load_adapter(str(tmp_path))
    torch.testing.assert_close(_logits(hf_model), _logits(model), rtol=1e-5, atol=1e-5)


def test_save_pretrained_is_the_class_method_again_after_detach_and_merge(tmp_path):
    model = _trained(_tiny_llama())
    assert "save_pretrained" in model.__dict__
    assert "save_pretrained" not in _tiny_llama().__dict__  # other instances untouched
    dorafit.merge(model)
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "model.safetensors").is_file()
    detached = dorafit.detach(_trained(_tiny_llama()))
    assert "save_pretrained" not in detached.__dict__


def test_methods_peft_cannot_hold_are_saved_in_dorafit_layout(tmp_path):
    model = _trained(_tiny_llama(), AdapterConfig(method="vera", rank=4, targets=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format"] == "dorafit"
    torch.testing.assert_close(_logits(dorafit.load_adapter(_tiny_llama(), tmp_path)), _logits(model))


def test_save_pretrained_never_replaces_an_adapter_it_did_not_write(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not written by dorafit"):
        _trained(_tiny_llama()).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    model = _trained(_tiny_llama())
    model.save_pretrained(tmp_path / "ours")
    model.save_pretrained(tmp_path / "ours")  # its own file may be replaced


class _FakeHfApi:
    """Records the calls that matter and 'uploads' into a local folder."""

    def __init__(self, remote):
        self.remote, self.calls = remote, []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, exist_ok))

    def upload_folder(self, folder_path, repo_id, allow_patterns=None, commit_message=None, revision=None, **kwargs):
        self.calls.append(("upload_folder", repo_id, commit_message))
        target = self.remote / repo_id
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return f"{repo_id}@commit"


def test_push_adapter_to_hub_uploads_the_adapter_files(tmp_path):
    model = _trained(_tiny_llama())
    api = _FakeHfApi(tmp_path / "remote")
    assert dorafit.push_adapter_to_hub(model, "me/tiny-dora", api=api) == "me/tiny-dora@commit"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"] and api.calls[0][2] is True
    uploaded = tmp_path / "remote" / "me" / "tiny-dora"
    assert sorted(p.name for p in uploaded.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(_logits(dorafit.load_adapter(_tiny_llama(), uploaded)), _logits(model), rtol=1e-6, atol=1e-6)


def test_save_pretrained_push_to_hub_goes_through_hfapi(tmp_path, monkeypatch):
    import huggingface_hub

    api = _FakeHfApi(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    model = _trained(_tiny_llama())
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/pushed")
    assert ("create_repo", "me/pushed", True) in api.calls
    assert (tmp_path / "remote" / "me" / "pushed" / "adapter_model.safetensors").is_file()


def _offline_cache(cache, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copy(f, snapshot / f.name)
    return snapshot


def test_load_adapter_from_a_hub_id_reads_the_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    model = _trained(_tiny_llama())
    model.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "hub"
    _offline_cache(cache, "someone/tiny-dora", list((tmp_path / "saved").iterdir()))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = dorafit.load_adapter(_tiny_llama(), "hf://someone/tiny-dora")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-6, atol=1e-6)
    with pytest.raises(dorafit.AdapterFileError, match="adapter hf://someone/absent could not be fetched from the hub"):
        dorafit.load_adapter(_tiny_llama(), "hf://someone/absent")
    # Without hf:// the same name is a local path that does not exist: never a hub lookup.
    with pytest.raises(dorafit.AdapterFileError, match="adapter path someone/tiny-dora does not exist "
                                                       r"\(to read it from the Hugging Face hub, write hf://someone/tiny-dora\)"):
        dorafit.load_adapter(_tiny_llama(), "someone/tiny-dora")
