"""VeRA and DVoRA: a low-rank update built from frozen random matrices shared by all layers.

VeRA (Kopiczko et al., ICLR 2024). One pair of frozen random matrices per model,

    A_shared (r_max, in_max)    B_shared (out_max, r_max)    Kaiming-uniform, from ``vera_seed``

is sliced per layer, A = A_shared[:r, :in] and B = B_shared[:out, :r] (views, never copies), and
each layer trains two vectors only, d (r,) and b (out,):

    ΔW = Λ_b B Λ_d A = B_eff A_eff,   A_eff = d[:, None] ⊙ A (r, in),   B_eff = b[:, None] ⊙ B (out, r)
    VeRA:   y = base(x) + x A_effᵀ B_effᵀ
    DVoRA:  W' = m ⊙ (W0 + B_eff A_eff) / ‖W0 + B_eff A_eff‖     (DoRA paper section 5.3)

Init as the VeRA paper: d = ``vera_d_init`` (0.1), b = 0, so ΔW = 0 at step 0 (and m = ‖W0‖ for
DVoRA, so W' = W0). There is no alpha / r scaling (scaling = 1): the VeRA paper has none and d, b
carry the scale. DVoRA's norm is DoRA's factored norm with the effective factors A_eff, B_eff,
so no (out, in) matrix is built and the norm runs through the frozen base like DoRA's.

The shared matrices live in one ``VeraShared`` module that every adapted layer of the model
references (one tensor in memory, moved once by ``model.to``). Its buffers are not persistent:
an adapter file stores ``vera_seed`` and regenerates them, unless ``save_vera_matrices`` asks to
store them as "vera_shared.a" / "vera_shared.b" (exact reload whatever the random generator).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from .base import AdapterError, initial_magnitude
from .linear import Conv1DAdapter, LinearAdapter

# Keys of the shared matrices in an adapter file (when stored).
SHARED_A_KEY = "vera_shared.a"
SHARED_B_KEY = "vera_shared.b"


def _kaiming_uniform(shape: Tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with a = sqrt(5) (nn.Linear's init): U(−1/sqrt(fan_in), 1/sqrt(fan_in)).

    fan_in is the size of the second axis, as for a weight; drawn on the CPU in float32 so that
    one seed gives the same matrices on every device.
    """
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def generate_shared_matrices(seed: int, rank: int, in_max: int, out_max: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A_shared (rank, in_max) and B_shared (out_max, rank) from ``seed`` (A drawn first)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    a = _kaiming_uniform((rank, in_max), generator)
    b = _kaiming_uniform((out_max, rank), generator)
    return a, b


class VeraShared(nn.Module):
    """The frozen random matrices of one model, referenced by all its VeRA / DVoRA layers."""

    def __init__(self, seed: int, rank: int, in_max: int, out_max: int, save_matrices: bool = False,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.seed = int(seed)
        self.save_matrices = bool(save_matrices)
        a, b = generate_shared_matrices(seed, rank, in_max, out_max)
        self.register_buffer("a", a.to(device), persistent=False)  # (r_max, in_max)
        self.register_buffer("b", b.to(device), persistent=False)  # (out_max, r_max)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, a={tuple(self.a.shape)}, b={tuple(self.b.shape)}"


def build_shared(modules: Iterable[Tuple[str, nn.Module, int]], seed: int, save_matrices: bool = False) -> VeraShared:
    """One ``VeraShared`` sized for every (name, module, rank) to adapt (linear layouts only)."""
    rank_max = in_max = out_max = 0
    device = None
    for name, module, rank in modules:
        out_features, in_features = linear_shape(module, name)
        rank_max, in_max, out_max = max(rank_max, rank), max(in_max, in_features), max(out_max, out_features)
        if device is None:
            device = next((p.device for p in module.parameters()), None)
    if rank_max == 0:
        raise AdapterError("VeRA: no module to adapt")
    return VeraShared(seed, rank_max, in_max, out_max, save_matrices, device)


def linear_shape(module: nn.Module, name: str = "") -> Tuple[int, int]:
    """(out, in) of a linear-like module: nn.Linear (also quantized subclasses) or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return weight.shape[1], weight.shape[0]  # Conv1D stores (in, out)
    raise AdapterError(
        f"module {name!r} is a {type(module).__name__}: VeRA / DVoRA adapt linear layers only "
        "(nn.Linear, transformers Conv1D, 4-bit Linear4bit)"
    )


class VeraMixin:
    """VeRA / DVoRA on top of a linear adapter class (put it first in the bases).

    Overrides the method hooks of ``AdapterLayer``: the low-rank factors are the shared slices
    scaled by the trainable vectors; the layout hooks come from the layer class.
    """

    def __init__(self, base: nn.Module, *, shared: VeraShared, d_init: float = 0.1, method: str = "vera",
                 adapter_dtype: str = "float32", **kwargs) -> None:
        if method not in ("vera", "dvora"):
            raise AdapterError(f"VeRA layers take method 'vera' or 'dvora', got {method!r}")
        kwargs["scaling"] = 1.0  # no alpha / r: d and b carry the scale (VeRA paper)
        super().__init__(base, method=method, adapter_dtype=adapter_dtype, **kwargs)
        (rank, in_features), (out_features, _) = self.lora_shapes()
        if rank > shared.a.shape[0] or in_features > shared.a.shape[1] or out_features > shared.b.shape[0]:
            raise AdapterError(
                f"VeRA shared matrices A {tuple(shared.a.shape)}, B {tuple(shared.b.shape)} are too small for a "
                f"layer of (out, in) = ({out_features}, {in_features}) at rank {rank}"
            )
        dtype = torch.float32 if adapter_dtype == "float32" else self.base_dtype()
        device = shared.a.device
        self.vera_shared = shared  # registered in every layer, one object: never copied per layer
        self.vera_d = nn.Parameter(torch.full((rank,), float(d_init), dtype=dtype, device=device))
        self.vera_b = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        if method == "dvora":
            self.magnitude = initial_magnitude(self, dtype)

    # ---- method hooks of AdapterLayer
    def shared_slices(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """This layer's frozen A (r, in) and B (out, r): views of the shared matrices."""
        (rank, in_features), (out_features, _) = self.lora_shapes()
        return self.vera_shared.a[:rank, :in_features], self.vera_shared.b[:out_features, :rank]

    def lowrank_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """A_eff = Λ_d A (r, in) and B_eff = Λ_b B (out, r), so that ΔW = B_eff A_eff."""
        a, b = self.shared_slices()
        return self.vera_d.unsqueeze(1) * a.to(self.vera_d.dtype), self.vera_b.unsqueeze(1) * b.to(self.vera_b.dtype)

    def norm_inputs(self) -> List[torch.Tensor]:
        frozen = super().norm_inputs()  # the base weight (lora_a/b are None)
        return [self.vera_d, self.vera_b, self.vera_shared.a, self.vera_shared.b] + frozen

    def adapter_parameter_names(self) -> List[str]:
        names = ["vera_d", "vera_b"]
        return names + (["magnitude"] if self.magnitude is not None else [])

    # ---- extra tensors of an adapter file (see dorafit.io)
    def extra_tensor_names(self) -> Set[str]:
        return {SHARED_A_KEY, SHARED_B_KEY}

    def extra_tensors(self) -> Dict[str, torch.Tensor]:
        if not self.vera_shared.save_matrices:
            return {}
        return {SHARED_A_KEY: self.vera_shared.a, SHARED_B_KEY: self.vera_shared.b}

    def load_extra_tensors(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Take stored shared matrices (shapes checked) instead of the ones regenerated from the seed."""
        for key, target in ((SHARED_A_KEY, self.vera_shared.a), (SHARED_B_KEY, self.vera_shared.b)):
            if key not in tensors:
                continue
            got = tensors[key]
            if tuple(got.shape) != tuple(target.shape):
                raise AdapterError(
                    f"stored VeRA matrix {key!r} has shape {tuple(got.shape)} but this model needs {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(got.to(device=target.device, dtype=target.dtype))

    def extra_repr(self) -> str:
        # alpha does not apply to VeRA (scaling is 1), so it is not shown.
        return (
            f"method={self.method}, rank={self.rank}, vera_seed={self.vera_shared.seed}, "
            f"detach_norm={self.detach_norm}, dropout_mode={self.dropout_mode}"
        )


class VeraLinearAdapter(VeraMixin, LinearAdapter):
    """VeRA / DVoRA on nn.Linear."""


class VeraConv1DAdapter(VeraMixin, Conv1DAdapter):
    """VeRA / DVoRA on transformers' GPT-2 Conv1D (weight stored (in, out))."""


# Layer class -> its VeRA class (dorafit.quant adds the 4-bit one).
VERA_CLASSES = {LinearAdapter: VeraLinearAdapter, Conv1DAdapter: VeraConv1DAdapter}


def vera_class(layer_cls: type, name: str = "") -> type:
    """The VeRA / DVoRA class for a dispatched layer class, or a clear error."""
    cls = VERA_CLASSES.get(layer_cls)
    if cls is None:
        raise AdapterError(
            f"module {name!r}: VeRA / DVoRA adapt linear layers only, not layers handled by {layer_cls.__name__}"
        )
    return cls


def build_vera_shared(members: List[Tuple[str, nn.Module, int]], config) -> VeraShared:
    """The shared matrices for the (name, module, rank) adapted with "vera" or "dvora"."""
    return build_shared(members, config.vera_seed, config.save_vera_matrices)


def build_vera_adapter(module: nn.Module, layer_cls: type, config, name: str, *, shared: VeraShared, **kwargs):
    """METHOD_BUILDERS entry for "vera" and "dvora" (alpha does not apply: scaling is 1)."""
    return vera_class(layer_cls, name)(module, shared=shared, d_init=config.vera_d_init, **kwargs)
