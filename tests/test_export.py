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
