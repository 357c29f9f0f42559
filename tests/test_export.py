"""LoRA export of a DoRA adapter: truncated SVD of W' − W0, checked against PEFT (dorafit.export)."""

from __future__ import annotations

import pytest
import torch

import dorafit
from dorafit import AdapterConfig
from dorafit.export import choose_rank, overall_error, update_spectra


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _dora_model():
    model = dorafit.attach(_tiny_llama(), AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=gen) * 0.3)
            a.magnitude.mul_(1 + 0.2 * torch.randn(a.magnitude.shape, generator=gen))
    return model


INPUTS = [{"input_ids": torch.tensor([[1, 5, 9, 3, 7, 2]])}, {"input_ids": torch.tensor([[4, 4, 8, 60, 33]])}]


def test_exported_lora_loads_in_peft_as_w0_plus_ba(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = _dora_model()
    report = dorafit.export_lora(model, tmp_path / "lora", rank=3, inputs=INPUTS)
    assert report.path == tmp_path / "lora"
    state = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert not any("magnitude" in k for k in state)
    peft_model = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "lora").eval()
    base = _tiny_llama()
    for name, _ in dorafit.adapter_modules(model):
        key = f"base_model.model.{name}"
        a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        assert a.shape[0] == 3
        layer = peft_model.base_model.model.get_submodule(name)
        w0 = base.get_submodule(name).weight
        peft_weight = layer.base_layer.weight + layer.get_delta_weight("default")
        torch.testing.assert_close(peft_weight, w0 + b @ a, rtol=1e-6, atol=1e-6)
    # PEFT's outputs are those of W0 + BA merged into the base model by hand
    with torch.no_grad():
        for name, _ in dorafit.adapter_modules(model):
            key = f"base_model.model.{name}"
            base.get_submodule(name).weight += state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
        for batch in INPUTS:
            torch.testing.assert_close(peft_model(**batch).logits, base(**batch).logits, rtol=1e-5, atol=1e-5)


def test_full_rank_is_exact_and_the_error_falls_with_rank():
    model = _dora_model()
    with torch.no_grad():
        tuned = [model(**b).logits for b in INPUTS]
    errors, drifts = [], []
    for rank in (1, 2, 4, 8, 16, 32):
        report = dorafit.export_lora(model, rank=rank, inputs=INPUTS)
        errors.append(report.weight_error)
        drifts.append(report.logits_drift)
        for name, err in report.layer_errors.items():
            assert 0 <= err <= 1
    assert all(a >= b for a, b in zip(errors, errors[1:])) and errors[0] > 0.1
    assert errors[-1] < 1e-6 and drifts[-1] < 1e-5  # rank 32 = min(out, in) of every layer here
    assert drifts[0] > drifts[-1]
    # the model is left as it was: one adapter, same outputs
    assert dorafit.list_adapters(model) == ["default"] and dorafit.active_adapter(model) == "default"
    with torch.no_grad():
        assert all(torch.equal(model(**b).logits, t) for b, t in zip(INPUTS, tuned))


def test_max_error_picks_the_smallest_rank_within_it():
    model = _dora_model()
    spectra = update_spectra(model)
    rank = choose_rank(spectra, 0.3)
    assert overall_error(spectra, rank) <= 0.3 < overall_error(spectra, rank - 1)
    report = dorafit.export_lora(model, max_error=0.3)
    assert report.rank == rank and report.weight_error <= 0.3
    with pytest.raises(ValueError, match="exactly one of rank and max_error"):
        dorafit.export_lora(model, rank=2, max_error=0.1)
    with pytest.raises(ValueError, match=r"max_error must be in \[0, 1\)"):
        dorafit.export_lora(model, max_error=1.5)


def test_reported_error_is_the_svd_tail():
    """The layer error equals ‖ΔW − B A‖ / ‖ΔW‖ computed from the written factors."""
    model = _dora_model()
    report = dorafit.export_lora(model, rank=2)
    for name, a in dorafit.adapter_modules(model):
        with torch.no_grad():
            delta = (a.merged_weight_2d() - a.base_weight_2d()).double()
        u, s, vh = torch.linalg.svd(delta)
        approx = (u[:, :2] * s[:2]) @ vh[:2]
        want = float(torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta))
        assert report.layer_errors[name] == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------- one scale for every reader


def test_capped_layers_get_one_rank_and_one_scale_that_every_reader_applies(tmp_path):
    """Rank 20 on a model whose k/v projections allow 16: every layer is written at rank 20 (k/v
    padded with zeros), lora_alpha = r and no patterns, so PEFT (alpha / r per layer), llama.cpp
    (alpha / r from the layer's tensors) and vLLM (alpha / r from the config) all scale by 1; PEFT
    and dorafit then compute the report's drift."""
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    model = dorafit.attach(_tiny_llama(), AdapterConfig(rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=gen) * 0.3)
    report = dorafit.export_lora(model, tmp_path / "lora", rank=20, inputs=INPUTS)
    assert sorted(set(report.layer_ranks.values())) == [16, 20]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"], cfg["use_rslora"]) == (20, 20, {}, {}, False)
    state = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    k_a = state["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    assert k_a.shape == (20, 32) and not k_a[16:].any()  # zero rows past the layer's own rank
    tuned = [model(**b).logits.detach() for b in INPUTS]
    peft_model = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "lora").eval()
    ours = dorafit.load_adapter(_tiny_llama(), tmp_path / "lora", trainable=False)
    assert {a.rank for _, a in dorafit.adapter_modules(ours)} == {16, 20}  # rank > min(out, in) loaded at 16
    with torch.no_grad():
        theirs = [peft_model(**b).logits for b in INPUTS]
        mine = [ours(**b).logits for b in INPUTS]
    drift = sum(float((t - w).pow(2).sum()) for t, w in zip(theirs, tuned)) ** 0.5 / sum(float(w.pow(2).sum()) for w in tuned) ** 0.5
    assert drift == pytest.approx(report.logits_drift, rel=1e-4)
    for t, m in zip(theirs, mine):
        torch.testing.assert_close(m, t, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- pre-normalized DoRA


def _eq5_scale(adapter):
    """g = m / ‖W0 + s B A‖ per row in float64 (TensorRT-LLM's normalize_weights.py formula)."""
    w0 = adapter.base_weight_2d().double()
    delta = adapter.scaling * (adapter.lora_b.double() @ adapter.lora_a.double())
    return adapter.magnitude.double() / (w0 + delta).norm(dim=1)


def test_dora_normalized_holds_g_and_loads_back_exactly(tmp_path):
    import json

    from safetensors.torch import load_file

    from dorafit.export import export_dora_normalized
    from dorafit.normalized import base_weights_hash

    model = _dora_model()
    path = export_dora_normalized(model, tmp_path / "normalized")
    cfg = json.loads((path / "adapter_config.json").read_text())
    record = cfg["dora_normalized"]
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    assert record["convention"] == "g = m / ||W0 + s B A|| per output feature"
    assert record["base_weights_dtype"] == "float32" and record["magnitude_dtype"] == "float32"
    names = [n for n, _ in dorafit.adapter_modules(model)]
    assert record["base_weights_sha256"] == base_weights_hash(_tiny_llama(), names)
    state = load_file(str(path / "adapter_model.safetensors"))
    for name, a in dorafit.adapter_modules(model):
        g = state[f"base_model.model.{name}.lora_magnitude_vector"]
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), _eq5_scale(a), rtol=1e-6, atol=0)
        torch.testing.assert_close(state[f"base_model.model.{name}.lora_A.weight"], a.lora_a.detach())
    # the served form g ⊙ (W0 x + s B A x) + b is the adapted layer's output
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    g = state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    served = g * (x @ layer.base.weight.T + layer.scaling * (x @ layer.lora_a.T) @ layer.lora_b.T)
    torch.testing.assert_close(served.detach(), layer(x).detach(), rtol=1e-6, atol=1e-6)
    # dorafit rebuilds m = g ⊙ ‖W0 + s B A‖: the magnitudes and the outputs come back
    loaded = dorafit.load_adapter(_tiny_llama(), path, trainable=False)
    for (name, a), (_, b) in zip(dorafit.adapter_modules(model), dorafit.adapter_modules(loaded)):
        torch.testing.assert_close(b.magnitude, a.magnitude.detach(), rtol=1e-6, atol=0)
    with torch.no_grad():
        for batch in INPUTS:
            want, got = model(**batch).logits, loaded(**batch).logits
            assert float((got - want).norm() / want.norm()) < 1e-6


def test_dora_normalized_refuses_another_base_unless_told(tmp_path):
    from dorafit.export import export_dora_normalized

    path = export_dora_normalized(_dora_model(), tmp_path / "normalized")
    other = _tiny_llama()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # e.g. the base re-quantized
    with pytest.raises(dorafit.AdapterFileError, match=r"pre-normalized DoRA .* computed against base weights with "
                                                       r"sha256 [0-9a-f]{12}.*allow_base_mismatch=True"):
        dorafit.load_adapter(other, path)
    assert not dorafit.adapter_modules(other)
    with pytest.warns(UserWarning, match="magnitude is rebuilt for this base"):
        dorafit.load_adapter(other, path, allow_base_mismatch=True)
    # it computes what an engine computes there: the exported g on the new W0
    layer = other.model.layers[1].mlp.down_proj
    from safetensors.torch import load_file

    g = load_file(str(path / "adapter_model.safetensors"))["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"]
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(1))
    served = g * (x @ layer.base.weight.T + layer.scaling * (x @ layer.lora_a.T) @ layer.lora_b.T)
    torch.testing.assert_close(layer(x).detach(), served.detach(), rtol=1e-5, atol=1e-6)


def test_dora_normalized_check_reports_the_drift_of_another_base(tmp_path):
    import copy

    from dorafit.export import check_dora_normalized, export_dora_normalized

    model = _dora_model()
    path = export_dora_normalized(model, tmp_path / "normalized")
    ordinary = dorafit.save_adapter(model, tmp_path / "ordinary", format="peft")
    same = check_dora_normalized(model, dorafit.load_adapter(_tiny_llama(), path), dorafit.load_adapter(_tiny_llama(), ordinary), INPUTS)
    assert same.drift < 1e-6 and same.drift_recomputed < 1e-6
    shifted = _tiny_llama()
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 1e-3)
    served = dorafit.load_adapter(copy.deepcopy(shifted), path, allow_base_mismatch=True)
    report = check_dora_normalized(model, served, dorafit.load_adapter(shifted, ordinary), INPUTS)
    assert report.drift > 1e-4 and report.drift_of_change > report.drift and report.drift_recomputed > 0


def test_dora_normalized_needs_dora():
    from dorafit.export import export_dora_normalized

    model = dorafit.attach(_tiny_llama(), AdapterConfig(method="lora", rank=2, targets=["q_proj"]))
    with pytest.raises(dorafit.AdapterError, match="needs a DoRA adapter on every module"):
        export_dora_normalized(model, "/nonexistent/never-written")
