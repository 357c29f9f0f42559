"""Every optimised path of the DoRA forward equals its plain reference (outputs and gradients).

- ``functional.dora_compose`` (saves y, rebuilds z for the magnitude gradient) against
  ``functional.reference_dora_compose`` (plain autograd);
- ``functional.dora_linear`` (a linear layer's DoRA in one autograd node) and
  ``functional.dora_linear_rows`` (the same with g on the rows of W0 and B) against
  ``functional.reference_dora_compose`` on the same products, zero magnitudes included;
- ``functional.stacked_products`` (output and norm products from the stacked rows [x; A])
  against four matmuls;
- ``LinearAdapter``'s stacked first forward against its plain followers and ``reference_forward``;
- the cached norm is computed once per parameter version and reused by the stacked path's
  followers.

The path table of ``dorafit.layers.compose`` as a whole is held against ``reference_forward`` in
``tests/layers/test_paths.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dorafit
from dorafit import functional as DF
from dorafit.layers.compose import choose_path


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


def _linear_case(bias_kind, own_low, zero_row=False, seed=0):
    """x, x', A, B, m, W0, b in float64 and the products the node receives."""
    torch.manual_seed(seed)
    n, in_f, out_f, r = 6, 7, 9, 3
    x = torch.randn(n, in_f, dtype=torch.float64, requires_grad=True)
    low = torch.randn(n, in_f, dtype=torch.float64, requires_grad=True) if own_low else None
    a = torch.randn(r, in_f, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64)
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    m = torch.rand(out_f, dtype=torch.float64) + 0.5
    if zero_row:  # a zero row of W0 + s B A: its magnitude initialises to 0 and its output is b_i
        w[4], b[4], m[4] = 0.0, 0.0, 0.0
    b.requires_grad_(True)
    m.requires_grad_(True)
    bias = None if bias_kind == "none" else torch.randn(out_f, dtype=torch.float64, requires_grad=bias_kind == "trained")
    norm_sq = torch.linalg.vector_norm(w + 0.7 * b.detach() @ a.detach(), dim=1).square().clamp_min(1e-12)
    return x, low, a, b, m, w, bias, norm_sq


def _node(x, low, a, b, m, w, bias, norm_sq, scaling=0.7, rows=False):
    with torch.no_grad():
        z, h = x @ w.t(), (x if low is None else low) @ a.t()
    if rows:
        return DF.dora_linear_rows(x, low, a, b, m, h, norm_sq, w, bias, scaling)
    return DF.dora_linear(x, low, a, b, m, z, h, norm_sq, w, bias, scaling)


NODES = pytest.mark.parametrize("rows", [False, True], ids=["scaled-output", "scaled-rows"])


def _node_reference(x, low, a, b, m, w, bias, norm_sq, scaling=0.7):
    base = F.linear(x, w, bias)
    lowrank = scaling * F.linear(F.linear(x if low is None else low, a), b)
    return DF.reference_dora_compose(base, lowrank, m / norm_sq.sqrt(), bias)


@NODES
@pytest.mark.parametrize("own_low", [False, True], ids=["x", "own-dropout-input"])
@pytest.mark.parametrize("bias_kind", ["none", "frozen", "trained"])
def test_dora_linear_matches_reference(bias_kind, own_low, rows):
    case = _linear_case(bias_kind, own_low)
    x, low, a, b, m, w, bias, norm_sq = case
    y = _node(*case, rows=rows)
    y_ref = _node_reference(*case)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y)
    leaves = [t for t in (x, low, a, b, m, bias) if t is not None and t.requires_grad]
    for g, g_ref in zip(_grads(y, leaves, grad_out), _grads(y_ref, leaves, grad_out)):
        torch.testing.assert_close(g, g_ref)
    assert torch.autograd.gradcheck(lambda *t: _node(*t, w, bias, norm_sq, rows=rows), (x, low, a, b, m))


@pytest.mark.parametrize("own_low", [False, True], ids=["x", "own-dropout-input"])
@pytest.mark.parametrize("bias_kind", ["none", "frozen", "trained"])
def test_lora_linear_matches_reference(bias_kind, own_low):
    """LoRA's node (the sum made in place, s as addmm's alpha, the input gradients summed in
    place) against F.linear(x, W0, b) + s · B A x' through plain autograd."""
    x, low, a, b, _, w, bias, _ = _linear_case(bias_kind, own_low)
    node = lambda *t: DF.lora_linear(*t, w, bias, 0.7)  # noqa: E731
    y = node(x, low, a, b)
    y_ref = F.linear(x, w, bias) + 0.7 * F.linear(F.linear(x if low is None else low, a), b)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y)
    leaves = [t for t in (x, low, a, b, bias) if t is not None and t.requires_grad]
    for g, g_ref in zip(_grads(y, leaves, grad_out), _grads(y_ref, leaves, grad_out)):
        torch.testing.assert_close(g, g_ref)
    assert torch.autograd.gradcheck(node, (x, low, a, b))


@NODES
def test_dora_linear_zero_magnitude_on_a_zero_row_is_exact_and_syncs_nothing(rows):
    """m_i = 0 on a zero row (W0_i = 0, B_i = 0): y_i = b_i, and 0 / 0 in the magnitude's
    gradient is read as its true value, 0; no value is read by the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                Syncs.seen += 1
            return func(*args, **(kwargs or {}))

    for bias_kind in ("none", "frozen"):
        case = _linear_case(bias_kind, False, zero_row=True)
        x, low, a, b, m, w, bias, norm_sq = case
        grad_out = torch.randn(6, 9, dtype=torch.float64)
        with Syncs():
            y = _node(*case, rows=rows)
            grads = _grads(y, [x, a, b, m], grad_out)
        assert Syncs.seen == 0
        y_ref = _node_reference(*case)
        torch.testing.assert_close(y, y_ref)
        for g, g_ref in zip(grads, _grads(y_ref, [x, a, b, m], grad_out)):
            torch.testing.assert_close(g, g_ref)
        assert grads[3][4] == 0


@NODES
def test_dora_linear_hand_zeroed_magnitude_gets_a_finite_zero_gradient(rows):
    """A magnitude set to 0 by hand on a non-zero row: y_i = b_i keeps nothing of that row's
    W0 x + s B A x, so its gradient reads 0 (documented: such a row stays switched off)."""
    case = _linear_case("frozen", False)
    x, low, a, b, m, w, bias, norm_sq = case
    with torch.no_grad():
        m[2] = 0.0
    y = _node(*case, rows=rows)
    (grad_m,) = _grads(y, [m], torch.randn_like(y))
    assert torch.isfinite(grad_m).all() and grad_m[2] == 0
    others = [i for i in range(9) if i != 2]
    y_ref = _node_reference(*case)
    (grad_ref,) = _grads(y_ref, [m], torch.randn_like(y))  # another grad_out: only finiteness compared
    assert torch.isfinite(grad_ref[others]).all()


def _node_tensors(tokens):
    """x (tokens, 12), A (3, 12), B (16, 3), W0 (16, 12), m (16,) and h = x Aᵀ for a saved-tensor check."""
    x = torch.randn(tokens, 12, requires_grad=True)
    a = torch.randn(3, 12, requires_grad=True)
    b = torch.randn(16, 3, requires_grad=True)
    w = torch.randn(16, 12)
    m = torch.rand(16, requires_grad=True)
    with torch.no_grad():
        h = x @ a.t()
    return x, a, b, w, m, h


def _saved_storages(node, larger_than):
    """The output of ``node()`` and the storages of the tensors it saves for backward that have
    more than ``larger_than`` elements."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = node()
    return y, {t.untyped_storage().data_ptr() for t in saved if t.numel() > larger_than}


def test_dora_linear_keeps_only_lora_tensors_and_its_output():
    """Saved: x (for A's gradient), h (for B's), the output y, the parameters and (out,)-sized
    vectors; not z + s h Bᵀ. y is made in z's storage (the node's own temporary), not a new
    (tokens, out) tensor."""
    x, a, b, w, m, h = _node_tensors(8)
    with torch.no_grad():
        z = x @ w.t()
    y, ptrs = _saved_storages(lambda: DF.dora_linear(x, None, a, b, m, z, h, torch.ones(16), w, torch.zeros(16), 2.0), 16)
    allowed = {t.untyped_storage().data_ptr() for t in (y, h, x, a, b, w)}
    assert y.untyped_storage().data_ptr() in ptrs and ptrs <= allowed
    assert z.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


def test_dora_linear_rows_keeps_neither_the_scaled_weight_nor_the_sum():
    """With g on the rows: saved are x, h, y, the parameters and tensors of (out, r) size or
    less (g ⊙ B, g); g ⊙ W0 (out, in) is made again in backward, never kept."""
    x, a, b, w, m, h = _node_tensors(40)
    node = lambda: DF.dora_linear_rows(x, None, a, b, m, h, torch.ones(16), w, torch.zeros(16), 2.0)  # noqa: E731
    y, ptrs = _saved_storages(node, b.numel())
    assert ptrs == {t.untyped_storage().data_ptr() for t in (y, h, x, w)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_products_match_four_matmuls(dtype):
    torch.manual_seed(0)
    x, a, w = torch.randn(5, 10, dtype=dtype), torch.randn(3, 10, dtype=dtype), torch.randn(12, 10, dtype=dtype)
    z, h, cross, gram = DF.stacked_products(x, a, w)
    for got, want in ((z, x @ w.t()), (h, x @ a.t()), (cross, a @ w.t()), (gram, a @ a.t())):
        torch.testing.assert_close(got, want)


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


def _spy_stacked(monkeypatch):
    calls = []
    real = DF.stacked_products
    monkeypatch.setattr(DF, "stacked_products", lambda *args: calls.append(1) or real(*args))
    return calls


def test_stacked_first_forward_equals_its_followers_and_reference(monkeypatch):
    layer = _dora_linear()
    stacked = _spy_stacked(monkeypatch)
    x = torch.randn(2, 2, 24, requires_grad=True)  # 4 tokens < 20 / 4 output features: stacked
    params = [layer.lora_a, layer.lora_b, layer.magnitude]
    g = torch.randn(2, 2, 20)
    runs = []
    for _ in range(2):  # the first call stacks A's rows on the tokens, the second reads the norm
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)
        runs.append((y, _grads(y, [xi] + params, g)))
    assert stacked == [1]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = layer.reference_forward(x_ref)
    grads_ref = _grads(y_ref, [x_ref] + params, g)
    for y, grads in runs:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_stacked_path_fills_the_cache_used_by_the_next_micro_batch():
    layer = _dora_linear()
    calls = []
    compute = layer._compute_norm_sq
    layer._compute_norm_sq = lambda cross=None, gram=None: calls.append(cross is not None) or compute(cross, gram)
    x = torch.randn(4, 24)  # 4 tokens < 20 / 4 output features: stacked
    layer(x)
    layer(x)
    assert calls == [True]  # one computation, with the cross term from the stacked matmul
    with torch.no_grad():
        layer.lora_a.add_(0.01)  # an optimizer step bumps the version counter
    layer(x)
    assert calls == [True, True]
    norm = layer.weight_norm()
    torch.testing.assert_close(norm, DF.reference_norm(layer.base.weight, layer.lora_a, layer.lora_b, layer.scaling))


def test_stacking_is_skipped_for_many_tokens_half_precision_and_hooks(monkeypatch):
    layer = _dora_linear()  # 20 output features
    stacked = _spy_stacked(monkeypatch)

    def stacks(x):
        dorafit.invalidate_norm_caches(layer)
        before = len(stacked)
        layer(x)
        return len(stacked) > before

    assert choose_path(layer, torch.randn(2, 24)) == "dora-linear" and stacks(torch.randn(2, 24))
    assert not stacks(torch.randn(5, 24))  # 5 tokens, not fewer than 20 / 4: copying x costs more
    assert choose_path(layer, torch.randn(2, 24, dtype=torch.bfloat16)) == "dora"  # input and adapter dtypes differ
    handle = layer.base.register_forward_hook(lambda *args: None)
    assert choose_path(layer, torch.randn(2, 24)) == "dora" and not stacks(torch.randn(2, 24))
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert choose_path(layer, torch.randn(2, 24)) == "dora" and not stacks(torch.randn(2, 24))


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


@pytest.mark.parametrize("keep_sum", [False, True])
@pytest.mark.parametrize("bias_kind", ["none", "trained"])
def test_feature_sums_by_batch_norm_equal_mul_and_sum(bias_kind, keep_sum):
    """Reductions of 2^15 elements and more run through batch norm's backward (no product is
    written), smaller ones as mul + sum: both give the reference's gradients, linear (tokens, out)
    and conv (N, C, H, W) layouts alike."""
    torch.manual_seed(0)
    for shape, scale_shape in (((64, 600), (600,)), ((4, 40, 16, 16), (40, 1, 1)), ((3, 5, 7), (7,))):
        base = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        low = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        scale = (torch.rand(scale_shape, dtype=torch.float64) + 0.5).requires_grad_(True)
        bias = None if bias_kind == "none" else torch.randn(scale_shape, dtype=torch.float64, requires_grad=True)
        leaves = [base, low, scale] + ([bias] if bias is not None else [])
        y = DF.dora_compose(base, low, scale, bias, keep_sum=keep_sum)
        y_ref = DF.reference_dora_compose(base, low, scale, bias)
        grad_out = torch.randn_like(y)
        for g, g_ref in zip(_grads(y, leaves, grad_out), _grads(y_ref, leaves, grad_out)):
            torch.testing.assert_close(g, g_ref)


@NODES
@pytest.mark.parametrize("bias_kind", ["none", "trained"])
def test_dora_linear_on_a_large_reduction_matches_reference(bias_kind, rows):
    torch.manual_seed(0)
    n, in_f, out_f, r = 64, 20, 600, 4  # 64 × 600 ≥ 2^15: batch norm's reduction
    x = torch.randn(n, in_f, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, in_f, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    m = (torch.rand(out_f, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = None if bias_kind == "none" else torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    norm_sq = torch.linalg.vector_norm(w + 0.7 * b.detach() @ a.detach(), dim=1).square()
    case = (x, None, a, b, m, w, bias, norm_sq)
    y, y_ref = _node(*case, rows=rows), _node_reference(*case)
    torch.testing.assert_close(y, y_ref)
    leaves = [t for t in (x, a, b, m, bias) if t is not None]
    grad_out = torch.randn_like(y)
    for g, g_ref in zip(_grads(y, leaves, grad_out), _grads(y_ref, leaves, grad_out)):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_feature_sums_by_batch_norm_in_half_precision(dtype):
    """Half-precision outputs with float32 statistics (batch norm's mixed-precision kernel)."""
    torch.manual_seed(0)
    base, low = torch.randn(64, 600), torch.randn(64, 600)
    scale, bias = torch.rand(600) + 0.5, torch.randn(600)
    grad_out = torch.randn(64, 600)
    leaves = [t.to(dtype).requires_grad_(True) for t in (base, low)] + [scale.clone().requires_grad_(True)]
    y = DF.dora_compose(leaves[0], leaves[1], leaves[2], bias.to(dtype))
    got = _grads(y.float(), leaves, grad_out)
    ref_leaves = [t.double().requires_grad_(True) for t in (base, low, scale)]
    y_ref = DF.reference_dora_compose(ref_leaves[0], ref_leaves[1], ref_leaves[2], bias.double())
    want = _grads(y_ref, ref_leaves, grad_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-1)
