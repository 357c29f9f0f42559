"""Merged models and LoRA adapters written as GGUF (dorafit.gguf_export), read back by
transformers' own GGUF loader and by the gguf package's reader.

The suite's check of the written files is transformers' GGUF loader: it reads the exported
file back to the adapted model's logits, within the rounding of the chosen type. llama.cpp
itself reads them in benchmarks/serving_engines.py (it builds from source: not in the suite).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import dorafit  # noqa: E402
from dorafit.gguf_export import GGUFExportError, export_gguf, gguf_source, rotary_rows, write_lora_gguf  # noqa: E402
from dorafit.train.models import load_model  # noqa: E402
from gguf_cases import CHAT_TEMPLATE, llama_cpp_permute, write_tiny_folder, write_tiny_gguf  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[3, 4, 5, 30, 31, 6, 2, 9]])


def tuned(model, method="dora", seed=1):
    """``model`` with a trained-looking adapter on the paper's targets (B, m moved off their init)."""
    dorafit.attach(model, dorafit.AdapterConfig(method=method, rank=4, alpha=8, targets=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=gen) * 0.3)
            if a.magnitude is not None:
                a.magnitude.mul_(1 + 0.2 * torch.randn(a.magnitude.shape, generator=gen))
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def read_back(file: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name).eval()


def rounded_reference(model, dtype):
    """The adapted model with each merged weight rounded to ``dtype``: what a file of that type holds."""
    import copy

    merged = dorafit.merge(copy.deepcopy(model))
    with torch.no_grad():
        for name, _ in dorafit.adapter_modules(model):
            w = merged.get_submodule(name).weight
            w.copy_(w.to(dtype).float())
    return merged


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture()
def gguf_base(tmp_path, monkeypatch):
    """(source file, the tiny model loaded from it through dorafit's GGUF conversion)."""
    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "models" / "tiny.gguf"
    source.parent.mkdir()
    write_tiny_gguf(source)
    model, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    return source, model


def test_gguf_sourced_export_reads_back_to_the_adapted_logits(gguf_base, tmp_path):
    source, model = gguf_base
    model = tuned(model)
    want = logits(model)
    out = tmp_path / "out" / "merged-f32.gguf"
    written = export_gguf(model, out, quant="f32", source=source, progress=False)
    assert len(written) == 10 and set(written.values()) == {"F32"}
    assert rel(logits(read_back(out)), want) < 1e-6
    out16 = tmp_path / "out" / "merged-f16.gguf"
    written = export_gguf(model, out16, quant="f16", source=source, progress=False)
    got = logits(read_back(out16))
    # within f16 rounding: exactly the adapted model with its merged weights rounded to f16 ...
    assert rel(got, logits(rounded_reference(model, torch.float16))) < 1e-6
    # ... which is close to, and not the same as, the float32 adapted model
    assert 1e-6 < rel(got, want) < 2e-3
    # the model is left as it was
    assert dorafit.adapter_modules(model) and torch.equal(logits(model), want)


def test_every_source_key_and_untouched_tensor_is_kept(gguf_base, tmp_path):
    source, model = gguf_base
    out = tmp_path / "merged.gguf"
    export_gguf(tuned(model), out, quant="f16", source=source, progress=False)
    src, new = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    assert [t.name for t in new.tensors] == [t.name for t in src.tensors]
    for key, field in src.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in new.fields, key
        if key != "general.file_type":
            assert new.fields[key].contents() == field.contents(), key
    assert new.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    adapted = {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "ffn_up", "ffn_down")}
    for a, b in zip(src.tensors, new.tensors):
        if a.name in adapted:
            assert b.tensor_type == gguf.GGMLQuantizationType.F16 and not np.array_equal(
                np.asarray(a.data, np.float32), np.asarray(b.data, np.float32)), a.name
        else:
            assert a.tensor_type == b.tensor_type and bytes(a.data) == bytes(b.data), a.name


def test_q_and_k_are_written_in_llama_cpps_row_order(gguf_base, tmp_path):
    source, model = gguf_base
    model = tuned(model)
    out = tmp_path / "merged.gguf"
    export_gguf(model, out, quant="f32", source=source, progress=False)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    merged = {n: a.merged_weight_2d().detach().numpy() for n, a in dorafit.adapter_modules(model)}
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], llama_cpp_permute(merged["model.layers.1.self_attn.q_proj"], 4))
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"], llama_cpp_permute(merged["model.layers.1.self_attn.k_proj"], 2))
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight"], merged["model.layers.1.self_attn.v_proj"])
    np.testing.assert_array_equal(rotary_rows(np.arange(16.0).reshape(8, 2), 2), llama_cpp_permute(np.arange(16.0).reshape(8, 2), 2))


def test_source_quantization_requantizes_like_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.Q4_1.gguf"
    write_tiny_gguf(source, gguf.GGMLQuantizationType.Q4_1)
    model, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    model = tuned(model)
    out = tmp_path / "merged-source.gguf"
    export_gguf(model, out, quant="source", source=source, progress=False)
    src = {t.name: t.tensor_type for t in gguf.GGUFReader(str(source)).tensors}
    new = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert new == src and gguf.GGMLQuantizationType.Q4_1 in set(src.values())
    # the Q4_1 tensors hold the merged weights quantized block by block, as llama.cpp's quantizer does
    merged = {n: a.merged_weight_2d().detach().numpy() for n, a in dorafit.adapter_modules(model)}
    v = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.0.attn_v.weight")
    expected = gguf.quants.quantize(merged["model.layers.0.self_attn.v_proj"], gguf.GGMLQuantizationType.Q4_1)
    assert bytes(v.data) == expected.tobytes()
    # read back: exactly the adapted model with its Q4_1 layers' merged weights rounded to Q4_1
    import copy

    reference = dorafit.merge(copy.deepcopy(model))
    with torch.no_grad():
        for name, _ in dorafit.adapter_modules(model):
            w = reference.get_submodule(name).weight
            if w.shape[-1] % 32 == 0:  # down_proj (48 inputs) stays float32 in the source, and so in the export
                q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1)
                w.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1)))
    assert rel(logits(read_back(out)), logits(reference)) < 1e-6


def test_a_model_that_is_not_the_files_base_is_refused(gguf_base, tmp_path):
    source, model = gguf_base
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.add_(1e-3)
    out = tmp_path / "merged.gguf"
    with pytest.raises(GGUFExportError, match=r"model.layers.0.self_attn.v_proj.weight: the model's base weight differs "
                                              r"from tensor blk.0.attn_v.weight"):
        export_gguf(tuned(model), out, quant="f16", source=source, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_over_an_input_is_refused(gguf_base, tmp_path):
    source, model = gguf_base
    before = source.read_bytes()
    with pytest.raises(GGUFExportError, match="would replace or lie inside the input"):
        export_gguf(tuned(model), source, quant="f16", source=source, progress=False)
    assert source.read_bytes() == before
    with pytest.raises(GGUFExportError, match="must be a .gguf file"):
        export_gguf(model, tmp_path / "merged.bin", source=source, progress=False)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_folder_export_builds_the_file_from_the_gguf_tables(tmp_path, tie):
    folder = tmp_path / "base"
    write_tiny_folder(folder, tie_word_embeddings=tie)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tuned(AutoModelForCausalLM.from_pretrained(folder))
    out = tmp_path / "merged.gguf"
    with pytest.warns(UserWarning, match="'default' pre-tokenizer"):
        export_gguf(model, out, quant="f32", folder=folder, progress=False)
    assert rel(logits(read_back(out)), logits(model)) < 1e-6
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) != tie  # a tied head is the embedding table in llama.cpp too
    assert reader.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "ab cd abcd"
    assert theirs(text)["input_ids"] == ours(text)["input_ids"]
    out16 = tmp_path / "merged16.gguf"
    with pytest.warns(UserWarning):
        export_gguf(model, out16, quant="f16", folder=folder, progress=False)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out16)).tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == "F16"


def test_other_architectures_are_refused_from_a_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    dorafit.attach(model, dorafit.AdapterConfig(rank=2, targets=["c_attn"]))
    with pytest.raises(GGUFExportError, match="covers the llama family .*'gpt2'.*convert_hf_to_gguf.py"):
        export_gguf(model, tmp_path / "x.gguf", folder=tmp_path / "gpt2", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_lora_adapter_gguf_holds_a_and_b_in_llama_cpps_layout(tmp_path):
    from dorafit.export import uniform_rank_lora

    folder = tmp_path / "base"
    write_tiny_folder(folder)
    from transformers import AutoModelForCausalLM

    model = tuned(AutoModelForCausalLM.from_pretrained(folder), method="lora")
    cfg, state = uniform_rank_lora(model)
    out = write_lora_gguf(model, cfg, state, tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 4.0  # = r: llama.cpp's alpha / r is 1
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 2 * 10
    q = dict(dorafit.adapter_modules(model))["model.layers.0.self_attn.q_proj"]
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert a.shape == (4, 32) and b.shape == (32, 4)  # numpy order: (r, in), (out, r)
    delta = (q.scaling * q.lora_b @ q.lora_a).detach().numpy()
    np.testing.assert_allclose(b @ a, llama_cpp_permute(delta, 4), rtol=1e-5, atol=1e-6)
    with pytest.raises(GGUFExportError, match="one lora_alpha and no rank or alpha patterns"):
        write_lora_gguf(model, {**cfg, "rank_pattern": {"q_proj": 2}}, state, tmp_path / "bad.gguf")


def test_gguf_source_is_found_for_files_bundled_names_and_converted_folders(gguf_base):
    source, model = gguf_base
    assert gguf_source(str(source)) == source
    assert gguf_source(model.config._name_or_path) == source  # the converted folder records its file
    assert gguf_source(str(source.parent)) is None and gguf_source(None) is None


def _kept_share(model, out: Path, source: Path) -> float:
    """<Q(W') - W0, W' - W0> / ||W' - W0||^2 over the Q4_1 v, up and down tensors of ``out``,
    computed here from the files (q and k are stored in rotary order; these three suffice)."""
    written = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    original = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    merged = {n: a.merged_weight_2d().detach().double().numpy() for n, a in dorafit.adapter_modules(model)}
    modules = {"attn_v": "self_attn.v_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    dot = norm = 0.0
    for name, tensor in written.items():
        parts = name.split(".")  # blk.<layer>.<kind>.weight
        if len(parts) != 4 or parts[2] not in modules or tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        layer, kind = parts[1], parts[2]
        w0 = gguf.quants.dequantize(original[name].data, original[name].tensor_type).astype(np.float64)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        change = merged[f"model.layers.{layer}.{modules[kind]}"] - w0
        dot += float(((got - w0) * change).sum())
        norm += float((change * change).sum())
    assert norm > 0
    return dot / norm


def test_source_quantization_says_when_it_loses_the_fine_tune(tmp_path, monkeypatch):
    """A change below Q4_1's step rounds back to the base: the export says how much was kept
    (measured on the file here), and says nothing when most of the change survives."""
    import warnings

    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.Q4_1.gguf"
    write_tiny_gguf(source, gguf.GGMLQuantizationType.Q4_1)
    small, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    dorafit.attach(small, dorafit.AdapterConfig(method="dora", rank=4, alpha=8, targets=TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(small):
            a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=gen) * 1e-4)
    out = tmp_path / "small.gguf"
    with pytest.warns(UserWarning, match=r"re-quantized as Q4_1, the adapted tensors keep \d+% of the fine-tune's change") as rec:
        export_gguf(small.eval(), out, quant="source", source=source, progress=False)
    said = int(str(rec[0].message).split("keep ")[1].split("%")[0])
    assert _kept_share(small, out, source) < 0.5 and said < 50

    big, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    big = tuned(big)
    out = tmp_path / "big.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_gguf(big, out, quant="source", source=source, progress=False)
    assert _kept_share(big, out, source) > 0.5
