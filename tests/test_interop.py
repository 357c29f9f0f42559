"""PEFT interop (dorafit.interop), checked against the real ``peft`` package.

Parity in float32 on CPU for every layer type and both directions: outputs in train mode
(dropout 0) and eval mode, and merged weights, within 1e-5 relative. Then fine-tune -> export
-> PEFT merge_and_unload, the command line, and the refusals.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

import dorafit  # noqa: E402
from dorafit.interop import PeftFormatError  # noqa: E402
from dorafit.io import AdapterFileError  # noqa: E402

from interop_cases import (  # noqa: E402
    CASES,
    ConvNet,
    base_for,
    dorafit_to_peft,
    key_warnings,
    load_in_peft,
    make_peft_model,
    output_of,
    peft_to_dorafit,
    rel_err,
    state_rel_errs,
)

TOL = 1e-5

# The real MiniLM runs in one direction each way but is the slowest case; the tiny models cover
# every layer type.
PARITY_CASES = [
    "llama_dora",
    "llama_lora_rslora_regex",
    "llama_dora_layers_to_transform",
    "bert_cls_dora",
    "gpt2_dora",
    "conv_dora",
    "conv_lora",
    "embedding_dora",
    "minilm_dora",
]


def _check(errs):
    for key in ("train", "eval", "merged"):
        assert errs[key] < TOL, (key, errs)


@pytest.mark.parametrize("name", PARITY_CASES)
def test_peft_adapter_loads_with_parity(name, tmp_path):
    errs = peft_to_dorafit(CASES[name], tmp_path / "peft")
    _check(errs)


@pytest.mark.parametrize("name", PARITY_CASES)
def test_dorafit_export_loads_in_peft_with_parity(name, tmp_path):
    errs = dorafit_to_peft(CASES[name], tmp_path / "peft")
    assert errs["key_warnings"] == []
    # the task wrapper PEFT builds from the exported task_type
    expected = {"llama": "PeftModelForCausalLM", "gpt2": "PeftModelForCausalLM", "bert_cls": "PeftModelForSequenceClassification"}
    assert errs["peft_class"] == next((v for k, v in expected.items() if name.startswith(k)), "PeftModel")
    _check(errs)


def test_loaded_config_keeps_peft_patterns_and_modules_to_save(tmp_path):
    case = CASES["llama_dora"]
    make_peft_model(case, base_for(case)).save_pretrained(str(tmp_path))
    model = dorafit.load_adapter(base_for(case), tmp_path)
    cfg = model.dorafit_config
    assert cfg.method == "dora" and cfg.dropout_mode == "input" and cfg.detach_norm
    ranks = {n: a.rank for n, a in dorafit.adapter_modules(model)}
    alphas = {n: a.alpha for n, a in dorafit.adapter_modules(model)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    assert ranks["model.layers.1.mlp.down_proj"] == 6
    assert alphas["model.layers.0.self_attn.v_proj"] == 3 and alphas["model.layers.0.self_attn.k_proj"] == 8
    assert type(model.get_submodule("model.embed_tokens")).__name__ == "EmbeddingAdapter"
    # the head is a trainable copy, as PEFT's modules_to_save
    head = model.get_submodule("lm_head")
    assert all(p.requires_grad for p in head.trainable.parameters())
    assert not any(p.requires_grad for p in head.original.parameters())
    # round trip through dorafit's own format gives the same outputs
    dorafit.save_adapter(model, tmp_path / "native")
    again = dorafit.load_adapter(base_for(case), tmp_path / "native")
    x = case.make_input()
    with torch.no_grad():
        assert rel_err(output_of(again.eval(), x), output_of(model.eval(), x)) == 0.0


def test_saved_peft_files_have_peft_keys(tmp_path):
    from safetensors.torch import load_file

    case = CASES["conv_dora"]
    model = dorafit.attach(base_for(case), dorafit.AdapterConfig(**case.dorafit_kwargs))
    dorafit.save_adapter(model, tmp_path, format="peft")
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.conv2d.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    assert keys["base_model.model.conv1d.lora_magnitude_vector"].shape == (1, 10, 1)
    assert keys["base_model.model.conv2d.lora_A.weight"].shape == (2, 3, 3, 3)
    assert keys["base_model.model.conv2d.lora_B.weight"].shape == (8, 2, 1, 1)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["r"] == 2 and cfg["lora_alpha"] == 4


def test_finetuned_export_merges_in_peft_like_dorafit(tmp_path):
    """A few optimizer steps with dorafit, export, PEFT merge_and_unload == dorafit.merge."""
    case = CASES["llama_dora"]
    model = dorafit.attach(base_for(case), dorafit.AdapterConfig(**case.dorafit_kwargs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = case.make_input()
    model.train()
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = {n: a.lora_b.detach().abs().max().item() for n, a in dorafit.adapter_modules(model)}
    assert min(trained.values()) > 0  # B left zero-init: the update is real
    dorafit.save_adapter(model, tmp_path, format="peft")
    peft_model, messages = load_in_peft(base_for(case), tmp_path)
    assert key_warnings(messages) == []
    merged_peft = peft_model.merge_and_unload().state_dict()
    merged_dorafit = dorafit.merge(model).state_dict()
    errs = state_rel_errs(merged_peft, merged_dorafit)
    assert max(errs.values()) < TOL, max(errs.items(), key=lambda kv: kv[1])
    base = base_for(case).state_dict()
    assert not torch.equal(merged_peft["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


class DilatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, dilation=2, padding="same")

    def forward(self, x):
        return self.conv(x)


def test_dilated_conv_follows_merged_weights_and_warns(tmp_path):
    """PEFT runs A without the dilation; dorafit follows the merged weights (PEFT's merge)."""
    torch.manual_seed(0)
    base = DilatedNet()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["conv"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="dilation"):
        model = dorafit.load_adapter(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        unmerged_peft = peft_model(x)
        merged_peft = peft_model.merge_and_unload()(x)
        ours = model.eval()(x)
    assert rel_err(ours, merged_peft) < TOL
    assert rel_err(unmerged_peft, merged_peft) > 1e-3  # PEFT's own unmerged forward disagrees


# ----------------------------------------------------------------------------------------------
# Command line
def _save_llama_folder(path):
    case = CASES["llama_dora"]
    base_for(case).save_pretrained(str(path))
    return case


def test_cli_convert_both_ways(tmp_path):
    from dorafit.cli import main

    case = _save_llama_folder(tmp_path / "base")
    peft_model = make_peft_model(case, base_for(case))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "native"), "--to", "dorafit", "--model", str(tmp_path / "base")]) == 0
    cfg = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    assert cfg["format"] == "dorafit"
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "peft", "--model", str(tmp_path / "base")]) == 0
    x = case.make_input()
    back, messages = load_in_peft(base_for(case), tmp_path / "back")
    assert key_warnings(messages) == []
    native = dorafit.load_adapter(base_for(case), tmp_path / "native")
    with torch.no_grad():
        ref = output_of(peft_model.eval(), x)
        assert rel_err(output_of(back.eval(), x), ref) < TOL
        assert rel_err(output_of(native.eval(), x), ref) < TOL


def test_cli_convert_errors(tmp_path, capsys):
    from dorafit.cli import main

    case = _save_llama_folder(tmp_path / "base")
    make_peft_model(case, base_for(case)).save_pretrained(str(tmp_path / "peft"))
    # converting to the format it already has
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "x"), "--to", "peft", "--model", str(tmp_path / "base")]) == 2
    assert "already" in capsys.readouterr().err
    # no base model given and none recorded
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "x"), "--to", "dorafit"]) == 2
    assert "--model" in capsys.readouterr().err
    # destination exists
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "busy"), "--to", "dorafit", "--model", str(tmp_path / "base")]) == 2
    assert "exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Bad input: each a clear error, and the model left without adapters
def _peft_dir(tmp_path, base, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    model.save_pretrained(str(tmp_path))
    return tmp_path


def _assert_untouched(model):
    assert dorafit.adapter_modules(model) == []
    assert not hasattr(model, "dorafit_config")


def test_adapter_for_another_base_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    case = CASES["llama_dora"]
    path = _peft_dir(tmp_path, base_for(case), r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(PeftFormatError, match=r"model\.layers\.0\.self_attn\.q_proj.*shape \(4, 32\).*\(4, 48\)"):
        dorafit.load_adapter(other, path)
    _assert_untouched(other)


def test_adapter_with_missing_module_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    case = CASES["conv_dora"]
    path = _peft_dir(tmp_path, base_for(case), r=2, target_modules=["conv2d", "conv1d"], use_dora=True)
    state = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if ".conv1d." not in k}, str(path / "adapter_model.safetensors"))
    model = base_for(case)
    with pytest.raises(PeftFormatError, match=r"no weights for 1 module.*conv1d"):
        dorafit.load_adapter(model, path)
    _assert_untouched(model)


def test_unsupported_peft_method_is_refused(tmp_path):
    case = CASES["llama_dora"]
    model = peft.get_peft_model(base_for(case), peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(str(tmp_path))
    with pytest.raises(PeftFormatError, match="peft_type 'IA3' is not supported"):
        dorafit.load_adapter(base_for(case), tmp_path)


def test_missing_weights_file_is_refused(tmp_path):
    case = CASES["embedding_dora"]
    path = _peft_dir(tmp_path, base_for(case), r=2, target_modules=["proj"])
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        dorafit.load_adapter(base_for(case), path)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(lora_bias=True), "lora_bias=True"),
        (dict(bias="all"), "bias='all'"),
        (dict(bias="lora_only", use_dora=True), "bias='lora_only'"),
    ],
)
def test_unrepresentable_options_are_refused(tmp_path, kwargs, option):
    case = CASES["embedding_dora"]
    path = _peft_dir(tmp_path, base_for(case), r=2, target_modules=["proj"], **kwargs)
    model = base_for(case)
    with pytest.raises(PeftFormatError, match=option.replace("(", r"\(")):
        dorafit.load_adapter(model, path)
    _assert_untouched(model)


def test_config_options_are_refused_by_name(tmp_path):
    case = CASES["embedding_dora"]
    path = _peft_dir(tmp_path, base_for(case), r=2, target_modules=["proj"])
    cfg_file = path / "adapter_config.json"
    original = json.loads(cfg_file.read_text())
    for key, value in [("init_lora_weights", "pissa"), ("layer_replication", [[0, 1]]), ("target_parameters", ["w"])]:
        cfg_file.write_text(json.dumps({**original, key: value}))
        with pytest.raises(PeftFormatError, match=key):
            dorafit.load_adapter(base_for(case), path)


def test_grouped_conv_is_refused(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    path = _peft_dir(tmp_path, base, r=2, target_modules=["0"])
    with pytest.raises(PeftFormatError, match="groups=2"):
        dorafit.load_adapter(copy.deepcopy(base), path)


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    case = CASES["conv_dora"]
    model = dorafit.attach(base_for(case), dorafit.AdapterConfig(method="magnitude", targets=["conv2d"]))
    with pytest.raises(PeftFormatError, match="magnitude"):
        dorafit.save_adapter(model, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()
    with pytest.raises(AdapterFileError, match="no dorafit adapters"):
        dorafit.save_adapter(ConvNet(), tmp_path / "y", format="peft")


def test_dropout_semantics_match_peft_in_training(tmp_path):
    """lora_dropout > 0 in train mode: the same dropout mask gives the same output, i.e. dorafit's
    "input" dropout mode is PEFT's (dropout on the input of the whole DoRA update)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6))
    path = _peft_dir(tmp_path, base, r=3, lora_alpha=6, lora_dropout=0.3, target_modules=["0", "2"], use_dora=True)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path), is_trainable=True)
    model = dorafit.load_adapter(copy.deepcopy(base), path)
    assert model.dorafit_config.dropout == 0.3
    x = torch.randn(5, 12)
    peft_model.train()
    model.train()
    for seed in range(3):
        torch.manual_seed(seed)
        ref = peft_model(x)
        torch.manual_seed(seed)
        ours = model(x)
        assert rel_err(ours, ref) < TOL
    torch.manual_seed(0)
    assert rel_err(model(x), peft_model(x)) > 1e-3  # different masks differ: dropout is really on


def test_legacy_bin_weights_are_read_without_unpickling(tmp_path):
    from safetensors.torch import load_file

    case = CASES["embedding_dora"]
    path = _peft_dir(tmp_path, base_for(case), r=2, target_modules=["embed", "proj"], use_dora=True)
    state = load_file(str(path / "adapter_model.safetensors"))
    torch.save(state, str(path / "adapter_model.bin"))
    (path / "adapter_model.safetensors").unlink()
    model = dorafit.load_adapter(base_for(case), path)
    assert len(dorafit.adapter_modules(model)) == 2


def test_regex_targets_and_exclude_follow_peft(tmp_path):
    case = CASES["llama_lora_rslora_regex"]
    make_peft_model(case, base_for(case)).save_pretrained(str(tmp_path))
    model = dorafit.load_adapter(base_for(case), tmp_path)
    names = {n for n, _ in dorafit.adapter_modules(model)}
    assert "model.layers.0.mlp.up_proj" in names and "model.layers.1.mlp.up_proj" not in names
    assert len(names) == 5
    cfg = model.dorafit_config
    # PEFT's own patterns carried over (they select the same modules under dorafit's rules)
    assert cfg.targets == [r".*\.(q_proj|v_proj|up_proj)"] and cfg.exclude == ["layers.1.mlp.up_proj"]
    assert cfg.rslora and cfg.method == "lora"
    assert all(a.scaling == pytest.approx(6 / 4**0.5) for _, a in dorafit.adapter_modules(model))


def test_all_linear_and_unprefixed_keys(tmp_path):
    """target_modules="all-linear", and keys without "base_model.model." (transformers' own PEFT
    integration writes them so)."""
    from safetensors.torch import load_file, save_file

    case = CASES["llama_dora"]
    peft_model = peft.get_peft_model(
        base_for(case), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    )
    peft_model.save_pretrained(str(tmp_path))
    file = tmp_path / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(str(file)).items()}, str(file))
    model = dorafit.load_adapter(base_for(case), tmp_path)
    names = sorted(n for n, _ in dorafit.adapter_modules(model))
    assert len(names) == 14 and "lm_head" not in names  # 7 projections x 2 layers, not the head
    # PEFT saves "all-linear" expanded to module names; they carry over as they are
    assert model.dorafit_config.targets == names
    x = case.make_input()
    with torch.no_grad():
        assert rel_err(output_of(model.eval(), x), output_of(peft_model.eval(), x)) < TOL


def test_peft_layout_written_by_dorafit_keeps_dorafits_own_options(tmp_path):
    """PEFT's config has no field for dropout_mode, detach_norm or adapter_dtype: dorafit's record
    in the weights' metadata carries them, and a dorafit load restores them (PEFT ignores it)."""
    import json

    from torch import nn

    import dorafit
    from dorafit.adapter_files import RECORD_KEY, weights_metadata

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16)

    cfg = dorafit.AdapterConfig(rank=2, targets=["q_proj", "v_proj"], dropout=0.1, dropout_mode="lowrank",
                                detach_norm=False)
    model = dorafit.attach(Two(), cfg)
    with pytest.warns(UserWarning, match="dropout_mode='lowrank'"):
        path = dorafit.save_adapter(model, tmp_path / "a", format="auto")
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    record = json.loads(weights_metadata(path)[RECORD_KEY])
    assert record["config"]["dropout_mode"] == "lowrank" and record["config"]["detach_norm"] is False
    layer = dorafit.load_adapter(Two(), path).q_proj
    assert (layer.dropout_mode, layer.detach_norm) == ("lowrank", False)
    # a VeRA adapter, which PEFT's LoRA format cannot hold, stays in dorafit's layout
    vera = dorafit.attach(Two(), dorafit.AdapterConfig(method="vera", rank=4, targets=["q_proj", "v_proj"]))
    path = dorafit.save_adapter(vera, tmp_path / "vera", format="auto")
    assert json.loads((path / "adapter_config.json").read_text())["format"] == "dorafit"


def test_a_pre_normalized_folder_is_never_read_as_training_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import dorafit
    from dorafit.export import export_dora_normalized
    from dorafit.hub import load_adapter_weights

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    model = dorafit.attach(base, dorafit.AdapterConfig(rank=2, targets=["q_proj"]))
    path = export_dora_normalized(model, tmp_path / "normalized")
    with pytest.raises(dorafit.AdapterFileError, match="pre-normalized DoRA .*load it with dorafit.load_adapter"):
        load_adapter_weights(model, path)
