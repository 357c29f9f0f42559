"""ConvAdapter (nn.Conv1d / Conv2d / Conv3d) against paper Eq. 5.

W0 (out, in, *k) is viewed as (out, in·k); the norm is per output channel over all other axes;
A is a conv with the base's kernel, stride, padding and dilation, B a 1×1 conv.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import dorafit
from dorafit.layers import AdapterError, ConvAdapter

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (4, 4, 5)}


def make_conv(dims=2, in_c=3, out_c=5, k=3, stride=1, padding=0, dilation=1, bias=True, padding_mode="zeros", **kw):
    base = CONVS[dims](in_c, out_c, k, stride=stride, padding=padding, dilation=dilation, bias=bias, padding_mode=padding_mode)
    kw.setdefault("rank", 2)
    kw.setdefault("alpha", 4.0)
    return ConvAdapter(base, **kw)


def inputs(dims, in_c=3, batch=2):
    return torch.randn(batch, in_c, *SPATIAL[dims])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_layout_and_init(dims):
    layer = make_conv(dims)
    k = (3,) * dims
    assert layer.lora_a.shape == (2, 3, *k)
    assert layer.lora_b.shape == (5, 2) + (1,) * dims
    assert torch.count_nonzero(layer.lora_b) == 0
    want = torch.linalg.vector_norm(layer.base.weight.detach().reshape(5, -1), dim=1)
    torch.testing.assert_close(layer.magnitude.detach(), want)
    x = inputs(dims)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=1e-6, atol=1e-6)


GEOMETRIES = {
    "plain": dict(),
    "stride-pad": dict(stride=2, padding=1),
    "dilation-nobias": dict(dilation=2, padding=2, bias=False),
    "reflect": dict(padding=1, padding_mode="reflect"),
}
CASES = [(1, "plain"), (1, "reflect"), (2, "stride-pad"), (2, "dilation-nobias"), (2, "reflect"), (3, "stride-pad")]


@pytest.mark.parametrize("dims,geometry", CASES, ids=[f"{d}d-{g}" for d, g in CASES])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_matches_eq5(ref, dims, method, detach_norm, geometry):
    geometry = GEOMETRIES[geometry]
    layer = ref.randomize_adapter(make_conv(dims, method=method, detach_norm=detach_norm, **geometry), scale=0.3)
    x = inputs(dims)
    ref.check_against_eq5(layer, x, detach_norm=detach_norm)
    ref.check_reference_forward(layer, x)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("mode", ["input", "lowrank"])
def test_dropout_semantics(ref, dims, mode):
    layer = ref.randomize_adapter(make_conv(dims, padding=1, dropout=0.3, dropout_mode=mode), scale=0.3)
    ref.check_against_eq5(layer, inputs(dims), dropout_p=0.3, dropout_mode=mode)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_merge_parity(ref, dims):
    layer = ref.randomize_adapter(make_conv(dims, stride=2, padding=1), scale=0.3)
    x = inputs(dims)
    with torch.no_grad():
        y = layer(x)
        plain = layer.write_merged(layer.merged_weight_2d())
    assert type(plain) is CONVS[dims]
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)
    # each merged output channel has norm m
    torch.testing.assert_close(
        torch.linalg.vector_norm(plain.weight.reshape(5, -1), dim=1), layer.magnitude.detach(), rtol=1e-5, atol=1e-6
    )


def test_grouped_conv_rejected_with_clear_error():
    with pytest.raises(AdapterError, match=r"groups=2"):
        ConvAdapter(nn.Conv2d(4, 4, 3, groups=2), rank=2)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(AdapterError, match=r"'0'.*groups=4"):
        dorafit.attach(model, dorafit.AdapterConfig(rank=2, targets=["0"]))
    assert type(model[0]) is nn.Conv2d


def test_half_precision_conv(ref):
    base = nn.Conv2d(3, 6, 3, padding=1).to(torch.bfloat16)
    layer = ref.randomize_adapter(ConvAdapter(base, rank=2, alpha=4.0), scale=0.3)
    x = torch.randn(1, 3, 6, 6).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight_norm().dtype == torch.float32
    y.float().sum().backward()
    with torch.no_grad():
        y_ref = ref.eq5_forward(layer, x.double(), dtype=torch.float64)
    torch.testing.assert_close(y.double(), y_ref, rtol=3e-2, atol=5e-2)


@settings(max_examples=8, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    in_c=st.integers(1, 4),
    out_c=st.integers(1, 6),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    method=st.sampled_from(["lora", "dora"]),
    detach=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_geometry(ref, dims, in_c, out_c, k, stride, padding, dilation, method, detach, seed):
    # A kernel of one element per output channel (in_c · k^dims = 1) is left out: its direction
    # is ±1, the true gradient of A is 0 and only float32 round-off remains (as for linears).
    assume(in_c * k**dims > 1)
    torch.manual_seed(seed)
    rank = max(1, min(out_c, in_c * k**dims) // 2)
    layer = make_conv(dims, in_c, out_c, k, stride, padding, dilation, method=method, rank=rank, detach_norm=detach)
    ref.randomize_adapter(layer, scale=0.3, seed=seed)
    x = torch.randn(2, in_c, *([8] * dims))
    ref.check_against_eq5(layer, x, detach_norm=detach, rtol=1e-4, atol=1e-4)


def test_norm_cached_under_checkpoint_recomputation(ref):
    """Activation-checkpoint recomputation reuses the norm (one computation) and gives the same grads."""
    layer = ref.randomize_adapter(make_conv(2, padding=1), scale=0.3)
    calls = []
    real = layer._compute_norm_sq

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    layer._compute_norm_sq = counted
    x = inputs(2).requires_grad_(True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).pow(2).sum().backward()
    assert len(calls) == 1
    params = [layer.lora_a, layer.lora_b, layer.magnitude, x]
    got = ref.grads_of(params)
    ref.zero_grads(params)
    layer(x).pow(2).sum().backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad)
    assert len(calls) == 1


@pytest.mark.parametrize("dims,spatial", [(1, (9,)), (2, (7, 7))], ids=["1d", "2d-silent"])
def test_unbatched_input(ref, dims, spatial):
    layer = ref.randomize_adapter(make_conv(dims, in_c=3, out_c=5), scale=0.3)
    x = torch.randn(3, *spatial)  # 2d: output (5, 5, 5): H_out == out_channels
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_no_out_by_in_temporary(ref, detach_norm):
    """W0 viewed as (out, in·k) = (64, 576): nothing of that size is allocated in train or eval."""
    layer = ConvAdapter(nn.Conv2d(64, 64, 3), rank=4, detach_norm=detach_norm)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    ref.check_no_weight_sized_temporary(layer, x, 64 * 576)


def test_compile_no_graph_breaks(ref):
    layer = ref.randomize_adapter(make_conv(2, padding=1), scale=0.3)
    x = inputs(2)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
