"""Adapter files: round trip, validation errors naming module/key/shape, atomic writes, no pickle."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dorafit
from dorafit import AdapterConfig, AdapterFileError
from dorafit.io import CONFIG_NAME, WEIGHTS_NAME


class Net(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.embed = nn.Embedding(20, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, 4)

    def forward(self, ids):
        h = self.embed(ids)
        return self.out(torch.tanh(self.q_proj(h)) + self.v_proj(h)).mean(dim=1)


def fresh(hidden=16):
    torch.manual_seed(123)  # the same base weights every time
    return Net(hidden)


CFG = AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "embed"])
IDS = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path, ref):
    model = dorafit.attach(fresh(), CFG)
    for i, (_, a) in enumerate(dorafit.adapter_modules(model)):
        ref.randomize_adapter(a, scale=0.3, seed=i)
    path = dorafit.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        y = model(IDS)
    return path, y, model


def module_types(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def test_round_trip(saved):
    path, y, model = saved
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]  # no temp dirs left
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["format"] == "dorafit" and meta["dorafit_version"] == dorafit.__version__
    assert AdapterConfig.from_dict(meta["config"]) == CFG
    assert meta["base_model"]["class"] == "Net"
    assert meta["modules"]["q_proj"]["weight_shape"] == [16, 16]
    tensors = load_file(str(path / WEIGHTS_NAME))
    assert sorted(tensors) == sorted(dorafit.adapter_state_dict(model))
    loaded = dorafit.load_adapter(fresh(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), y)
    for key, t in dorafit.adapter_state_dict(loaded).items():
        assert torch.equal(t, tensors[key]), key
    # the loaded adapter trains
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(tensors)


def test_save_overwrites_atomically(saved, ref):
    path, _, model = saved
    ref.randomize_adapter(model.q_proj, seed=9)
    dorafit.save_adapter(model, path)
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]
    loaded = dorafit.load_adapter(fresh(), path)
    assert torch.equal(loaded.q_proj.lora_b, model.q_proj.lora_b)


def test_save_without_adapters_raises(tmp_path):
    with pytest.raises(AdapterFileError, match="no dorafit adapters"):
        dorafit.save_adapter(fresh(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------
# Loading errors: each names the module / key / shape / file


def expect_load_error(path, match, base=None):
    base = fresh() if base is None else base
    types_before = module_types(base)
    with pytest.raises(AdapterFileError, match=match):
        dorafit.load_adapter(base, path)
    assert module_types(base) == types_before  # left as it was
    return base


def test_other_base_shape(saved):
    path, _, _ = saved
    expect_load_error(path, r"module 'embed' has weight shape \(20, 24\) .* trained on shape \(20, 16\)", base=fresh(24))


def rewrite_tensors(path, change):
    tensors = load_file(str(path / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


def test_missing_key(saved):
    path, _, _ = saved
    rewrite_tensors(path, lambda t: t.pop("v_proj.magnitude"))
    expect_load_error(path, r"missing keys \['v_proj.magnitude'\]")


def test_unexpected_key(saved):
    path, _, _ = saved
    rewrite_tensors(path, lambda t: t.update({"k_proj.lora_a": torch.zeros(4, 16)}))
    expect_load_error(path, r"unexpected keys \['k_proj.lora_a'\]")


def test_wrong_tensor_shape(saved):
    path, _, _ = saved
    rewrite_tensors(path, lambda t: t.update({"q_proj.lora_b": torch.zeros(16, 3)}))
    expect_load_error(path, r"key 'q_proj.lora_b' has shape \(16, 3\) .* need \(16, 4\)")


def edit_config(path, change):
    """Change the config and re-save the weights without the tie to their config, as an older
    dorafit or a hand-made folder has them: the validation below then runs on the edited config
    (a tied pair refuses any edit first: test_config_edited_beyond_the_base_location)."""
    meta = json.loads((path / CONFIG_NAME).read_text())
    change(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    rewrite_tensors(path, lambda t: None)


def test_rank_mismatch_between_config_and_tensors(saved):
    path, _, _ = saved

    def to_rank_8(meta):
        meta["config"]["rank"] = 8
        for rec in meta["modules"].values():
            rec["rank"] = 8

    edit_config(path, to_rank_8)
    expect_load_error(path, r"key '(embed|q_proj|v_proj).lora_a' has shape \(4, (20|16)\) .*rank 8.* need \(8, (20|16)\)")


def test_rank_mismatch_with_module_record(saved):
    path, _, _ = saved
    edit_config(path, lambda meta: meta["config"].update(rank=2))
    expect_load_error(path, r"module '(embed|q_proj|v_proj)' is recorded with rank 4 but the config gives 2")


def test_method_mismatch(saved):
    path, _, _ = saved
    edit_config(path, lambda meta: meta["config"].update(method="lora"))
    expect_load_error(path, r"module '(embed|q_proj|v_proj)' is recorded with method 'dora' but the config gives 'lora'")


def test_method_mismatch_without_module_records(saved):
    path, _, _ = saved

    def strip(meta):
        meta["config"]["method"] = "lora"
        for rec in meta["modules"].values():
            rec.pop("method")

    edit_config(path, strip)
    expect_load_error(path, r"method 'lora'.*unexpected keys \['embed.magnitude', 'q_proj.magnitude', 'v_proj.magnitude'\]")


def test_truncated_safetensors(saved):
    path, _, _ = saved
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    expect_load_error(path, rf"{WEIGHTS_NAME} is truncated or corrupt")


def test_garbage_safetensors(saved):
    path, _, _ = saved
    (path / WEIGHTS_NAME).write_bytes(os.urandom(256))
    expect_load_error(path, rf"{WEIGHTS_NAME} is truncated or corrupt")


def test_missing_weights_file(saved):
    path, _, _ = saved
    (path / WEIGHTS_NAME).unlink()
    expect_load_error(path, rf"adapter weights file .*{WEIGHTS_NAME} is missing")


def test_directory_without_config(tmp_path):
    (tmp_path / "notadapter").mkdir()
    (tmp_path / "notadapter" / "model.safetensors").write_bytes(b"x")
    expect_load_error(tmp_path / "notadapter", rf"notadapter is not an adapter directory: {CONFIG_NAME} is missing")


def test_nonexistent_path(tmp_path):
    expect_load_error(tmp_path / "nope", r"adapter path .*nope does not exist")


def test_path_is_a_file(tmp_path):
    f = tmp_path / "adapter.safetensors"
    f.write_bytes(b"123")
    expect_load_error(f, r"adapter.safetensors is not an adapter directory")


def test_invalid_json(saved):
    path, _, _ = saved
    (path / CONFIG_NAME).write_text('{"format": "dorafit", "config": {')
    expect_load_error(path, rf"{CONFIG_NAME} is not valid JSON")


def test_json_not_an_object(saved):
    path, _, _ = saved
    (path / CONFIG_NAME).write_text("[1, 2]")
    expect_load_error(path, r"must hold a JSON object, got list")


def test_not_a_dorafit_config(saved):
    path, _, _ = saved
    (path / CONFIG_NAME).write_text(json.dumps({"hello": 1}))
    rewrite_tensors(path, lambda t: None)  # weights not tied to a config, as a hand-made folder's
    expect_load_error(path, r"is not a dorafit adapter config")


def test_invalid_config_values(saved):
    path, _, _ = saved
    edit_config(path, lambda meta: meta["config"].update(rank=-1))
    expect_load_error(path, r"invalid adapter config: rank must be a positive integer, got -1")
    edit_config(path, lambda meta: meta["config"].update(rank=4, bogus=1))
    expect_load_error(path, r"invalid adapter config: unknown adapter config key\(s\) \['bogus'\]")


def test_module_missing_in_base(saved):
    path, _, _ = saved

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 16)
            self.q_proj = nn.Linear(16, 16)

    expect_load_error(path, r"module 'v_proj' of the adapter does not exist in this base model", base=Other())


def test_failed_load_leaves_requires_grad(saved):
    path, _, _ = saved
    rewrite_tensors(path, lambda t: t.pop("v_proj.magnitude"))
    base = fresh()
    with pytest.raises(AdapterFileError):
        dorafit.load_adapter(base, path)
    assert all(p.requires_grad for p in base.parameters())


def test_nothing_is_unpickled(saved, monkeypatch):
    path, y, _ = saved

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load_adapter")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = dorafit.load_adapter(fresh(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), y)


# ------------------------------------------------------------------------------------------
# Interrupted saves


def test_interrupted_save_keeps_old_adapter(saved, monkeypatch, ref):
    import dorafit.adapter_files as adapter_files

    path, y, model = saved
    old_bytes = {n: (path / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}

    def crash(file, data):
        with open(file, "wb") as f:  # half a file, then the process "dies"
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(adapter_files, "_write_bytes", crash)
    ref.randomize_adapter(model.q_proj, seed=7)
    with pytest.raises(KeyboardInterrupt):
        dorafit.save_adapter(model, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == sorted(old_bytes)  # no temporary left inside
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]  # no temp dir left behind
    assert {n: (path / n).read_bytes() for n in old_bytes} == old_bytes
    loaded = dorafit.load_adapter(fresh(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), y)


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    import dorafit.adapter_files as adapter_files

    model = dorafit.attach(fresh(), CFG)

    def crash(file, data):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "_write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        dorafit.save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_failed_final_rename_keeps_old_adapter(saved, monkeypatch):
    import dorafit.files as files

    path, y, model = saved
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside, then the new one cannot be renamed in
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        dorafit.save_adapter(model, path)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = dorafit.load_adapter(fresh(), path)  # the config's rename failed: the old weights are back
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), y)


def test_round_trip_with_modules_to_save(tmp_path, ref):
    cfg = AdapterConfig(rank=4, targets=["q_proj"], modules_to_save=["out"])
    model = dorafit.attach(fresh(), cfg)
    ref.randomize_adapter(model.q_proj)
    with torch.no_grad():
        model.out.trainable.weight.mul_(2.0)
        y = model(IDS)
    path = dorafit.save_adapter(model, tmp_path / "adapter")
    assert "out.trainable.weight" in load_file(str(path / WEIGHTS_NAME))
    loaded = dorafit.load_adapter(fresh(), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), y)


def test_integer_tensor_is_refused(saved):
    path, _, _ = saved
    rewrite_tensors(path, lambda t: t.update({"q_proj.magnitude": torch.zeros(16, dtype=torch.int32)}))
    expect_load_error(path, r"key 'q_proj.magnitude' has dtype torch.int32, expected floating point")


def test_config_targets_disagree_with_recorded_modules(saved):
    path, _, _ = saved
    edit_config(path, lambda meta: meta["config"].update(targets=["q_proj", "embed"]))
    expect_load_error(path, r"targets select other modules .*only in the adapter: \['v_proj'\]")


def test_save_over_a_file_is_refused(tmp_path):
    model = dorafit.attach(fresh(), CFG)
    (tmp_path / "adapter").write_text("not a directory")
    with pytest.raises(FileExistsError, match="adapter exists and is not a directory"):
        dorafit.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter").read_text() == "not a directory"


def test_weights_are_written_under_a_temporary_name(tmp_path, monkeypatch):
    import dorafit.adapter_files as adapter_files

    model = dorafit.attach(fresh(), CFG)
    seen = []
    real_write = adapter_files._write_bytes

    def spy(file, data):
        seen.append(str(file))
        assert not (tmp_path / "adapter").exists()  # nothing under the final name yet
        return real_write(file, data)

    monkeypatch.setattr(adapter_files, "_write_bytes", spy)
    dorafit.save_adapter(model, tmp_path / "adapter")
    assert len(seen) == 2 and all("adapter" != os.path.basename(os.path.dirname(f)) for f in seen)
    assert all(os.path.dirname(os.path.dirname(f)) == str(tmp_path) for f in seen)  # a sibling: one filesystem


def test_write_json_and_bytes_atomic(tmp_path, monkeypatch):
    import dorafit.files as files

    target = tmp_path / "sub" / "state.json"
    files.write_json_atomic(target, {"step": 1})
    assert json.loads(target.read_text()) == {"step": 1}

    def broken_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        files.write_json_atomic(target, {"step": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"step": 1}  # the old content, whole
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temp file left


# ---------------------------------------------------------------------------- the user's files survive


def _hashes(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["dorafit", "peft"])
def test_save_into_a_folder_of_other_files_adds_only_the_adapter(tmp_path, fmt):
    folder = tmp_path / "base-model"  # e.g. the base model's own folder, a Trainer output_dir
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "tokenizer.json").write_text('{"v": 1}')
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.md").write_text("keep me")
    before = _hashes(folder)
    model = dorafit.attach(fresh(), AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    dorafit.save_adapter(model, folder, format=fmt)
    dorafit.save_adapter(model, folder, format=fmt)  # a second save replaces only the adapter files
    after = _hashes(folder)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".dorafit-folder.json"]  # no temporaries left
    loaded = dorafit.load_adapter(fresh(), folder)
    assert dorafit.adapter_modules(loaded)


def test_saved_adapter_is_readable_by_others_under_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        dorafit.save_adapter(dorafit.attach(fresh(), CFG), tmp_path / "adapter")
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor_is_refused_naming_file_and_key(saved, bad):
    path, _, _ = saved
    key = "q_proj.lora_b"
    rewrite_tensors(path, lambda t: t.__setitem__(key, torch.full_like(t[key], bad)))
    model = fresh()
    before = module_types(model)
    with pytest.raises(AdapterFileError, match=rf"{WEIGHTS_NAME}: key '{key}' holds \d+ non-finite value"):
        dorafit.load_adapter(model, path)
    assert module_types(model) == before


def test_adapter_config_with_wrong_types_is_refused(saved):
    path, _, _ = saved
    edit_config(path, lambda c: c["config"].update(rslora="false"))
    expect_load_error(path, r"adapter_config.json: invalid adapter config: rslora must be true or false, got 'false'")
    edit_config(path, lambda c: c["config"].update(rslora=False, rank_pattern={"q_proj(": 2}))
    expect_load_error(path, r"rank_pattern: pattern 'q_proj\(' is not a valid regex")


def test_quantized_base_is_recorded_and_a_full_base_gets_one_warning(tmp_path):
    pytest.importorskip("bitsandbytes")
    import warnings

    from dorafit import quant

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q_proj = nn.Linear(64, 64)
            self.v_proj = nn.Linear(64, 64)

    model = Two()
    quant.quantize_model(model, ["q_proj", "v_proj"], "nf4", compute_dtype=torch.float32)
    dorafit.attach(model, AdapterConfig(rank=4, targets=["q_proj", "v_proj"]))
    dorafit.save_adapter(model, tmp_path / "qdora")
    meta = json.loads((tmp_path / "qdora" / CONFIG_NAME).read_text())
    assert meta["base_quantization"] == "nf4"
    assert meta["modules"]["q_proj"]["quantization"] == {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                                         "compute_dtype": "float32"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dorafit.load_adapter(Two(), tmp_path / "qdora")
    messages = [str(w.message) for w in caught if "4-bit" in str(w.message)]
    assert len(messages) == 1 and "trained on a 4-bit nf4 base (2 modules" in messages[0]
    # The Python merge of the 4-bit model warns once for the model, not once per layer.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dorafit.merge(model)
    messages = [str(w.message) for w in caught if "4-bit" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("dorafit.merge: 2 layers in 4-bit")


@pytest.mark.parametrize("change, message", [
    (dict(use_dora="false"), r"use_dora must be true or false, got 'false'"),
    (dict(use_rslora=1), r"use_rslora must be true or false, got 1"),
    (dict(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\), got 1.5"),
    (dict(r=4.5), r"r must be a positive integer, got 4.5"),
    (dict(lora_alpha=float("nan")), r"lora_alpha must be a positive number, got nan"),
    (dict(alpha_pattern={"q_proj": float("inf")}), r"alpha_pattern\['q_proj'\] must be > 0 and finite, got inf"),
])
def test_peft_config_values_are_type_checked_on_import(tmp_path, change, message):
    model = dorafit.attach(fresh(), AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    path = dorafit.save_adapter(model, tmp_path / "peft", format="peft")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg.update(change)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    rewrite_tensors(path, lambda t: None)  # as PEFT writes them: no tie to the config
    expect_load_error(path, message)


def test_peft_adapter_whose_patterns_name_absent_modules_still_loads(tmp_path):
    """PEFT skips target_modules / rank_pattern entries that match nothing; the import then
    uses one exact pattern per adapted module, so attach's must-match rule does not refuse it."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "absent_proj"], rank_pattern={"nothing_here": 2}, use_dora=True))
    peft_model.save_pretrained(tmp_path / "peft")
    model = dorafit.load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in dorafit.adapter_modules(model)) == ["q_proj", "v_proj"]
