"""dorafit.functional: the factored norm, compose, merge math and ΔM/ΔD, against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dorafit.functional as DF
from dorafit.layers import ConvAdapter, LinearAdapter


def direct_norm(w0, a, b, s):
    """‖W0 + s B A‖ per row, float64."""
    return torch.linalg.vector_norm(w0.double() + s * (b.double() @ a.double()), dim=1)


@settings(max_examples=15, deadline=None)
@given(
    out_f=st.integers(1, 48),
    in_f=st.integers(1, 48),
    rank=st.integers(1, 8),
    scaling=st.floats(0.01, 8.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_factored_norm_equals_direct(out_f, in_f, rank, scaling, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=gen).to(dtype)
    a = torch.randn(rank, in_f, generator=gen)
    b = torch.randn(out_f, rank, generator=gen)
    norm = DF.factored_norm(DF.weight_norm_sq_per_output(w0), DF.rows_times_weight_t(a, w0), a, b, scaling)
    assert norm.dtype == torch.float32 and norm.shape == (out_f,)
    want = direct_norm(w0, a, b, scaling)
    torch.testing.assert_close(norm.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(DF.reference_norm(w0, a, b, scaling).double(), want, rtol=1e-5, atol=1e-5)


def test_factored_norm_reads_either_layout_of_the_cross_term():
    """A W0ᵀ as the transpose of a contiguous (out, r) (``rows_times_weight_t``) or as contiguous
    (r, out) rows (the stacked [x; A] W0ᵀ): one result, the direct norm's."""
    gen = torch.Generator().manual_seed(4)
    w0, a, b = torch.randn(40, 24, generator=gen), torch.randn(5, 24, generator=gen), torch.randn(40, 5, generator=gen)
    w0_sq = DF.weight_norm_sq_per_output(w0)
    transposed, rows = DF.rows_times_weight_t(a, w0), (a @ w0.t()).contiguous()
    assert transposed.t().is_contiguous() and rows.is_contiguous()
    want = direct_norm(w0, a, b, 0.8).square()
    for cross in (transposed, rows):
        got = DF.factored_norm_sq(w0_sq, cross, a, b, 0.8)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_factored_norm_full_gradient_matches_direct():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(9, 7, generator=gen)
    a = torch.randn(3, 7, generator=gen, requires_grad=True)
    b = torch.randn(9, 3, generator=gen, requires_grad=True)
    g = torch.randn(9, generator=gen)
    (DF.factored_norm(DF.weight_norm_sq_per_output(w0), DF.rows_times_weight_t(a, w0), a, b, 1.5) * g).sum().backward()
    got = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    (direct_norm(w0, a, b, 1.5) * g.double()).sum().backward()
    torch.testing.assert_close(got[0].double(), a.grad.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1].double(), b.grad.double(), rtol=1e-4, atol=1e-5)


def test_factored_norm_clamps_zero_rows():
    w0 = torch.zeros(3, 4)
    a = torch.zeros(2, 4)
    b = torch.zeros(3, 2)
    norm = DF.factored_norm(DF.weight_norm_sq_per_output(w0), DF.rows_times_weight_t(a, w0), a, b, 1.0)
    assert torch.isfinite(norm).all() and (norm > 0).all()


def test_chunked_half_precision_paths(monkeypatch):
    """The row-chunked float32 conversion gives the same result as a whole conversion."""
    monkeypatch.setattr(DF, "_CHUNK_ELEMENTS", 40)  # forces several chunks
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(13, 10, generator=gen).to(torch.bfloat16)
    a = torch.randn(3, 10, generator=gen)
    torch.testing.assert_close(DF.weight_norm_sq_per_output(w0), w0.float().pow(2).sum(1))
    torch.testing.assert_close(DF.rows_times_weight_t(a, w0), a @ w0.float().t())
    torch.testing.assert_close(DF.weight_norm_per_output(w0), torch.linalg.vector_norm(w0.float(), dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_term_is_the_transpose_of_a_contiguous_out_by_r(dtype, monkeypatch):
    """A W0ᵀ (r, out) is made as W0 Aᵀ: its transpose is the contiguous (out, r) that the norm's
    addmm reads (the faster layout on a CPU), whole or in row chunks, with A W0ᵀ's values."""
    monkeypatch.setattr(DF, "_CHUNK_ELEMENTS", 40)
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(13, 10, generator=gen).to(dtype)
    a = torch.randn(3, 10, generator=gen)
    cross = DF.rows_times_weight_t(a, w0)
    assert cross.shape == (3, 13) and cross.dtype == torch.float32 and cross.t().is_contiguous()
    torch.testing.assert_close(cross, a @ w0.float().t())


def test_reference_dora_weight_is_eq5():
    gen = torch.Generator().manual_seed(2)
    w0, a, b = torch.randn(5, 6, generator=gen), torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen)
    m = torch.rand(5, generator=gen) + 0.5
    v = w0 + 0.7 * b @ a
    want = m[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(DF.reference_dora_weight(w0, a, b, 0.7, m), want)
    torch.testing.assert_close(DF.merged_weight_2d(w0, a, b, 0.7, m), want)
    torch.testing.assert_close(DF.merged_weight_2d(w0, a, b, 0.7, None), v)
    # each merged row has norm m
    torch.testing.assert_close(DF.merged_weight_2d(w0, a, b, 0.7, m).norm(dim=1), m)


def test_magnitude_scale_is_m_over_norm():
    m = torch.tensor([2.0, 3.0], dtype=torch.bfloat16)
    out = DF.magnitude_scale(m, torch.tensor([4.0, 6.0]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("m_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_from_squares_is_m_over_the_root(m_dtype):
    """g from the floored squares in one batch-norm call equals m / √n² (negative magnitudes,
    a floored zero row and a zero magnitude included), in float32 (float64 for float64)."""
    gen = torch.Generator().manual_seed(5)
    m = (torch.randn(300, generator=gen) * 2).to(m_dtype)
    m[7] = 0.0
    norm_sq = DF.floor_squares(torch.rand(300, generator=gen, dtype=torch.float64).to(m_dtype if m_dtype == torch.float64 else torch.float32) * 9)
    norm_sq[3] = DF.floor_squares(torch.tensor(-1e-9))  # cancellation below zero: the floor
    want = DF.magnitude_scale(m, norm_sq.sqrt()) if m_dtype != torch.float64 else m / norm_sq.sqrt()
    kept_zeros = torch.zeros(300)
    for zeros in (None, kept_zeros):
        g = DF.scale_from_squares(m, norm_sq, zeros)
        assert g.dtype == (torch.float64 if m_dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(g, want, rtol=2e-7 if m_dtype != torch.float64 else 1e-15, atol=0)
        assert g[7] == 0 and torch.isfinite(g).all()
    assert not kept_zeros.any()  # only read


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_lowrank", [True, False])
def test_dora_compose_matches_plain_formula(with_bias, with_lowrank):
    gen = torch.Generator().manual_seed(3)
    base_out = torch.randn(4, 6, generator=gen, requires_grad=True)
    low = torch.randn(4, 6, generator=gen, requires_grad=True) if with_lowrank else None
    scale = (torch.rand(6, generator=gen) + 0.5).requires_grad_(True)
    bias = torch.randn(6, generator=gen) if with_bias else None
    grad_y = torch.randn(4, 6, generator=gen)
    leaves = [t for t in (base_out, low, scale) if t is not None]

    (DF.dora_compose(base_out, low, scale, bias) * grad_y).sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    b = 0 if bias is None else bias
    y_ref = scale * (base_out - b + (0 if low is None else low)) + b
    (y_ref * grad_y).sum().backward()
    for g, t in zip(got, leaves):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(DF.dora_compose(base_out, low, scale, bias), y_ref)
    torch.testing.assert_close(DF.reference_dora_compose(base_out, low, scale, bias), y_ref)


def test_dora_compose_dropout_formula():
    gen = torch.Generator().manual_seed(4)
    base_out, w0xd, low = (torch.randn(3, 5, generator=gen) for _ in range(3))
    g = torch.rand(5, generator=gen) + 0.5
    want = base_out + (g - 1) * w0xd + g * low
    torch.testing.assert_close(DF.dora_compose_dropout(base_out, w0xd, low, g), want)


def test_magnitude_gradient_finite_for_zero_weight_row(ref):
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[2].zero_()  # a pruned / zero-initialised output feature: m_2 = 0
    layer = LinearAdapter(lin, rank=2)
    with torch.no_grad():
        layer.lora_b.normal_()  # after some training B is non-zero, so ‖V_2‖ > 0
    assert layer.magnitude[2].item() == 0.0
    ref.check_against_eq5(layer, torch.randn(4, 8))


def test_inplace_op_on_adapter_output():
    layer = ConvAdapter(nn.Conv2d(3, 4, 3), rank=2)
    net = nn.Sequential(layer, nn.ReLU(inplace=True))
    net(torch.randn(1, 3, 6, 6)).sum().backward()
    assert layer.magnitude.grad is not None


def test_magnitude_direction_delta_known_values():
    w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    # row 0 scaled by 2 (ΔM 5, no direction change); row 1 rotated 90° (ΔD 1, same norm)
    w = torch.tensor([[6.0, 8.0], [0.0, 1.0]])
    dm, dd = DF.magnitude_direction_delta(w0, w)
    assert dm == pytest.approx((5.0 + 0.0) / 2)
    assert dd == pytest.approx((0.0 + 1.0) / 2)
    dm0, dd0 = DF.magnitude_direction_delta(w0, w, axis=0)
    cols = torch.linalg.vector_norm(w, dim=0) - torch.linalg.vector_norm(w0, dim=0)
    assert dm0 == pytest.approx(cols.abs().mean().item())
    cos = (w0 * w).sum(0) / (w0.norm(dim=0) * w.norm(dim=0))
    assert dd0 == pytest.approx((1 - cos).mean().item())
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        DF.magnitude_direction_delta(w0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="axis"):
        DF.magnitude_direction_delta(w0, w, axis=2)
    assert math.isfinite(DF.magnitude_direction_delta(torch.zeros(2, 2), torch.zeros(2, 2))[1])
