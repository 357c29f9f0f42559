"""QDoRA and friends on a 4-bit NF4 base (bitsandbytes Linear4bit, run on the CPU here).

The reference is the same method on an nn.Linear holding the dequantized weight: outputs and
gradients must agree to 1e-4 relative. Also: no dequantization during training steps, merge to
a dequantized nn.Linear (with a warning), transformers' 4-bit loading, adapter files.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorafit
from dorafit import quant
from dorafit.layers import quantized

bnb = pytest.importorskip("bitsandbytes")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.act = nn.GELU()
        self.down = nn.Linear(96, 64, bias=False)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def quantized_and_dequantized(dtype=torch.float32):
    """(4-bit model, the same model with nn.Linear layers holding the dequantized weights)."""
    torch.manual_seed(0)
    model = Block().to(dtype)
    assert quant.quantize_model(model, ["up", "down"], "nf4") == ["up", "down"]
    plain = Block().to(dtype)
    with torch.no_grad():
        for name in ("up", "down"):
            q = model.get_submodule(name)
            p = plain.get_submodule(name)
            p.weight.copy_(quant.dequantize_weight(q))
            if q.bias is not None:
                p.bias.copy_(q.bias)
    return model, plain


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            for name in a.adapter_parameter_names():
                p = getattr(a, name)
                if name == "magnitude":
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def copy_adapters(src, dst):
    with torch.no_grad():
        for (name, a), (_, b) in zip(dorafit.adapter_modules(src), dorafit.adapter_modules(dst)):
            for pname in a.adapter_parameter_names():
                getattr(b, pname).copy_(getattr(a, pname))


def rel_err(got, want):
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize(
    "method,detach_norm",
    [("dora", True), ("dora", False), ("lora", True), ("dvora", True), ("magnitude", True)],
)
def test_matches_the_method_on_dequantized_weights(method, detach_norm):
    q_model, plain = quantized_and_dequantized()
    cfg = dorafit.AdapterConfig(method=method, rank=4, alpha=8, targets=["up", "down"], detach_norm=detach_norm)
    dorafit.attach(q_model, cfg)
    dorafit.attach(plain, cfg)
    assert type(q_model.up).__name__ in ("Linear4bitAdapter", "VeraLinear4bitAdapter")
    randomize(q_model)
    copy_adapters(q_model, plain)
    torch.testing.assert_close(q_model.up.w0_norm_sq, plain.up.w0_norm_sq, rtol=1e-6, atol=0)

    x = torch.randn(6, 64)
    outs, grads = [], []
    for model in (q_model, plain):
        params = [p for p in model.parameters() if p.requires_grad]
        y = model(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.detach().clone() for p in params])
    assert rel_err(outs[0], outs[1]) <= 1e-4
    assert len(grads[0]) == len(grads[1]) > 0
    for g_q, g_p in zip(*grads):
        assert rel_err(g_q, g_p) <= 1e-4


def test_training_steps_never_dequantize_the_weight(monkeypatch):
    q_model, _ = quantized_and_dequantized()
    dorafit.attach(q_model, dorafit.AdapterConfig(method="dora", rank=4, targets=["up", "down"], dropout=0.1))
    calls = []
    real = quantized.dequantize_weight
    monkeypatch.setattr(quantized, "dequantize_weight", lambda m: calls.append(m) or real(m))
    opt = torch.optim.AdamW([p for p in q_model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 64)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = q_model(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert calls == []  # the norm runs through the 4-bit kernel; ‖W0‖² was cached at attach
    assert losses[-1] < losses[0]
    assert q_model.up.base.weight.dtype == torch.uint8  # still packed 4-bit


def test_cross_term_runs_the_quantized_base_on_a_rows():
    q_model, plain = quantized_and_dequantized()
    dorafit.attach(q_model, dorafit.AdapterConfig(method="dora", rank=4, targets=["up"]))
    layer = q_model.up
    a = torch.randn(4, 64)
    torch.testing.assert_close(layer.cross_term(a), a @ plain.up.weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_gives_a_dequantized_linear_and_says_so(dtype):
    q_model, _ = quantized_and_dequantized(dtype)
    dorafit.attach(q_model, dorafit.AdapterConfig(method="dora", rank=4, targets=["up", "down"]))
    randomize(q_model)
    x = torch.randn(5, 64, dtype=dtype)
    with torch.no_grad():
        y = q_model(x)
        with pytest.warns(UserWarning, match="no longer quantized"):
            dorafit.merge(q_model)
        assert type(q_model.up) is nn.Linear and q_model.up.weight.dtype == dtype
        assert not quant.quantized_modules(q_model)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(q_model(x), y, rtol=tol, atol=tol)


def test_detach_restores_the_4bit_layers():
    q_model, _ = quantized_and_dequantized()
    original = q_model.up
    dorafit.attach(q_model, dorafit.AdapterConfig(method="dora", rank=4, targets=["all-linear"]))
    assert {n for n, _ in dorafit.adapter_modules(q_model)} == {"up", "down"}  # all-linear sees 4-bit layers
    dorafit.detach(q_model)
    assert q_model.up is original and isinstance(original, bnb.nn.Linear4bit)


def test_adapter_file_loads_on_a_4bit_and_on_a_full_precision_base(tmp_path):
    torch.manual_seed(0)
    full = Block()
    q_model = copy.deepcopy(full)
    quant.quantize_model(q_model, ["up", "down"])
    dorafit.attach(q_model, dorafit.AdapterConfig(method="dora", rank=4, targets=["up", "down"]))
    randomize(q_model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = q_model(x)
    dorafit.save_adapter(q_model, tmp_path / "a")

    q_again = copy.deepcopy(full)
    quant.quantize_model(q_again, ["up", "down"])
    dorafit.load_adapter(q_again, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(q_again(x), y)

    dorafit.load_adapter(full, tmp_path / "a")  # same logical shapes: serves on the original weights
    assert [type(a).__name__ for _, a in dorafit.adapter_modules(full)] == ["LinearAdapter", "LinearAdapter"]


def test_quantize_model_reports_bad_targets():
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv1d(4, 4, 1))
    with pytest.raises(quant.QuantizationError, match="'1' is a Conv1d"):
        quant.quantize_model(model, ["0", "1"])
    assert type(model[0]) is nn.Linear  # nothing changed
    quant.quantize_model(model, ["0"])
    with pytest.raises(quant.QuantizationError, match="already 4-bit"):
        quant.quantize_model(model, ["0"])
    with pytest.raises(quant.QuantizationError, match="quant_type"):
        quant.quantize_linear(nn.Linear(64, 64), "int3")


def test_transformers_4bit_model(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=96, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = quant.from_pretrained_4bit(AutoModelForCausalLM, tmp_path / "base", compute_dtype=torch.float32,
                                       device_map="cpu")
    assert "model.layers.0.self_attn.q_proj" in quant.quantized_modules(model)
    dorafit.attach(model, dorafit.AdapterConfig(method="dora", rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer).__name__ == "Linear4bitAdapter"
    randomize(model)

    ids = torch.randint(0, 96, (2, 7))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert layer.lora_b.grad is not None and layer.magnitude.grad is not None

    # The layer equals DoRA on its dequantized weight.
    plain = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        plain.weight.copy_(quant.dequantize_weight(layer.base))
    ref = dorafit.attach(nn.Sequential(plain), dorafit.AdapterConfig(method="dora", rank=4, targets=["0"]))
    with torch.no_grad():
        for name in ("lora_a", "lora_b", "magnitude"):
            getattr(ref[0], name).copy_(getattr(layer, name))
        x = torch.randn(3, 64)
        assert rel_err(layer(x), ref(x)) <= 1e-4


def repackable_model():
    """(4-bit two-layer MLP, its dequantized twin); every in_features is a multiple of the 64-value
    block, as bnb's CPU inference repacking needs."""
    torch.manual_seed(0)
    q_model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False))
    plain = copy.deepcopy(q_model)
    quant.quantize_model(q_model, ["0", "2"])
    return q_model, plain


def run_inference_pass(model, x):
    """An eval-mode no-grad forward: where bnb 0.49+ repacks CPU 4-bit weights for inference."""
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()


def test_dequantize_reads_a_layer_repacked_for_cpu_inference():
    q_model, _ = repackable_model()
    layer = q_model[0]
    w_before = quant.dequantize_weight(layer)
    run_inference_pass(q_model, torch.randn(2, 64))
    if not quantized.is_packed_for_cpu_inference(layer):
        pytest.skip("this CPU / bitsandbytes does not repack 4-bit weights for inference")
    packed = layer.weight.data.clone()
    w = quant.dequantize_weight(layer)
    # The repacking rounds the block scales to bf16 (about 4e-3 relative), nothing more.
    assert rel_err(w.float(), w_before) <= 1e-2
    assert quantized.is_packed_for_cpu_inference(layer) and torch.equal(layer.weight.data, packed)  # untouched


def test_inference_pass_before_and_after_attach_keeps_the_trainable_path():
    q_model, plain = repackable_model()
    x = torch.randn(6, 64)
    run_inference_pass(q_model, x)  # may repack both layers (CPU inference kernel, no backward)
    cfg = dorafit.AdapterConfig(method="dora", rank=4, targets=["0"], detach_norm=False)
    dorafit.attach(q_model, cfg)  # "2" stays a frozen 4-bit layer the gradient must cross
    assert not any(quantized.is_packed_for_cpu_inference(m) for m in q_model.modules())
    randomize(q_model)
    run_inference_pass(q_model, x)  # evaluation during training must not repack them again
    assert not any(quantized.is_packed_for_cpu_inference(m) for m in q_model.modules())

    with torch.no_grad():
        plain[0].weight.copy_(quant.dequantize_weight(q_model[0].base))
        plain[2].weight.copy_(quant.dequantize_weight(q_model[2]))
    dorafit.attach(plain, cfg)
    copy_adapters(q_model, plain)
    outs, grads = [], []
    for model in (q_model, plain):
        y = model(x)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert rel_err(outs[0], outs[1]) <= 1e-4
    assert len(grads[0]) == len(grads[1]) == 3
    for g_q, g_p in zip(*grads):
        assert g_q is not None and rel_err(g_q, g_p) <= 1e-4

    dorafit.detach(q_model)  # bnb's own inference repacking (0.49+) is allowed again
    if hasattr(bnb.functional, "has_avx512bf16"):
        assert q_model[2].support_avx512bf16_for_cpu == bnb.functional.has_avx512bf16()
    assert not hasattr(q_model[2], "_dorafit_saved_cpu_repack")
