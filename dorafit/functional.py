"""Pure tensor functions: the DoRA math, in one place.

Layout (PyTorch): a weight W0 has shape (out, in); y = x W0ᵀ + b. Conv weights are viewed as
(out, in/groups · k...), embeddings as the linear map one-hot -> embedding_dim, i.e. (dim, vocab).

    LoRA:  W = W0 + s · B A                      A (r, in), B (out, r), s = alpha / r
    DoRA:  W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖  (paper Eq. 5), norm per output feature (row),
           m (out,) initialised to ‖W0‖ so that W' = W0 at step 0.

The factored norm never builds the (out, in) matrix W0 + s B A:

    ‖W0_i + s (BA)_i‖² = ‖W0_i‖² + 2s · Σ_j B_ij (A W0ᵀ)_ji + s² · Σ_jk B_ij (A Aᵀ)_jk B_ik

with ‖W0_i‖² cached at attach time, the cross term C = A W0ᵀ (r, out) computed by running the
frozen base layer on A's rows, and A Aᵀ (r, r). Everything here is float32.

The unmerged forward reuses the base layer's output:

    g = m / ‖W0 + s B A‖                         (out,)
    y = g ⊙ (x W0ᵀ + s · (x Aᵀ) Bᵀ) + b          (bias never scaled by g)

Every optimised function has a short reference next to it (``reference_*``) that the tests
hold equal.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# Clamp before the square root: a row of W0 + s B A can be (numerically) zero.
NORM_EPS = 1e-12
# Rows of a half-precision weight converted to float32 at a time for the cross term, so that no
# float32 copy of the whole (out, in) weight ever exists.
_CHUNK_ELEMENTS = 1 << 22
# Below this many elements the per-feature reductions of the backward use plain mul + sum
# (TensorIterator's serial grain size): batch norm's kernel would cost more than the work.
_SMALL_REDUCTION = 1 << 15


def weight_norm_sq_per_output(weight_2d: torch.Tensor) -> torch.Tensor:
    """‖W_i‖² per output feature (row) of a (out, in) weight, in float32: (out,).

    Works through row chunks so that a half-precision weight is never copied whole.
    """
    out_features = weight_2d.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight_2d[0].numel()))
    parts = []
    for start in range(0, out_features, rows):
        chunk = weight_2d[start : start + rows].to(torch.float32)
        parts.append(chunk.pow(2).sum(dim=1))
    return torch.cat(parts)


def weight_norm_per_output(weight_2d: torch.Tensor) -> torch.Tensor:
    """‖W_i‖ per output feature (row) of a (out, in) weight, float32: (out,)."""
    return weight_norm_sq_per_output(weight_2d).sqrt()


def _float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, itself where it is float32 already (no operator call: the norm runs these
    per layer and step, where a call costs more than the work)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def rows_times_weight_t(rows: torch.Tensor, weight_2d: torch.Tensor) -> torch.Tensor:
    """R Wᵀ in float32 for R (r, in) and W (out, in): (r, out), the transpose of a contiguous
    (out, r) made as W Rᵀ.

    W on the left: with r ≪ out this GEMM took 0.45–0.79 of the time of R Wᵀ on a CPU (192 × 576
    to 4096², r 16, ``benchmarks/results/cross-layout.md``), and ``factored_norm_sq`` reads the transpose
    as the contiguous (out, r) its addmm wants. A float32 weight is used directly; a
    half-precision one is converted in row chunks, so the result is exact to float32 without a
    float32 copy of W.
    """
    rows_t = _float32(rows).t()
    if weight_2d.dtype == torch.float32:
        return (weight_2d @ rows_t).t()
    step = max(1, _CHUNK_ELEMENTS // max(1, weight_2d.shape[1]))
    parts = [weight_2d[s : s + step].to(torch.float32) @ rows_t for s in range(0, weight_2d.shape[0], step)]
    return torch.cat(parts).t()


def factored_norm_sq(
    w0_norm_sq: torch.Tensor,
    cross: torch.Tensor,
    lora_a_2d: torch.Tensor,
    lora_b_2d: torch.Tensor,
    scaling: float,
    gram: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """‖W0 + s B A‖² per output feature without forming the (out, in) matrix: (out,), float32.

    w0_norm_sq: (out,) ‖W0_i‖²; cross: (r, out) = A W0ᵀ, either the transpose of a contiguous
    (out, r) or contiguous itself (the addmm reads each in its own layout: with (r, out) rows read
    transposed, the addmm and the row dot took 1.8× as long at 4096², r 16, on a CPU);
    lora_a_2d: (r, in); lora_b_2d: (out, r);
    gram: A Aᵀ (r, r) where the caller has it already. Two small operations besides the gram, as
    this runs once per optimizer step and layer:

        both = 2s · (A W0ᵀ)ᵀ + s² · B (A Aᵀ)              (out, r)   one addmm
        ‖·‖² = ‖W0_i‖² + Σ_j B_ij both_ij                (out,)     one baddbmm (row dot plus add)

    Every sum over the input dimension happens in ``cross``, ``gram`` and ‖W0‖²: with W0 sharded
    by columns (rowwise tensor parallel) the result is a partial sum to all-reduce before the
    floor (``floor_squares``).
    """
    a, b, cross = _float32(lora_a_2d), _float32(lora_b_2d), _float32(cross)
    gram = a @ a.t() if gram is None else _float32(gram)  # (r, r)
    beta, alpha = 2.0 * scaling, scaling * scaling
    if cross.t().is_contiguous():  # (out, r) in memory: W0 Aᵀ as ``rows_times_weight_t`` makes it
        both = torch.addmm(cross.t(), b, gram, beta=beta, alpha=alpha)
    else:  # (r, out) rows ([x; A] W0ᵀ): the same sum transposed, gram symmetric, read in its own layout
        both = torch.addmm(cross, gram, b.t(), beta=beta, alpha=alpha).t()
    rows = torch.baddbmm(_float32(w0_norm_sq).view(-1, 1, 1), b.unsqueeze(1), both.unsqueeze(2))
    return rows.view(-1)


def floor_squares(norm_sq: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """‖·‖² clamped at ``eps``: cancellation can leave a (numerically) zero row slightly
    negative. What the norm cache keeps (n², whose square root is n)."""
    return norm_sq.clamp_min(eps)


def norm_from_squares(norm_sq: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """‖·‖ from ‖·‖², clamped at ``eps`` first (``floor_squares``), the square root in place on
    the clamped copy."""
    return floor_squares(norm_sq, eps).sqrt_()


def factored_norm(
    w0_norm_sq: torch.Tensor,
    cross: torch.Tensor,
    lora_a_2d: torch.Tensor,
    lora_b_2d: torch.Tensor,
    scaling: float,
    eps: float = NORM_EPS,
    gram: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """‖W0 + s B A‖ per output feature without forming the (out, in) matrix: (out,), float32.

    w0_norm_sq: (out,) ‖W0_i‖²; cross: (r, out) = A W0ᵀ; lora_a_2d: (r, in); lora_b_2d: (out, r);
    gram: A Aᵀ where the caller has it. ``norm_from_squares`` of ``factored_norm_sq`` (a sharded
    W0 reduces the squares between the two). Reference: ``reference_norm``.
    """
    return norm_from_squares(factored_norm_sq(w0_norm_sq, cross, lora_a_2d, lora_b_2d, scaling, gram), eps)


def stacked_products(x_2d: torch.Tensor, a: torch.Tensor, weight: torch.Tensor):
    """x W0ᵀ and x Aᵀ with the norm's A W0ᵀ and A Aᵀ, from two matmuls over the stacked rows [x; A].

    At few tokens a matmul is bound by reading its weight, so A's r rows ride along with the
    tokens instead of paying a second pass over W0 for the cross term alone. No autograd (the
    caller's node gives the gradients); x (N, in), A (r, in), W0 (out, in) of one dtype.
    Returns z (N, out), h (N, r), cross (r, out), gram (r, r), views of the two stacked results.
    Reference: four separate matmuls (``tests/test_fast_paths.py``).
    """
    n = x_2d.shape[0]
    stacked = torch.cat([x_2d, a])  # (N + r, in)
    z_all = stacked @ weight.t()  # (N + r, out)
    h_all = stacked @ a.t()  # (N + r, r)
    return z_all[:n], h_all[:n], z_all[n:], h_all[n:]


def reference_norm(w0_2d: torch.Tensor, lora_a_2d: torch.Tensor, lora_b_2d: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W0 + s B A‖ per row by materialising the matrix (tests and merge only): (out,), float32."""
    w = w0_2d.to(torch.float32) + scaling * (lora_b_2d.to(torch.float32) @ lora_a_2d.to(torch.float32))
    return torch.linalg.vector_norm(w, dim=1)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g = m / ‖W0 + s B A‖: (out,), float32."""
    return magnitude.to(torch.float32) / norm


def scale_from_squares(
    magnitude: torch.Tensor, norm_sq: torch.Tensor, zeros: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """g = m / √n² from the floored squares n² (``floor_squares``) in one operator, without
    autograd through n²: (out,), float32 (float64 for a float64 m).

    Batch norm in evaluation mode over one row computes (m − mean) / √(var + eps) per feature;
    with mean 0 (``zeros``, or made here), var n² and eps 0 that is g, where a square root and a
    division would be two launches. Reference: ``magnitude_scale(m, floored.sqrt())``; this is
    m · (1 / √n²), which can differ from the division by 1 ulp (the kept no-grad g divides).
    """
    stat = torch.float64 if magnitude.dtype == torch.float64 else torch.float32
    var = norm_sq.to(stat)
    mean = zeros if zeros is not None and zeros.dtype == stat else torch.zeros_like(var)
    g, _, _ = torch.native_batch_norm(magnitude.to(stat).view(1, -1), None, None, mean, var, False, 0.0, 0.0)
    return g.view(-1)


class _ScaleShift(torch.autograd.Function):
    """y = g ⊙ (t − b) + b with t = x W0ᵀ + b + s B A x, saving y, not t.

    The magnitude's gradient needs t − b = (y − b) / g. Autograd would keep t, a (tokens, out)
    tensor, alive for backward; the layer output y is usually kept alive anyway by the next
    operation (attention keeps v, SiLU keeps gate, the product keeps up), so saving y instead
    costs no memory there, and no base matmul is ever recomputed. One fused pass forward
    (addcmul) and a few in backward: the whole DoRA overhead over LoRA's y = t. The shift
    (1 − g) ⊙ b is made inside: ∂y/∂g = t − b, ∂y/∂b = 1 − g
    besides the path through t.
    """

    @staticmethod
    def forward(ctx, t, scale, bias, keep_sum):
        s = scale.to(t.dtype)
        y = t * s if bias is None else torch.addcmul(((1 - scale) * bias).to(t.dtype), t, s)
        ctx.keep_sum = keep_sum
        ctx.save_for_backward(t if keep_sum else y, scale, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved, scale, bias = ctx.saved_tensors
        need_t, need_scale, need_bias, _ = ctx.needs_input_grad
        # g ⊙ grad_y, Σ grad_y ⊙ (saved − b) and Σ grad_y in one pass; with y saved,
        # t − b = (y − b) / g (1 / g_i read as 0 where g_i = 0, as in ``_DoraLinear``).
        grad_t, dot, grad_sum = _scaled_grad_and_sums(grad_y, saved, scale, bias, (need_t, need_scale, need_bias))
        grad_scale = grad_bias = None
        flat = scale.reshape(-1).to(dot.dtype if dot is not None else grad_sum.dtype) if (need_scale or need_bias) else None
        if need_scale:
            if not ctx.keep_sum:
                dot = dot.div_(flat).nan_to_num_(0.0, 0.0, 0.0)
            grad_scale = dot.view(scale.shape).to(scale.dtype)
        if need_bias:
            grad_bias = ((1 - flat) * grad_sum).view(bias.shape).to(bias.dtype)
        return grad_t, grad_scale, grad_bias, None


def _features_second(grad_y, saved, scale_shape):
    """grad_y and saved viewed with the output features on axis 1 (batch norm's channels), and
    a function that gives a result of that layout grad_y's own shape back. The feature axis is
    where ``scale_shape`` (the shape g broadcasts with) is not 1."""
    ndim, shape = grad_y.dim(), grad_y.shape
    sizes = [d for d, n in enumerate(scale_shape) if n != 1]
    axis = ndim - len(scale_shape) + sizes[0] if sizes else None
    if axis is None or axis == ndim - 1:  # features last, (tokens, out); or one feature
        width = 1 if axis is None else shape[-1]
        return grad_y.reshape(-1, width), saved.reshape(-1, width), lambda t: t.view(shape)
    if axis == 1:  # (N, C, *spatial)
        return grad_y, saved, lambda t: t
    # an unbatched conv output (C, *spatial), or features elsewhere
    moved = lambda t: t.movedim(axis, 0).unsqueeze(0)  # noqa: E731
    return moved(grad_y), moved(saved), lambda t: t.squeeze(0).movedim(0, axis)


def _scaled_grad_and_sums(grad_y, saved, scale, bias, need, zeros=None):
    """(g ⊙ grad_y, Σ grad_y ⊙ (saved − b), Σ grad_y), sums over every axis but the output
    feature's, in float32 (float64 for float64); ``need`` says which of the three to compute;
    ``zeros``: an (out,) zero vector of that dtype kept by the caller, or None (made here).

    One pass of batch norm's backward in evaluation mode computes exactly these per channel —
    grad_input = grad ⊙ weight ⊙ invstd, grad_weight = Σ grad ⊙ (input − running_mean) ⊙ invstd,
    grad_bias = Σ grad — with weight g, running mean b, running variance 0 and eps 1 (invstd 1),
    reading grad_y and saved once and writing no product. Below 2^15 elements (where that
    kernel's parallel region costs more than the work): mul and sum, its reference.
    """
    need_grad, need_dot, need_sum = need
    stat = torch.float64 if saved.dtype == torch.float64 else torch.float32
    grad_2d, saved_2d, restore = _features_second(grad_y, saved, scale.shape)
    flat = scale.reshape(-1)
    if grad_2d.numel() < _SMALL_REDUCTION:
        dims = [d for d in range(grad_2d.dim()) if d != 1]
        grad = grad_y * scale.to(grad_y.dtype) if need_grad else None
        need_sum = need_sum or (need_dot and bias is not None)
        grad_sum = grad_2d.sum(dims, dtype=stat) if need_sum else None
        dot = (grad_2d * saved_2d).sum(dims, dtype=stat) if need_dot else None
        if need_dot and bias is not None:
            dot = torch.addcmul(dot, bias.reshape(-1).to(stat), grad_sum, value=-1)
        return grad, dot, grad_sum
    if zeros is None or zeros.dtype != stat:
        zeros = torch.zeros_like(flat, dtype=stat)
    mean = zeros if bias is None else bias.reshape(-1).to(stat)
    grad, dot, grad_sum = torch.ops.aten.native_batch_norm_backward(
        grad_2d, saved_2d, flat.to(stat), mean, zeros, None, None, False, 1.0, [need_grad, need_dot, need_sum]
    )
    return (restore(grad) if need_grad else None), dot, grad_sum


def lora_sum(x, x_low, a, b, weight, bias, scaling: float):
    """(x W0ᵀ + b + s · h Bᵀ, h) with h = x' Aᵀ (x' = x where ``x_low`` is None), no autograd: the
    sum made in place in x W0ᵀ + b, this call's own tensor, by a second matmul with s as its alpha.
    LoRA's forward (``_LoraLinear``) and DoRA's before its scaling without autograd."""
    z = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    h = (x if x_low is None else x_low) @ a.t()
    return z.addmm_(h, b.t(), alpha=scaling), h


class _LoraLinear(torch.autograd.Function):
    """LoRA on a linear layer in one autograd node, all 2-D and of one dtype:

        y = x W0ᵀ + b + s · h Bᵀ,   h = x' Aᵀ

    The second matmul adds into the first one's output in place (no copy of x W0ᵀ) with s as
    its alpha (no scaled copy of B), and backward is ``_linear_grads``: the five matmuls of the
    gradients, the input's two summed by an in-place addmm. No elementwise pass over a
    (tokens, out) or (tokens, in) tensor either way. ``_DoraLinear`` is this node with g on
    the output. Saves x' (x), h, A, B and W0, what autograd would keep for the same matmuls.
    """

    @staticmethod
    def forward(ctx, x, x_low, a, b, weight, bias, scaling):
        y, h = lora_sum(x, x_low, a, b, weight, bias, scaling)
        ctx.scaling, ctx.own_low = scaling, x_low is not None
        ctx.save_for_backward(x if x_low is None else x_low, h, a, b, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        low, h, a, b, weight = ctx.saved_tensors
        grads = _linear_grads(ctx, grad_y, low, h, a, b, lambda: weight)
        grad_bias = grad_y.sum(0) if ctx.needs_input_grad[5] else None
        return grads + (None, grad_bias, None)


def lora_linear(x_2d, x_low_2d, a, b, weight, bias, scaling: float) -> torch.Tensor:
    """y = x W0ᵀ + b + s · (x' Aᵀ) Bᵀ in one autograd node (``_LoraLinear``): gradients to x (N, in),
    x' (or None: x' = x), A (r, in), B (out, r) and a bias that needs one. x, A, B, W0 and the
    bias of one dtype. Reference: ``F.linear(x, W0, b) + s · F.linear(F.linear(x', A), B)``.
    """
    return _LoraLinear.apply(x_2d, x_low_2d, a, b, weight, bias, scaling)


class _DoraLinear(torch.autograd.Function):
    """DoRA on a linear layer in one autograd node, all 2-D and of one dtype:

        y = g ⊙ (z + s · h Bᵀ) + b,   z = x W0ᵀ (no bias), h = x' Aᵀ, g = m / n

    with the detached norm n (paper section 4.3), given as its floored square n² (``g`` in one
    operator, ``scale_from_squares``), and x' = x unless the low-rank path has its own dropout. z
    and h come in already computed without autograd (``stacked_products`` or two matmuls); the
    node gives x, x', A, B and m their gradients, so that the layer costs LoRA's matmuls plus,
    forward, g and one in-place scaling of the output (s rides in the addmm), and, backward,
    Σ grad_y ⊙ (y − b) for the magnitude and g ⊙ grad_y for the matmuls:

        ∂L/∂m = Σ_tokens grad_y ⊙ (y − b) / m        (g n = m: y − b = g ⊙ (z + s h Bᵀ))
        ∂L/∂B = s (g ⊙ grad_y)ᵀ h,  ∂L/∂h = s (g ⊙ grad_y) B,  ∂L/∂x = (g ⊙ grad_y) W0 + ∂L/∂h A

    It saves y (usually kept anyway by the next operation: see ``_ScaleShift``), h, x' and the
    (out,)-sized g, never z + s h Bᵀ; g ⊙ grad_y and the magnitude's reduction are one pass that
    writes no (tokens, out) product (``_scaled_grad_and_sums``). Where m_i = 0, y_i = b_i keeps no trace of the row's
    z + s h Bᵀ and its gradient reads 0: the layers send a W0 with a zero row (which initialises a
    zero magnitude) to a path that keeps the sum instead, so this concerns a magnitude set to zero
    by hand, which stays zero (docs/methods.md). No value is read by the host.
    """

    @staticmethod
    def forward(ctx, x, x_low, a, b, magnitude, z, h, norm_sq, weight, bias, scaling, in_place, zeros):
        g = scale_from_squares(magnitude, norm_sq, zeros).to(z.dtype)  # (out,), computed in at least float32
        if in_place:  # z becomes y: no new (N, out) tensor
            ctx.mark_dirty(z)
            y = z.addmm_(h, b.t(), alpha=scaling)
        else:  # a view, or compiled (the write to an input broke the compile tests; inductor plans buffers)
            y = torch.addmm(z, h, b.t(), alpha=scaling)
        y = y.mul_(g) if bias is None else torch.addcmul(bias, y, g, out=y)
        ctx.scaling, ctx.own_low = scaling, x_low is not None
        ctx.save_for_backward(x if x_low is None else x_low, h, a, b, weight, y, g, magnitude, bias, zeros)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_low, h, a, b, weight, y, g, magnitude, bias, zeros = ctx.saved_tensors
        need_m, need_bias = ctx.needs_input_grad[4], ctx.needs_input_grad[9]
        # g ⊙ grad_y (the gradient of z + s h Bᵀ), Σ grad_y ⊙ (y − b) and Σ grad_y, in one pass.
        grad_t, dot, grad_sum = _scaled_grad_and_sums(grad_y, y, g, bias, (True, need_m, need_bias), zeros)
        grad_m, grad_bias = _magnitude_and_bias_grads(dot, grad_sum, magnitude, bias, need_m, need_bias)
        grads = _linear_grads(ctx, grad_t, x_low, h, a, b, lambda: weight)
        return grads + (grad_m, None, None, None, None, grad_bias, None, None, None)


def _magnitude_and_bias_grads(dot, grad_sum, magnitude, bias, need_m, need_bias):
    """∂L/∂m = Σ grad_y ⊙ (y − b) / m (1 / 0 read as 0: no host read) and ∂L/∂b = Σ grad_y, from
    the sums of ``_scaled_grad_and_sums``; None where not needed."""
    grad_m = dot.div_(magnitude).nan_to_num_(0.0, 0.0, 0.0).to(magnitude.dtype) if need_m else None
    return grad_m, (grad_sum.to(bias.dtype) if need_bias else None)


def _linear_grads(ctx, grad, x_low, h, a, b, weight, b_rows=None):
    """(∂L/∂x, ∂L/∂x', ∂L/∂A, ∂L/∂B) of u = x Wᵀ + s h Bᵀ with h = x' Aᵀ, from grad = ∂L/∂u:

        ∂L/∂h = s grad B,   ∂L/∂B = s gradᵀ h (its rows times ``b_rows`` where given),
        ∂L/∂A = ∂L/∂hᵀ x',  ∂L/∂x = grad W + ∂L/∂h A (in place, where x' = x),  ∂L/∂x' = ∂L/∂h A

    ``weight`` gives W when ∂L/∂x is needed (a scaled copy is then made only if used). The
    backward of both DoRA linear nodes, which differ in what grad, B and W are."""
    need_x, need_low, need_a, need_b = ctx.needs_input_grad[:4]
    grad_h = torch.addmm(h, grad, b, beta=0, alpha=ctx.scaling) if (need_x or need_low or need_a) else None
    grad_b = torch.addmm(b, grad.t(), h, beta=0, alpha=ctx.scaling) if need_b else None
    if need_b and b_rows is not None:
        grad_b.mul_(b_rows)
    grad_a = grad_h.t().mm(x_low) if need_a else None
    grad_x = grad.mm(weight()) if need_x else None
    if need_x and not ctx.own_low:
        grad_x.addmm_(grad_h, a)  # the low-rank path's input gradient, in place
    grad_low = grad_h.mm(a) if need_low else None
    return grad_x, grad_low, grad_a, grad_b


class _DoraLinearRows(torch.autograd.Function):
    """``_DoraLinear``'s y with g on the rows of W0 and B instead of on the output:

        y = x (g ⊙ W0)ᵀ + b + s · h (g ⊙ B)ᵀ,   h = x' Aᵀ, g = m / n

    With more tokens than input features the (out, in) g ⊙ W0 is smaller than the (tokens, out)
    output, so scaling W0 writes less than scaling the output, and backward makes g ⊙ W0 again
    (never kept: it would stay alive until backward) instead of g ⊙ grad_y. No elementwise pass
    over a (tokens, out) tensor is left but the magnitude's reduction, which reads y and grad_y:

        ∂L/∂m = Σ_tokens grad_y ⊙ (y − b) / m
        ∂L/∂B = s g ⊙ (grad_yᵀ h),  ∂L/∂h = s grad_y (g ⊙ B),  ∂L/∂x = grad_y (g ⊙ W0) + ∂L/∂h A

    Saves what ``_DoraLinear`` saves, with g ⊙ B (out, r) in place of B. A zero magnitude is
    handled as there. Reference: ``reference_dora_compose`` as for ``dora_linear``.
    """

    @staticmethod
    def forward(ctx, x, x_low, a, b, magnitude, h, norm_sq, weight, bias, scaling, zeros):
        g = scale_from_squares(magnitude, norm_sq, zeros).to(weight.dtype)  # (out,), computed in at least float32
        rows = g.unsqueeze(1)
        weight_g = weight * rows  # (out, in), dropped after the matmul
        y = torch.mm(x, weight_g.t()) if bias is None else torch.addmm(bias, x, weight_g.t())
        del weight_g
        b_g = b * rows
        y.addmm_(h, b_g.t(), alpha=scaling)
        ctx.scaling, ctx.own_low = scaling, x_low is not None
        ctx.save_for_backward(x if x_low is None else x_low, h, a, b_g, weight, y, g, magnitude, bias, zeros)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_low, h, a, b_g, weight, y, g, magnitude, bias, zeros = ctx.saved_tensors
        need_m, need_bias = ctx.needs_input_grad[4], ctx.needs_input_grad[8]
        # Σ grad_y ⊙ (y − b) and Σ grad_y in one pass that writes nothing of (tokens, out) size.
        _, dot, grad_sum = _scaled_grad_and_sums(grad_y, y, g, bias, (False, need_m, need_bias), zeros)
        grad_m, grad_bias = _magnitude_and_bias_grads(dot, grad_sum, magnitude, bias, need_m, need_bias)
        rows = g.unsqueeze(1)
        grads = _linear_grads(ctx, grad_y, x_low, h, a, b_g, lambda: weight * rows, b_rows=rows)
        return grads + (grad_m, None, None, None, grad_bias, None, None)


def dora_linear(
    x_2d, x_low_2d, a, b, magnitude, z, h, norm_sq, weight, bias, scaling: float, in_place: bool = True,
    zeros: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = g ⊙ (z + s · h Bᵀ) + b with g = m / n, for z = x W0ᵀ and h = x' Aᵀ computed without
    autograd; gradients to x (N, in), x' (or None: x' = x), A (r, in), B (out, r) and m (out,).

    One autograd node (``_DoraLinear``); x, A, B, W0 and the bias of one dtype; ``norm_sq`` the
    floored n² (``floor_squares``), float32; ``zeros`` an (out,) float32 zero vector the caller
    keeps (batch norm's statistics forward and backward), or None to make one.
    With ``in_place`` z, the caller's own temporary, is overwritten: y is made in its storage.
    Not for a view (``stacked_products``' rows: y would keep the rest of that storage alive,
    and autograd forbids writing a view made without it) nor under torch.compile.
    Reference: ``reference_dora_compose(x W0ᵀ + b, s (x' Aᵀ) Bᵀ, m / n, b)``.
    """
    return _DoraLinear.apply(x_2d, x_low_2d, a, b, magnitude, z, h, norm_sq, weight, bias, scaling, in_place, zeros)


def dora_linear_rows(
    x_2d, x_low_2d, a, b, magnitude, h, norm_sq, weight, bias, scaling: float, zeros: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """y = x (g ⊙ W0)ᵀ + b + s · h (g ⊙ B)ᵀ with g = m / n, for h = x' Aᵀ computed without
    autograd: ``dora_linear``'s output and gradients with g on the rows of W0 and B
    (``_DoraLinearRows``), for calls with more tokens than input features. Same arguments as
    ``dora_linear`` less z. Reference: ``reference_dora_compose(x W0ᵀ + b, s (x' Aᵀ) Bᵀ, m / n, b)``.
    """
    return _DoraLinearRows.apply(x_2d, x_low_2d, a, b, magnitude, h, norm_sq, weight, bias, scaling, zeros)


def dora_scale_shift(
    t: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], keep_sum: bool = False
) -> torch.Tensor:
    """y = g ⊙ t + (1 − g) ⊙ b  =  g ⊙ (t − b) + b, for t = x W0ᵀ + b + s B A x.

    The bias is not scaled by g. ``scale`` (g) and ``bias`` are shaped to broadcast along the
    output axis. Saves y for backward (see ``_ScaleShift``); with ``keep_sum`` it keeps t
    instead (needed where some g_i = 0, or where the caller may modify y in place).
    """
    return _ScaleShift.apply(t, scale, bias, keep_sum)


def dora_scale_shift_(t: torch.Tensor, scale: torch.Tensor, shift: Optional[torch.Tensor]) -> torch.Tensor:
    """In place and without autograd: t ← g ⊙ t + (1 − g) ⊙ b, with shift = (1 − g) ⊙ b made by
    the caller (or None for no bias); returns t. The forward of ``dora_scale_shift`` for
    no-grad calls that own t (nothing else holds it), e.g. evaluation and generation.
    """
    s = scale.to(t.dtype)
    if shift is None:
        return t.mul_(s)
    return torch.addcmul(shift.to(t.dtype), t, s, out=t)


def dora_compose(
    base_out: torch.Tensor,
    lowrank_out: Optional[torch.Tensor],
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    keep_sum: bool = False,
) -> torch.Tensor:
    """y = g ⊙ (base_out − b + lowrank_out) + b, with g broadcast along the output axis.

    base_out: the base layer's output x W0ᵀ + b; lowrank_out: s · (x Aᵀ) Bᵀ; scale: g already
    shaped to broadcast (e.g. (out,) for a linear, (out, 1, 1) for a conv2d). A missing
    lowrank_out (magnitude-only) counts as zero. Memory-lean (``dora_scale_shift``);
    ``reference_dora_compose`` is the same formula through plain autograd.
    """
    t = base_out if lowrank_out is None else base_out + lowrank_out.to(base_out.dtype)
    return dora_scale_shift(t, scale, bias, keep_sum)


def reference_dora_compose(
    base_out: torch.Tensor,
    lowrank_out: Optional[torch.Tensor],
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``dora_compose`` written with plain autograd (keeps z + l for backward)."""
    dtype = base_out.dtype
    z = base_out if bias is None else base_out - bias.to(dtype)
    if lowrank_out is not None:
        z = z + lowrank_out.to(dtype)
    out = scale.to(dtype) * z
    return out if bias is None else out + bias.to(dtype)


def dora_compose_dropout(
    base_out: torch.Tensor,
    base_dropped_nobias: torch.Tensor,
    lowrank_dropped: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Exact DoRA with dropout on the whole update (official code, PEFT):

    y = W0 x + b + (g − 1) ⊙ W0 drop(x) + g ⊙ s B A drop(x)
    """
    dtype = base_out.dtype
    scale = scale.to(dtype)
    return base_out + (scale - 1) * base_dropped_nobias + scale * lowrank_dropped.to(dtype)


def merged_weight_2d(
    w0_2d: torch.Tensor,
    lora_a_2d: torch.Tensor,
    lora_b_2d: torch.Tensor,
    scaling: float,
    magnitude: Optional[torch.Tensor],
) -> torch.Tensor:
    """Merged (out, in) weight in float32: W0 + s B A (LoRA) or g ⊙ (W0 + s B A) (DoRA)."""
    w = w0_2d.to(torch.float32) + scaling * (lora_b_2d.to(torch.float32) @ lora_a_2d.to(torch.float32))
    if magnitude is None:
        return w
    norm = torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS ** 0.5)
    return (magnitude.to(torch.float32) / norm).unsqueeze(1) * w


def reference_dora_weight(
    w0_2d: torch.Tensor,
    lora_a_2d: torch.Tensor,
    lora_b_2d: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    detach_norm: bool = True,
) -> torch.Tensor:
    """Paper Eq. 5 written out: W' = m ⊙ V / ‖V‖ with V = W0 + s B A, float32, differentiable.

    With ``detach_norm`` the norm is a constant in backward (paper section 4.3).
    """
    v = w0_2d.to(torch.float32) + scaling * (lora_b_2d.to(torch.float32) @ lora_a_2d.to(torch.float32))
    norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    if detach_norm:
        norm = norm.detach()
    return magnitude.to(torch.float32).unsqueeze(1) * v / norm


def magnitude_direction_delta(w0_2d: torch.Tensor, w_2d: torch.Tensor, axis: int = 1) -> Tuple[float, float]:
    """The paper's weight-decomposition statistics (section 3, Figure 2):

        ΔM = mean_i |‖W_i‖ − ‖W0_i‖|,   ΔD = mean_i (1 − cos(W_i, W0_i))

    over output features i (rows, ``axis=1``: norms taken over the input dimension), or over
    columns with ``axis=0``. Returns Python floats (ΔM, ΔD).
    """
    if w0_2d.shape != w_2d.shape or w0_2d.dim() != 2:
        raise ValueError(f"magnitude_direction_delta needs two 2-D weights of one shape, got {tuple(w0_2d.shape)} and {tuple(w_2d.shape)}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 1 (per output feature) or 0 (per input feature), got {axis}")
    w0 = w0_2d.detach().to(torch.float64)
    w = w_2d.detach().to(torch.float64)
    m0 = torch.linalg.vector_norm(w0, dim=axis)
    m = torch.linalg.vector_norm(w, dim=axis)
    cos = (w0 * w).sum(dim=axis) / (m0 * m).clamp_min(1e-300)
    return float((m - m0).abs().mean()), float((1.0 - cos).mean())
