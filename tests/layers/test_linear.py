"""LinearAdapter and Conv1DAdapter (transformers GPT-2 Conv1D) against paper Eq. 5.

Also the layer invariants: initialisation (A Kaiming-uniform, B zero, m = ‖W0‖), scaling
(alpha / r, rsLoRA), bias not scaled, dropout semantics, the factored norm's cost (no (out, in)
temporary, no identity), its cache, and dtypes.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dorafit
from dorafit import functional as DF
from dorafit.layers import Conv1DAdapter, LinearAdapter
from dorafit.layers.compose import choose_path
from transformers.pytorch_utils import Conv1D


def make_linear(in_f=12, out_f=10, bias=True, method="dora", rank=4, alpha=8.0, **kw):
    return LinearAdapter(nn.Linear(in_f, out_f, bias=bias), method=method, rank=rank, alpha=alpha, **kw)


def make_conv1d(in_f=12, out_f=10, method="dora", rank=4, alpha=8.0, **kw):
    base = Conv1D(out_f, in_f)  # transformers: Conv1D(nf=out, nx=in), weight (in, out)
    with torch.no_grad():
        base.weight.normal_(0, 0.2)
        base.bias.normal_(0, 0.2)
    return Conv1DAdapter(base, method=method, rank=rank, alpha=alpha, **kw)


FACTORIES = {"linear": make_linear, "linear_nobias": lambda **kw: make_linear(bias=False, **kw), "conv1d_gpt2": make_conv1d}


# ------------------------------------------------------------------------------------------
# Initialisation and scaling


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_init_and_layout(kind):
    layer = FACTORIES[kind](method="dora", rank=4)
    w0 = layer.base.weight if kind != "conv1d_gpt2" else layer.base.weight.t()
    assert layer.lora_a.shape == (4, 12)
    assert layer.lora_b.shape == (10, 4)
    assert layer.magnitude.shape == (10,)
    assert torch.count_nonzero(layer.lora_b) == 0
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.vector_norm(w0.detach(), dim=1))
    # Kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(12)
    assert layer.lora_a.abs().max() <= bound + 1e-7
    assert layer.lora_a.abs().max() > 0.5 * bound  # not zero, not a tiny init
    assert all(not p.requires_grad for p in layer.base.parameters())
    # ‖W0‖² per output feature is cached, in float32, when the adapter is built
    assert layer.w0_norm_sq.dtype == torch.float32
    torch.testing.assert_close(layer.w0_norm_sq, w0.detach().pow(2).sum(dim=1))


def test_w0_norm_sq_stays_float32_after_module_to_half():
    model = nn.Sequential(nn.Linear(64, 64))
    dorafit.attach(model, dorafit.AdapterConfig(rank=4, targets=["0"]))
    model.to(torch.bfloat16)
    layer = model[0]
    assert layer.w0_norm_sq.dtype == torch.float32
    torch.testing.assert_close(layer.w0_norm_sq, layer.base.weight.float().pow(2).sum(dim=1))


def test_kaiming_uniform_statistics():
    layer = make_linear(in_f=256, out_f=256, rank=64)
    bound = 1 / math.sqrt(256)
    a = layer.lora_a.detach()
    # uniform(-bound, bound): mean 0, variance bound² / 3
    assert abs(a.mean().item()) < 0.05 * bound
    assert a.var().item() == pytest.approx(bound**2 / 3, rel=0.05)


def test_scaling_and_rslora():
    assert make_linear(rank=4, alpha=8).scaling == pytest.approx(2.0)
    cfg = dorafit.AdapterConfig(rank=4, alpha=8, rslora=True, targets=["0"])
    model = dorafit.attach(nn.Sequential(nn.Linear(12, 10)), cfg)
    assert model[0].scaling == pytest.approx(8 / math.sqrt(4))
    cfg = dorafit.AdapterConfig(rank=4, alpha=8, targets=["0"])
    assert dorafit.attach(nn.Sequential(nn.Linear(12, 10)), cfg)[0].scaling == pytest.approx(2.0)


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_step0_identity(kind, method):
    layer = FACTORIES[kind](method=method)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=1e-6, atol=1e-6)
    assert layer.magnitude is None if method == "lora" else layer.magnitude is not None


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("tokens", [1, 5, 40])  # decode; fewer and more tokens than inputs (12)
def test_step0_identity_without_autograd_is_bit_exact(kind, tokens):
    """Just attached (B = 0, m = ‖W0‖), a DoRA layer evaluates exactly as its base: g = m / n is a
    correctly rounded division, 1 where m = n (batch norm's m · (1 / √n²) is 1 ulp off for about
    a quarter of the rows). Rows of very different norms, so that g ≠ 1 would show."""
    layer = FACTORIES[kind](method="dora").eval()
    with torch.no_grad():
        layer.base.weight.mul_(torch.logspace(-2, 2, layer.base.weight.numel()).reshape(layer.base.weight.shape))
    layer.magnitude.data = layer.w0_norm_sq.sqrt()  # m = ‖W0‖ of the new weight, as at attach
    x = torch.randn(tokens, 12)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))


# ------------------------------------------------------------------------------------------
# Eq. 5: outputs and gradients


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_matches_eq5(ref, kind, method, detach_norm):
    layer = ref.randomize_adapter(FACTORIES[kind](method=method, detach_norm=detach_norm))
    x = torch.randn(2, 7, 12)
    ref.check_against_eq5(layer, x, detach_norm=detach_norm)
    ref.check_reference_forward(layer, x)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_eval_matches_eq5(ref, kind):
    layer = ref.randomize_adapter(FACTORIES[kind](method="dora", dropout=0.3)).eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        y = layer(x)
        y_ref = ref.eq5_forward(layer, x.double(), dtype=torch.float64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(40, 12), (3, 20, 12)])
def test_eval_with_many_tokens_scales_weight_rows(ref, bias, shape):
    """More tokens than input features: g scales W0's and B's rows instead of the output."""
    layer = ref.randomize_adapter(make_linear(bias=bias, dropout=0.3)).eval()
    with torch.no_grad():
        layer.magnitude[3] = 0.0  # g_i = 0 is fine here: nothing is divided by g
        x = torch.randn(*shape)
        assert choose_path(layer, x) == "dora-no-grad-rows"
        y = layer(x)
        y_ref = ref.eq5_forward(layer, x.double(), dtype=torch.float64)
    assert y.shape == (*shape[:-1], 10)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.all(y[..., 3] == (layer.base.bias[3] if bias else 0.0))


def test_eval_scaled_weight_rows_only_where_cheaper_and_plain(ref):
    layer = ref.randomize_adapter(make_linear()).eval()
    many, few = torch.randn(40, 12), torch.randn(12, 12)
    with torch.no_grad():
        assert choose_path(layer, few) == "dora-no-grad-addmm"  # tokens ≤ in: the output pass is cheaper
        assert choose_path(layer, many.bfloat16()) == "dora-no-grad"  # input and adapter dtypes differ
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert choose_path(layer, many) == "dora-no-grad"
        handle = layer.base.register_forward_hook(lambda *args: None)  # a hook expects the call
        assert choose_path(layer, many) == "dora-no-grad"
        handle.remove()
        assert choose_path(layer, many) == "dora-no-grad-rows"


def test_eval_with_many_tokens_allocates_less_than_the_output(ref):
    in_f, out_f, tokens = 64, 256, 128
    layer = ref.randomize_adapter(make_linear(in_f=in_f, out_f=out_f)).eval()
    x = torch.randn(tokens, in_f)
    with torch.no_grad():
        layer(x)  # the norm, once
        with ref.AllocationRecorder() as rec:
            y = layer(x)
    sizes = [n for n, _ in rec.sizes]
    assert out_f * in_f in sizes  # g ⊙ W0, the path taken
    assert max(sizes) == tokens * out_f  # nothing larger than the output
    assert sizes.count(tokens * out_f) == 1  # the low-rank product went into it in place
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-5, atol=1e-5)


def test_eval_with_many_tokens_follows_weight_changes(ref):
    layer = ref.randomize_adapter(make_linear()).eval()
    x = torch.randn(40, 12)
    with torch.no_grad():
        before = layer(x)
        layer.lora_b.add_(0.5)
        layer.magnitude.mul_(1.2)
        after = layer(x)
        y_ref = ref.eq5_forward(layer, x.double(), dtype=torch.float64)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_detach_changes_gradient_of_a_and_b(ref):
    """Detached and full gradients differ (else the detach test above would be vacuous)."""
    grads = {}
    for detach in (True, False):
        layer = ref.randomize_adapter(make_linear(detach_norm=detach))
        layer(torch.randn(5, 12, generator=torch.Generator().manual_seed(3))).pow(2).sum().backward()
        grads[detach] = layer.lora_a.grad.clone()
    assert (grads[True] - grads[False]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
def test_bias_not_scaled_by_magnitude(ref, kind):
    """y − b must equal W' x: the bias is added after the magnitude scaling."""
    layer = ref.randomize_adapter(FACTORIES[kind]())
    with torch.no_grad():
        layer.magnitude.mul_(3.0)
        layer.base.bias.fill_(5.0)
    x = torch.randn(4, 12)
    w0 = ref.base_w0_2d(layer).detach()
    w_prime = ref.eq5_weight(w0, layer.lora_a.detach(), layer.lora_b.detach(), layer.scaling, layer.magnitude.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - 5.0, x @ w_prime.t(), rtol=1e-5, atol=1e-4)
        # merged weights agree with the unmerged output (the bias unchanged)
        merged = layer.merged_weight_2d()
        torch.testing.assert_close(layer(x), x @ merged.t() + layer.base.bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", list(FACTORIES))
@pytest.mark.parametrize("mode", ["input", "lowrank"])
@pytest.mark.parametrize("method,detach", [("lora", True), ("dora", True), ("dora", False)])
def test_dropout_semantics(ref, kind, mode, method, detach):
    layer = ref.randomize_adapter(FACTORIES[kind](method=method, dropout=0.4, dropout_mode=mode, detach_norm=detach))
    x = torch.randn(3, 6, 12)
    ref.check_against_eq5(layer, x, detach_norm=detach, dropout_p=0.4, dropout_mode=mode)
    assert layer.dropout.calls == 1  # the same dropped input feeds W0 x' and B A x'


def test_dropout_input_mode_differs_from_lowrank(ref):
    """The two modes really are different formulas (guards the test above)."""
    x = torch.randn(3, 12)
    outs = []
    for mode in ("input", "lowrank"):
        layer = ref.randomize_adapter(make_linear(dropout=0.5, dropout_mode=mode))
        layer.dropout = ref.FixedMaskDropout(0.5)
        outs.append(layer(x).detach())
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_dropout_real_module_and_eval():
    layer = make_linear(dropout=0.5)
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.5
    layer.eval()
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), layer(x))  # deterministic in eval
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    y2 = layer(x)
    # B = 0 at init: dropout has no effect at step 0 in either mode
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_reference_forward_with_dropout_fixed_mask(ref, method):
    for mode in ("input", "lowrank"):
        layer = ref.randomize_adapter(make_linear(method=method, dropout=0.3, dropout_mode=mode))
        layer.dropout = ref.FixedMaskDropout(0.3)
        ref.check_reference_forward(layer, torch.randn(5, 12))


# ------------------------------------------------------------------------------------------
# Property tests: random shapes, ranks, dtypes


@settings(max_examples=12, deadline=None)
@given(
    # in_f = 1 is left out: each row's direction is then ±1, the true gradient of A is 0 and
    # float32 round-off (amplified by 1/‖W0 + sBA‖ on near-cancelled rows) is all that remains.
    in_f=st.integers(2, 24),
    out_f=st.integers(1, 24),
    rank_frac=st.floats(0.01, 1.0),
    alpha=st.floats(0.5, 32.0),
    bias=st.booleans(),
    method=st.sampled_from(["lora", "dora"]),
    detach=st.booleans(),
    gpt2=st.booleans(),
    tokens=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(ref, in_f, out_f, rank_frac, alpha, bias, method, detach, gpt2, tokens, seed):
    torch.manual_seed(seed)
    rank = max(1, int(rank_frac * min(in_f, out_f)))
    if gpt2:
        layer = make_conv1d(in_f, out_f, method=method, rank=rank, alpha=alpha, detach_norm=detach)
    else:
        layer = make_linear(in_f, out_f, bias=bias, method=method, rank=rank, alpha=alpha, detach_norm=detach)
    ref.randomize_adapter(layer, scale=0.3, seed=seed)
    ref.check_against_eq5(layer, torch.randn(tokens, in_f), detach_norm=detach, rtol=1e-4, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    out_f=st.integers(1, 40),
    in_f=st.integers(1, 40),
    rank=st.integers(1, 8),
    scaling=st.floats(0.01, 10.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_property_factored_norm(out_f, in_f, rank, scaling, dtype, seed):
    """weight_norm() is float32 and equals ‖W0 + sBA‖ computed in float64, for any base dtype."""
    torch.manual_seed(seed)
    rank = min(rank, in_f, out_f)
    layer = LinearAdapter(nn.Linear(in_f, out_f).to(dtype), rank=rank, alpha=scaling * rank)
    with torch.no_grad():
        layer.lora_b.normal_()
    norm = layer.weight_norm()
    assert norm.dtype == torch.float32
    w0 = layer.base.weight.detach().double()
    want = torch.linalg.vector_norm(w0 + layer.scaling * (layer.lora_b.double() @ layer.lora_a.double()), dim=1)
    torch.testing.assert_close(norm.double(), want, rtol=2e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Dtypes


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", ["float32", "base"])
@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
def test_half_precision_bases(ref, base_dtype, adapter_dtype, kind):
    layer = FACTORIES[kind](in_f=32, out_f=24, rank=4, adapter_dtype=adapter_dtype)
    layer.base.to(base_dtype)
    # the adapter was built on an fp32 base here; rebuild on the half base to get the dtype rule
    layer = type(layer)(layer.base, rank=4, alpha=8.0, adapter_dtype=adapter_dtype)
    want_dtype = torch.float32 if adapter_dtype == "float32" else base_dtype
    assert layer.lora_a.dtype == layer.lora_b.dtype == layer.magnitude.dtype == want_dtype
    ref.randomize_adapter(layer, scale=0.3)
    norm = layer.weight_norm()
    assert norm.dtype == torch.float32
    assert layer.w0_norm_sq.dtype == torch.float32
    x = torch.randn(3, 5, 32).to(base_dtype)
    y = layer(x)
    assert y.dtype == base_dtype
    y.float().sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_a.grad.dtype == want_dtype
    with torch.no_grad():
        y_ref = ref.eq5_forward(layer, x.double(), dtype=torch.float64)
    tol = 2e-2 if base_dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * 2)


def test_bf16_base_fp32_adapter_under_autocast():
    base = nn.Linear(16, 16).to(torch.bfloat16)
    layer = LinearAdapter(base, rank=4, adapter_dtype="float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.magnitude.grad is not None


def test_norm_not_computed_in_half(monkeypatch):
    """Every matmul of the norm computation runs in float32 even for a bf16 base and adapter."""
    layer = LinearAdapter(nn.Linear(32, 16).to(torch.bfloat16), rank=4, adapter_dtype="base")
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                seen.append(out.dtype)
            return out

    with Record():
        norm = layer._compute_norm()
    assert norm.dtype == torch.float32
    assert seen and all(d == torch.float32 for d in seen), seen


def test_norm_float32_under_autocast():
    layer = LinearAdapter(nn.Linear(256, 256), rank=8)
    with torch.no_grad():
        layer.lora_a.normal_()
        layer.lora_b.normal_(0, 0.05)
    w = layer.base.weight.double() + layer.scaling * layer.lora_b.double() @ layer.lora_a.double()
    want = torch.linalg.vector_norm(w, dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(4, 256))
        norm = layer.weight_norm()
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The factored norm's cost: no (out, in) temporary, no identity matrix


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_out_by_in_temporary_and_no_eye(ref, detach_norm, dropout):
    out_f = in_f = 512
    layer = LinearAdapter(nn.Linear(in_f, out_f), rank=4, alpha=8, detach_norm=detach_norm, dropout=dropout)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(8, in_f, requires_grad=True)
    eye_calls = []
    real_eye = torch.eye

    def spy_eye(*a, **k):
        eye_calls.append(a)
        return real_eye(*a, **k)

    torch.eye = spy_eye
    try:
        ref.check_no_weight_sized_temporary(layer, x, out_f * in_f)
    finally:
        torch.eye = real_eye
    assert not eye_calls
    assert layer.lora_b.grad is not None


def test_allocation_recorder_sees_materialisation(ref):
    """The recorder does catch an (out, in) temporary (so the test above can fail)."""
    layer = LinearAdapter(nn.Linear(512, 512), rank=4)
    with ref.AllocationRecorder() as rec:
        layer.reference_forward(torch.randn(8, 512)).sum().backward()
    assert any(n >= 512 * 512 for n, _ in rec.sizes)


def test_cross_term_runs_the_base_layer():
    base = nn.Linear(16, 12)
    inputs = []
    base.register_forward_hook(lambda mod, args, out: inputs.append(tuple(args[0].shape)))
    layer = LinearAdapter(base, rank=4)
    with torch.no_grad():
        layer.lora_b.normal_()
    inputs.clear()
    layer.weight_norm()
    assert (4, 16) in inputs, f"base layer inputs during the norm: {inputs}"


# ------------------------------------------------------------------------------------------
# Norm cache: accumulation, optimizer step, eval, checkpoint recomputation


def _count_norms(monkeypatch, layer):
    calls = []
    real = layer._compute_norm_sq

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "_compute_norm_sq", counted)
    return calls


def test_norm_cache_across_microbatches_and_steps(monkeypatch):
    layer = make_linear(in_f=16, out_f=16)
    calls = _count_norms(monkeypatch, layer)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two micro-batches, one norm
        layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert len(calls) == 1
    opt.step()
    opt.zero_grad()
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert len(calls) == 2  # A and B changed: recomputed
    # the recomputed norm is the current one
    layer.eval()
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(2, 16))
    assert len(calls) == 2  # kept in eval
    w = layer.base.weight.detach() + layer.scaling * layer.lora_b.detach() @ layer.lora_a.detach()
    torch.testing.assert_close(layer.weight_norm(), torch.linalg.vector_norm(w, dim=1), rtol=1e-5, atol=1e-6)


def test_kept_zeros_made_once_and_again_only_where_they_cannot_serve():
    """The one-node paths' batch-norm statistics: one zero vector per layer across steps, a new
    one after a cast (its dtype) and none made in inference mode handed to autograd calls."""
    layer = make_linear(in_f=16, out_f=16)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    kept = []
    for _ in range(3):
        layer(torch.randn(4, 16)).pow(2).sum().backward()
        opt.step()
        kept.append(layer.norm_cache.zero_entry)
    assert kept[0] is kept[1] is kept[2] and not kept[0].any()
    layer.double()
    layer(torch.randn(4, 16, dtype=torch.float64)).sum().backward()
    assert layer.norm_cache.zero_entry.dtype == torch.float32  # n² stays float32 for a float64 base
    assert layer.norm_cache.zero_entry is not kept[0]  # the cast forgot it
    layer = make_linear(in_f=16, out_f=16)
    with torch.inference_mode():
        layer.norm_cache.zeros(torch.ones(16))
    assert layer.norm_cache.zero_entry.is_inference()
    y = layer(torch.randn(4, 16))
    y.pow(2).sum().backward()  # saved for backward: not the inference tensor
    assert not layer.norm_cache.zero_entry.is_inference()


@pytest.mark.parametrize("tokens,path", [(4, "dora-linear"), (40, "dora-linear-rows")])
def test_norm_cache_with_checkpoint_recomputation(monkeypatch, ref, tokens, path):
    layer = ref.randomize_adapter(make_linear(in_f=16, out_f=16))
    calls = _count_norms(monkeypatch, layer)
    x = torch.randn(tokens, 16, requires_grad=True)
    assert choose_path(layer, x) == path
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.pow(2).sum().backward()
    assert len(calls) == 1
    g_ckpt = [layer.lora_a.grad.clone(), layer.lora_b.grad.clone(), layer.magnitude.grad.clone(), x.grad.clone()]
    ref.zero_grads([layer.lora_a, layer.lora_b, layer.magnitude, x])
    layer(x).pow(2).sum().backward()
    for a, b in zip(g_ckpt, [layer.lora_a.grad, layer.lora_b.grad, layer.magnitude.grad, x.grad]):
        torch.testing.assert_close(a, b)


def test_full_gradient_norm_under_checkpoint_matches_reference(ref):
    layer = ref.randomize_adapter(make_linear(in_f=16, out_f=16, detach_norm=False))
    x = torch.randn(4, 16)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.pow(2).sum().backward()
    got = [layer.lora_a.grad.clone(), layer.lora_b.grad.clone(), layer.magnitude.grad.clone()]
    ref.zero_grads([layer.lora_a, layer.lora_b, layer.magnitude])
    ref.eq5_forward(layer, x.double(), detach_norm=False, dtype=torch.float64).pow(2).sum().backward()
    want = [layer.lora_a.grad, layer.lora_b.grad, layer.magnitude.grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)


def test_norm_cache_invalidated_by_load_state_dict(ref):
    layer = make_linear(in_f=16, out_f=16)
    x = torch.randn(3, 16)
    layer(x)  # caches the step-0 norm
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["lora_b"].normal_()
    state["lora_a"].normal_()
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


def test_norm_follows_base_weight_change():
    layer = make_linear(in_f=16, out_f=16)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 16)
    layer(x)
    with torch.no_grad():
        layer.base.weight.mul_(2.0)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize(
    "flavour",
    [
        {"foreach": False},
        {"foreach": True},
        {"fused": True},
    ],
    ids=["for-loop", "foreach", "fused"],
)
def test_norm_cache_invalidated_by_every_optimizer_kind(optimizer, flavour):
    layer = make_linear(in_f=16, out_f=16)
    opt = optimizer([p for p in layer.parameters() if p.requires_grad], lr=0.05, **flavour)
    x = torch.randn(4, 16)
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


def test_norm_cache_after_inference_mode():
    layer = make_linear(in_f=16, out_f=16).eval()
    with torch.inference_mode():
        layer(torch.randn(2, 16))
    layer.train()
    layer(torch.randn(2, 16)).sum().backward()
    assert layer.magnitude.grad is not None


def test_norm_cache_after_write_through_data():
    """Writes through ``param.data`` bypass version counters: the documented remedy is
    ``dorafit.invalidate_norm_caches``."""
    layer = make_linear(in_f=16, out_f=16)
    x = torch.randn(3, 16)
    layer(x)
    layer.lora_b.data.normal_()
    assert not torch.allclose(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)  # stale, as documented
    dorafit.invalidate_norm_caches(layer)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# No-grad calls: g = m / ‖W0 + sBA‖ and (1 − g) ⊙ b kept between calls under the same rule


def _count_scales(monkeypatch, layer):
    """Counts the computations of g = m / n (the no-grad path computes g only in the cache)."""
    calls = []
    real = DF.magnitude_scale

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(DF, "magnitude_scale", counted)
    return calls


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_no_grad_scale_kept_across_calls_and_refreshed_on_every_change(monkeypatch, ref, kind):
    """Decoding calls (few tokens, no autograd) compute g once; every change of what g depends
    on — A or B, the magnitude, the base weight or bias, an optimizer step, a state-dict load,
    ``invalidate_norm_caches`` — gives the Eq. 5 output again on the next call."""
    layer = ref.randomize_adapter(FACTORIES[kind](method="dora")).eval()
    calls = _count_scales(monkeypatch, layer)
    x = torch.randn(2, 1, 12)

    def check():
        with torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y.double(), ref.eq5_forward(layer, x.double(), dtype=torch.float64), rtol=1e-5, atol=1e-5)

    for _ in range(3):
        check()
    assert len(calls) == 1
    changes = [
        lambda: layer.lora_b.add_(0.1),
        lambda: layer.lora_a.mul_(1.1),
        lambda: layer.magnitude.mul_(1.2),
        lambda: layer.base.weight.mul_(0.9),
    ]
    if layer.base.bias is not None:
        changes.append(lambda: layer.base.bias.add_(0.3))
    for n, change in enumerate(changes, start=2):
        with torch.no_grad():
            change()
        check()
        check()
        assert len(calls) == n
    opt = torch.optim.SGD([layer.magnitude], lr=0.5, foreach=False)
    layer.magnitude.grad = torch.ones_like(layer.magnitude)
    opt.step()
    check()
    layer.load_state_dict({"lora_b": layer.lora_b.detach() * 0.5}, strict=False)
    check()
    layer.magnitude.data.mul_(2.0)  # behind autograd's back: the documented remedy
    dorafit.invalidate_norm_caches(layer)
    check()
    assert len(calls) == len(changes) + 4


def test_no_grad_scale_follows_a_fused_optimizer_step(ref):
    """A fused optimizer writes without bumping versions; the step count still invalidates g."""
    layer = ref.randomize_adapter(make_linear()).eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        layer(x)
    opt = torch.optim.AdamW([layer.lora_b, layer.magnitude], lr=0.1, fused=True)
    layer.train()
    layer(x).pow(2).sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y.double(), ref.eq5_forward(layer, x.double(), dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_no_grad_scale_from_inference_mode_then_training():
    """g kept under inference_mode is not reused outside it, and training never reads it."""
    layer = make_linear(in_f=16, out_f=16).eval()
    x = torch.randn(2, 16)
    with torch.inference_mode():
        y_inf = layer(x)
    with torch.no_grad():
        y = layer(x)
        assert not layer.norm_cache.scale_entry[1].is_inference()
    torch.testing.assert_close(y, y_inf)
    layer.train()
    layer(x).sum().backward()
    assert layer.magnitude.grad is not None


def test_no_grad_call_with_a_hook_keeping_the_base_output(ref):
    """The output is scaled in place on LoRA's sum, never on the base module's own output, so a
    forward hook that keeps the base output sees x W0ᵀ + b unchanged."""
    layer = ref.randomize_adapter(make_linear()).eval()
    kept = []
    layer.base.register_forward_hook(lambda module, args, out: kept.append(out))
    x = torch.randn(2, 12)
    want = torch.nn.functional.linear(x, layer.base.weight, layer.base.bias).detach()
    with torch.no_grad():
        for _ in range(2):  # computing g, then reading it
            kept.clear()
            layer(x)
            outputs = [out for out in kept if out.shape == want.shape]
            assert len(outputs) == 1
            torch.testing.assert_close(outputs[0], want)


# ------------------------------------------------------------------------------------------
# torch.compile: no graph break in the adapter forward (one compile per mode, CPU is slow)


def test_compile_no_graph_breaks(ref):
    torch._dynamo.reset()
    layer = ref.randomize_adapter(make_linear(in_f=16, out_f=16))
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-5, atol=1e-5)
    assert layer.lora_a.grad is not None
    layer.eval()
    with torch.no_grad():
        explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_output_is_made_in_the_products_storage_but_never_keeps_the_stacked_rows(ref):
    """Eager, with autograd: a call whose x W0ᵀ is its own tensor makes y in that storage (no new
    (tokens, out) tensor); the call that stacks A's rows on the tokens makes a new y, so what is
    saved for backward never holds the r extra rows. Both exact against Eq. 5."""
    layer = ref.randomize_adapter(make_linear(in_f=16, out_f=40))  # 2 · 3 tokens < 40: stacked when due
    params = [layer.lora_a, layer.lora_b, layer.magnitude]
    x = torch.randn(3, 16, requires_grad=True)
    made, saved = [], []
    real_mm = torch.Tensor.__matmul__

    def spy_mm(t, other):  # the products of ``_linear_products`` (its x W0ᵀ comes first)
        out = real_mm(t, other)
        made.append(out)
        return out

    for call in range(2):  # the first call computes the norm (stacked), the second reads it
        made.clear()
        saved.clear()
        torch.Tensor.__matmul__ = spy_mm
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = layer(x)
        finally:
            torch.Tensor.__matmul__ = real_mm
        product = made[0]
        assert product.shape[1] == 40 and product.shape[0] == (3 + layer.rank if call == 0 else 3)
        shares = y.untyped_storage().data_ptr() == product.untyped_storage().data_ptr()
        assert shares == (call == 1)
        out_sized = [t for t in saved if t.shape[-1] == 40 and t.dim() == 2]
        assert out_sized and all(t.untyped_storage().nbytes() == 3 * 40 * 4 for t in out_sized)
        ref.check_grads_against_reference(layer, x, y, params + [x])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_first_forward_gets_the_cross_term_from_the_base_matmul(ref, backend, monkeypatch):
    """Under compile, as in eager mode, the call that computes the norm gets A W0ᵀ from the
    stacked matmul [x; A] W0ᵀ, the calls after it a plain one; values and gradients are exact."""
    torch._dynamo.reset()
    rows_seen = []
    real = DF.stacked_products

    def spy(x, a, weight):
        rows_seen.append(a.shape[0])
        return real(x, a, weight)

    monkeypatch.setattr(DF, "stacked_products", spy)
    layer = ref.randomize_adapter(make_linear(in_f=16, out_f=16))
    params = [layer.lora_a, layer.lora_b, layer.magnitude]
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(3, 16, requires_grad=True)
    for _ in range(2):  # the first call computes the norm, the second reads it
        ref.check_grads_against_reference(layer, x, compiled(x), params + [x])
    assert rows_seen == [layer.rank]  # the call that computed the norm stacked A's rows, the next did not
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_norm_is_kept_between_steps_and_refreshed_after_them(ref, backend):
    """Under torch.compile the norm is kept on the module until an optimizer step, a state-dict
    load or ``invalidate_norm_caches``; a write behind autograd's back is not seen (as in eager)."""
    torch._dynamo.reset()
    layer = ref.randomize_adapter(make_linear(in_f=16, out_f=16))
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    opt = torch.optim.SGD([layer.lora_a, layer.lora_b, layer.magnitude], lr=0.1)
    x = torch.randn(3, 16)
    for _ in range(2):
        for _ in range(2):  # two micro-batches: the second reads the kept norm
            y = compiled(x)
            torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-5, atol=1e-5)
            y.pow(2).sum().backward()
        assert layer.norm_cache.compiled_fresh
        opt.step()
        opt.zero_grad()
        assert not layer.norm_cache.compiled_fresh  # the step cleared it
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        kept = compiled(x)
        layer.lora_b.data.add_(1.0)  # behind autograd's back: the kept norm is reused (documented)
        assert not torch.allclose(compiled(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        dorafit.invalidate_norm_caches(layer)
        torch.testing.assert_close(compiled(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
        layer.load_state_dict({k: v + 0.5 for k, v in layer.state_dict().items() if "lora_b" in k}, strict=False)
        torch.testing.assert_close(compiled(x), layer.reference_forward(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(kept, compiled(x))
    torch._dynamo.reset()
