"""Every optimised path of the DoRA forward equals its plain reference (outputs and gradients).

- ``functional.dora_compose`` (saves y, rebuilds z for the magnitude gradient) against
  ``functional.reference_dora_compose`` (plain autograd);
- ``functional.dora_lowrank_linear`` (second low-rank matmul and scaling in one node) against
  ``functional.reference_dora_compose``;
- ``functional.linear_with_rows`` (base output and cross term in one matmul) against two
  ``F.linear`` calls;
- ``LinearAdapter`` with the fused first forward against the same layer with fusion disabled,
  and against ``reference_forward``;
- the cached norm is computed once per parameter version and reused by the fused path's
  followers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dorafit
from dorafit import functional as DF


def _grads(out, inputs, grad_out):
    return torch.autograd.grad((out * grad_out).sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("keep_sum", [False, True])
@pytest.mark.parametrize("bias_kind", ["none", "frozen", "trained"])
@pytest.mark.parametrize("layout", ["linear", "conv2d"])
def test_dora_compose_matches_reference(bias_kind, layout, keep_sum):
    torch.manual_seed(0)
    if layout == "linear":
        shape, scale_shape, bias_shape = (3, 5, 7), (7,), (7,)
    else:
        shape, scale_shape, bias_shape = (2, 7, 4, 4), (7, 1, 1), (7, 1, 1)
    base = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    low = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(scale_shape, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = None if bias_kind == "none" else torch.randn(bias_shape, dtype=torch.float64, requires_grad=bias_kind == "trained")
    grad_out = torch.randn(shape, dtype=torch.float64)
    y = DF.dora_compose(base, low, scale, bias, keep_sum=keep_sum)
    y_ref = DF.reference_dora_compose(base, low, scale, bias)
    torch.testing.assert_close(y, y_ref)
    leaves = [base, low, scale] + ([bias] if bias_kind == "trained" else [])
    for g, g_ref in zip(_grads(y, leaves, grad_out), _grads(y_ref, leaves, grad_out)):
        torch.testing.assert_close(g, g_ref)


def test_dora_compose_gradcheck():
    torch.manual_seed(0)
    base = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    low = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = torch.randn(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda b, l, s: DF.dora_compose(b, l, s, bias), (base, low, scale))
    bias.requires_grad_(True)  # a trained base bias: its direct gradient (1 − g) ⊙ Σ grad_y
    for keep_sum in (False, True):
        assert torch.autograd.gradcheck(lambda b, l, s, c: DF.dora_compose(b, l, s, c, keep_sum), (base, low, scale, bias))


def test_dora_compose_saves_its_output_not_a_sum():
    """The tensor kept for the magnitude gradient is y itself (shared with a next op saving y)."""
    base = torch.randn(8, 16, requires_grad=True)
    low = torch.randn(8, 16, requires_grad=True)
    scale = torch.rand(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = DF.dora_compose(base, low, scale, torch.zeros(16))
    big = [t for t in saved if t.numel() == y.numel()]
    assert big and all(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() for t in big)


def test_dora_compose_unbatched_keep_sum():
    """1-D output (unbatched linear): the magnitude reduction must not alias the reused buffer."""
    torch.manual_seed(0)
    base = torch.randn(7, dtype=torch.float64, requires_grad=True)
    low = torch.randn(7, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(7, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = torch.randn(7, dtype=torch.float64)
    grad_out = torch.randn(7, dtype=torch.float64)
    for keep_sum in (True, False):
        y = DF.dora_compose(base, low, scale, bias, keep_sum=keep_sum)
        y_ref = DF.reference_dora_compose(base, low, scale, bias)
        for g, g_ref in zip(_grads(y, [base, low, scale], grad_out), _grads(y_ref, [base, low, scale], grad_out)):
            torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("bias_kind", ["none", "frozen", "trained"])
@pytest.mark.parametrize("shape", [(3, 5, 6), (6,), (1, 6)])
def test_dora_lowrank_linear_matches_reference(bias_kind, shape):
    torch.manual_seed(0)
    out_f, r = 9, 3
    z = torch.randn(*shape[:-1], out_f, dtype=torch.float64, requires_grad=True)
    h = torch.randn(*shape[:-1], r, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(out_f, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = None if bias_kind == "none" else torch.randn(out_f, dtype=torch.float64, requires_grad=bias_kind == "trained")
    y = DF.dora_lowrank_linear(z, h, b, scale, bias)
    y_ref = DF.reference_dora_compose(z, h @ b.t(), scale, bias)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y)
    leaves = [z, h, b, scale] + ([bias] if bias_kind == "trained" else [])
    for g, g_ref in zip(_grads(y, leaves, grad_out), _grads(y_ref, leaves, grad_out)):
        torch.testing.assert_close(g, g_ref)
    if bias_kind == "trained":  # the bias's direct gradient (1 − g) ⊙ Σ grad_y, besides z's path
        assert torch.autograd.gradcheck(DF.dora_lowrank_linear, tuple(leaves))
    else:
        assert torch.autograd.gradcheck(lambda *t: DF.dora_lowrank_linear(*t, bias), tuple(leaves))


def test_dora_lowrank_linear_keeps_only_lora_tensors_and_its_output():
    """Saved: h and B (as LoRA's addmm), the output y, and (out,)-sized vectors; nothing else."""
    z = torch.randn(8, 16, requires_grad=True)
    h = torch.randn(8, 3, requires_grad=True)
    b = torch.randn(16, 3, requires_grad=True)
    scale = torch.rand(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = DF.dora_lowrank_linear(z, h, b, scale, torch.zeros(16))
    ptrs = {t.untyped_storage().data_ptr() for t in saved if t.numel() > 16}
    assert ptrs == {y.untyped_storage().data_ptr(), h.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_with_rows_matches_two_linears(with_bias):
    torch.manual_seed(0)
    w = torch.randn(12, 10, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64) if with_bias else None
    x = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(4, 10, dtype=torch.float64)
    y, cross = DF.linear_with_rows(x, rows, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b))
    torch.testing.assert_close(cross, (rows @ w.t()).float())
    assert not cross.requires_grad
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * g).sum(), [x])
    torch.testing.assert_close(gx, g @ w)


def test_linear_with_rows_refuses_trainable_weight():
    with pytest.raises(ValueError, match="frozen"):
        DF.linear_with_rows(torch.randn(2, 3), torch.randn(1, 3), torch.randn(4, 3, requires_grad=True), None)


def _dora_linear(detach_norm=True, dropout=0.0, dropout_mode="input"):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(proj=nn.Linear(24, 20)))
    cfg = dorafit.AdapterConfig(rank=4, alpha=8, targets=["proj"], detach_norm=detach_norm, dropout=dropout,
                                dropout_mode=dropout_mode)
    dorafit.attach(model, cfg)
    with torch.no_grad():
        model.proj.lora_b.normal_()
        model.proj.magnitude.mul_(torch.rand(20) + 0.5)
    return model.proj


class _NoFusion:
    """Disable the fused first forward on one adapter instance."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.layer.base_and_cross = lambda x, a: None
        return self.layer

    def __exit__(self, *exc):
        del self.layer.base_and_cross


@pytest.mark.parametrize("detach_norm", [True, False])
def test_fused_first_forward_equals_separate_and_reference(detach_norm):
    layer = _dora_linear(detach_norm)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 4, 24, requires_grad=True)  # 8 tokens < 20 / 2 output features: fused
    assert layer.base_and_cross(x, layer.lora_a) is not None
    x_twin = x.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    assert layer.norm_is_stale() == detach_norm
    y = layer(x)  # fused (detached norm) or the full-gradient path
    with _NoFusion(twin):
        y_twin = twin(x_twin)
    y_ref = layer.reference_forward(x_ref)
    g = torch.randn_like(y)
    params = lambda m: [m.lora_a, m.lora_b, m.magnitude]  # noqa: E731
    grads = _grads(y, [x] + params(layer), g)
    grads_twin = _grads(y_twin, [x_twin] + params(twin), g)
    grads_ref = _grads(y_ref, [x_ref] + params(layer), g)
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b, c in zip(grads, grads_twin, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_fused_path_fills_the_cache_used_by_the_next_micro_batch():
    layer = _dora_linear()
    calls = []
    compute = layer._compute_norm
    layer._compute_norm = lambda cross=None: calls.append(cross is not None) or compute(cross)
    x = torch.randn(4, 24)
    layer(x)
    layer(x)
    assert calls == [True]  # one computation, with the cross term from the fused matmul
    with torch.no_grad():
        layer.lora_a.add_(0.01)  # an optimizer step bumps the version counter
    layer(x)
    assert calls == [True, True]
    norm = layer.weight_norm()
    torch.testing.assert_close(norm, DF.reference_norm(layer.base.weight, layer.lora_a, layer.lora_b, layer.scaling))


def test_fusion_is_skipped_for_many_tokens_half_precision_and_hooks():
    layer = _dora_linear()  # 20 output features
    assert layer.base_and_cross(torch.randn(2, 24), layer.lora_a) is not None
    assert layer.base_and_cross(torch.randn(2, 5, 24), layer.lora_a) is None  # 10 tokens: copying x costs more
    assert layer.base_and_cross(torch.randn(2, 24, dtype=torch.bfloat16), layer.lora_a) is None
    handle = layer.base.register_forward_hook(lambda *args: None)
    assert layer.base_and_cross(torch.randn(2, 24), layer.lora_a) is None
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.base_and_cross(torch.randn(2, 24), layer.lora_a) is None


@pytest.mark.parametrize("mode", ["input", "lowrank"])
def test_dropout_paths_match_reference(mode):
    layer = _dora_linear(dropout=0.3, dropout_mode=mode)
    layer.train()
    x = torch.randn(6, 24)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    y_ref = layer.reference_forward(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
