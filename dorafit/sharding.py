"""Models split over processes: tensor-parallel plans and shard-by-shard base loading.

Tensor parallel (torch's ``parallelize_module``) splits a linear base W0 (out, in) over the
tensor-parallel ranks in one of two ways:

    colwise   W0 Shard(0): each rank holds out/N rows; input replicated, output Shard(-1)
    rowwise   W0 Shard(1): each rank holds in/N columns; input Shard(-1), output all-reduced

The standard LLaMA plan is colwise q, k, v, gate, up and rowwise o, down; transformers models
carry it as ``config.base_model_tp_plan`` ("layers.*.self_attn.q_proj": "colwise", ...).
``parallelize_base`` applies that plan (its colwise and rowwise entries) with torch's styles.

``allocate`` gives the tensors of a model built on ``meta`` (and possibly sharded there) real,
uninitialised memory, leaving tensors that are real already (buffers computed at construction,
such as rotary tables) as they are; ``load_base`` then fills a model whose parameters are
sharded (FSDP2's Shard(0) rows, tensor-parallel shards, both on a 2-D mesh) or plain from a
Hugging Face folder's safetensors files, reading only the slice of each tensor that this process
holds: no process ever holds the whole base.

``TensorParallel`` describes how an adapter follows a tensor-parallel base (the layer itself is
``dorafit.layers.parallel``); ``row_norms_sq`` gives ‖W0‖² of the rows a process holds, from
its shard alone (``dorafit.materialize`` and the tensor-parallel layers use it).

``written_by_one_rank`` makes an adapter writer (``save_adapter``, the PEFT export,
``save_pretrained``) work on a sharded model: every rank calls it, the adapter's shards are
gathered to whole tensors (``whole_adapters``), and rank 0 alone writes the files a one-process
model would.

``dorafit.merge`` of a split model uses the last two sections: under FSDP2 each block's layers
merge while the block is held whole (``held_whole``) and each rank copies its rows into the
parameter FSDP2 keeps (``fsdp_chunk``); any rank's problem is every rank's (``agree``); the
merged model's ``save_pretrained`` gathers and writes from rank 0 (``install_whole_writer``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

STYLES = ("colwise", "rowwise")


class ShardingError(ValueError):
    """A sharded layout dorafit cannot handle, or files that do not fit the sharded model."""


def _layer_wildcard(name: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.*.mlp`` (numbers between dots only)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def model_tp_plan(model: nn.Module) -> Dict[str, str]:
    """{module name: "colwise" | "rowwise"} from a transformers model's ``base_model_tp_plan``.

    Entries of other styles (embedding, gathered or packed outputs) are left out: those modules
    stay whole on every rank. Raises ShardingError for a model without a plan.
    """
    config = getattr(model, "config", None)
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if not plan:
        raise ShardingError(f"{type(model).__name__} has no tensor-parallel plan (config.base_model_tp_plan); "
                            "parallelize it with torch's parallelize_module before attaching instead")
    prefix = getattr(model, "base_model_prefix", "")
    resolved = {}
    for name, _ in model.named_modules():
        local = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name
        style = plan.get(_layer_wildcard(local))
        if style in STYLES:
            resolved[name] = style
    if not resolved:
        raise ShardingError(f"the tensor-parallel plan of {type(model).__name__} names no module of the model "
                            f"(plan keys: {sorted(plan)[:8]})")
    return resolved


def parallelize_base(model: nn.Module, tp_mesh, plan: Optional[Dict[str, str]] = None) -> nn.Module:
    """Split the base layers over ``tp_mesh`` with torch's ColwiseParallel / RowwiseParallel,
    following ``plan`` (default: ``model_tp_plan(model)``). Call it before ``dorafit.attach``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = model_tp_plan(model) if plan is None else plan
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    bad = {name: style for name, style in plan.items() if style not in styles}
    if bad:
        raise ShardingError(f"tensor-parallel styles other than {STYLES} in the plan: {bad}")
    size = tp_mesh.size()
    for name, style in plan.items():
        module = model.get_submodule(name)
        dim = module.weight.shape[0 if style == "colwise" else 1]
        if dim % size:
            raise ShardingError(f"module {name!r}: {style} splits {dim} {'rows' if style == 'colwise' else 'columns'} "
                                f"over {size} tensor-parallel ranks; {dim} is not a multiple of {size}")
    return parallelize_module(model, tp_mesh, {name: styles[style]() for name, style in plan.items()})


# ------------------------------------------------------------------------------------------------
# Loading a base shard by shard


def allocate(model: nn.Module, device) -> nn.Module:
    """``model.to_empty(device)`` for the tensors still on ``meta`` only (FSDP2 shards included:
    each process allocates its own shard); real tensors keep their values."""
    device = torch.device(device)
    for module in model.modules():
        module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t, recurse=False)
    return model


def _safetensors_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ShardingError(f"{index}: not a safetensors index ({err})") from None
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ShardingError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return [single]


def local_slices(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
    """(the tensor this process writes into, the slice of the whole tensor it holds).

    For a DTensor (FSDP2 rows, tensor-parallel shards, a 2-D mesh of both) the local shard and
    its offsets; for a plain tensor the tensor and the whole range.
    """
    if not hasattr(t, "device_mesh"):
        return t, tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))


def row_norms_sq(layer: nn.Module, name: str = "") -> Tuple[torch.Tensor, slice]:
    """(‖W0_i‖² in float32, the slice of output features i) for the rows of an adapter's base
    weight that this process holds: from its local shard alone, the partial squares summed over
    the processes that split those rows by columns (rowwise tensor parallel). No gather of W0."""
    from . import functional as DF

    weight = layer.base.weight
    local, index = local_slices(weight)
    out_dim = layer.weight_out_dim
    rows = local.detach() if out_dim == 0 else local.detach().transpose(0, out_dim)
    norm_sq = DF.weight_norm_sq_per_output(rows.reshape(rows.shape[0], -1))
    if hasattr(weight, "device_mesh"):
        import torch.distributed as dist

        for mesh_dim, placement in enumerate(weight.placements):
            if placement.is_partial():
                raise ShardingError(f"module {name!r}: its weight is a partial sum over the processes "
                                    f"({placement}); dorafit needs whole or split values")
            if placement.is_shard() and placement.dim % weight.dim() != out_dim:
                dist.all_reduce(norm_sq, group=weight.device_mesh.get_group(mesh_dim))
    return norm_sq, index[out_dim]


def _wrapper_parts(model: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """{module name: child names that a base checkpoint does not know}: an adapter's ``base``,
    a trained copy's ``original`` and ``trainable``, which stand for the module itself."""
    from .adapters import ModulesToSave
    from .layers import AdapterLayer

    parts = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            parts[name] = ("base",)
        elif isinstance(module, ModulesToSave):
            parts[name] = ("original", "trainable")
    return parts


def base_key(key: str, wrappers: Dict[str, Tuple[str, ...]]) -> Optional[str]:
    """The key a base checkpoint uses for the model's tensor ``key`` (wrapper levels removed), or
    None for an adapter's own tensor (lora_a, magnitude, ...), which no base checkpoint holds."""
    parts = key.split(".")
    kept, i = [], 0
    while i < len(parts):
        kept.append(parts[i])
        owner = ".".join(kept)
        if owner in wrappers and i + 1 < len(parts):
            if parts[i + 1] not in wrappers[owner]:
                return None  # a tensor of the adapter itself
            i += 1  # skip "base" / "original" / "trainable"
        i += 1
    return ".".join(kept)


def _model_tensors(model: nn.Module) -> Dict[str, List[torch.Tensor]]:
    """{base checkpoint key: the model's tensors that take its value} for every parameter and
    persistent buffer (an adapted layer's base, both copies of a trained head; tied tensors once)."""
    wrappers = _wrapper_parts(model)
    targets: Dict[str, List[torch.Tensor]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        tensors = [(n, t) for n, t in module._parameters.items() if t is not None]
        tensors += [(n, t) for n, t in module._buffers.items()
                    if t is not None and n not in module._non_persistent_buffers_set]
        for name, t in tensors:
            key = base_key(prefix + name, wrappers)
            if key is not None and id(t) not in seen:
                seen.add(id(t))
                targets.setdefault(key, []).append(t)
    return targets


@torch.no_grad()
def load_base(model: nn.Module, folder, strict: bool = True) -> List[str]:
    """Copy a Hugging Face folder's weights into ``model`` in place, each process reading only the
    slice it holds (safetensors ``get_slice``); returns the keys loaded.

    The model's tensors must be real (``to_empty`` after building on ``meta``), sharded or not,
    adapted or not: an adapted layer's base takes the key of the layer it replaced, and adapter
    tensors, which no base checkpoint holds, are left alone. With ``strict`` a base tensor the
    files lack raises (a tied output head is the tensor it is tied to). Shapes are checked
    against the files before a value is copied.
    """
    from safetensors import safe_open

    folder = Path(folder)
    targets = _model_tensors(model)
    meta = sorted(k for k, ts in targets.items() if any(t.device.type == "meta" for t in ts))
    if meta:
        raise ShardingError(f"{len(meta)} tensors of the model are still on the meta device (e.g. {meta[0]}); "
                            "call model.to_empty(device=...) before loading")
    loaded = []
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in targets:
                    continue
                part = f.get_slice(key)
                for target in targets[key]:
                    if list(part.get_shape()) != list(target.shape):
                        raise ShardingError(f"{file}: {key} has shape {tuple(part.get_shape())}, the model's is "
                                            f"{tuple(target.shape)}")
                    local, index = local_slices(target)
                    local.copy_(part[index] if index else part[()])
                loaded.append(key)
    missing = sorted(set(targets) - set(loaded))
    if strict and missing:
        raise ShardingError(f"{folder}: no values for {len(missing)} tensors of the model, e.g. {missing[:5]}")
    return loaded


# ------------------------------------------------------------------------------------------------
# Adapters on a tensor-parallel base


class _SumInBackward(torch.autograd.Function):
    """Identity forward; the gradient is summed over the group in backward (a replicated tensor
    whose uses on each rank contribute part of its gradient)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumInForward(torch.autograd.Function):
    """Partial sums summed over the group in forward; identity backward (every rank's downstream
    is the same, so each partial receives the whole gradient)."""

    @staticmethod
    def forward(ctx, t, group):
        import torch.distributed as dist

        total = t.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (differentiable), or ``t`` itself."""
    return t.to_local() if hasattr(t, "device_mesh") else t


class TensorParallel:
    """How a tensor-parallel base layer is split, and what its adapter does to follow it.

    ============  =====================================  =====================================
                  colwise (W0 Shard(0), out rows)        rowwise (W0 Shard(1), in columns)
    ============  =====================================  =====================================
    A (r, in)     Replicate                              Shard(1): the columns x's shard meets
    B (out, r)    Shard(0): this rank's rows             Replicate
    m (out,)      Shard(0)                               Replicate
    h = x Aᵀ      whole on every rank; its gradient      a partial sum over the columns:
                  (from this rank's rows) all-reduced    all-reduced in forward
    ‖W0 + sBA‖²   complete for the local rows            partial sums over the columns,
                                                         all-reduced before the square root
    g ⊙ (...)     this rank's output rows                the reduced output (g is per row)
    ============  =====================================  =====================================

    A tensor indexed by the output features (B's rows, m, VeRA's b) follows the rows; one indexed
    by the input features (A's columns) follows the columns; the others are replicated.
    "replicate" (a whole weight held as a replicated DTensor) replicates everything.
    """

    def __init__(self, style: str, mesh) -> None:
        self.style = style
        self.mesh = mesh

    def __repr__(self) -> str:
        return f"TensorParallel({self.style}, {self.mesh.size()} ranks)"

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def split_axis(self) -> Optional[str]:
        """The axis of the weight this layer splits: "out", "in" or None."""
        return {"colwise": "out", "rowwise": "in"}.get(self.style)

    def distribute(self, full: torch.Tensor, axis: Optional[str] = None, dim: int = 0) -> torch.Tensor:
        """``full`` (the same value on every rank) as a DTensor: split along ``dim`` when ``axis``
        ("out" or "in": which of the weight's axes ``dim`` runs along) is the one this layer
        splits, else replicated. No communication: each rank keeps its chunk."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if axis is None or axis != self.split_axis:
            return DTensor.from_local(full, self.mesh, [Replicate()], run_check=False)
        rank, size = self.mesh.get_local_rank(), self.mesh.size()
        chunk = full.tensor_split(size, dim=dim)[rank] if full.shape[dim] % size == 0 else None
        if chunk is None:
            raise ShardingError(f"{full.shape[dim]} is not a multiple of the {size} tensor-parallel ranks")
        return DTensor.from_local(chunk.contiguous(), self.mesh, [Shard(dim)], run_check=False,
                                  shape=full.shape, stride=full.stride())

    def lowrank_input(self, h: torch.Tensor) -> torch.Tensor:
        """h = x Aᵀ as the low-rank path's second matmul needs it (see the table)."""
        if self.style == "colwise":
            return _SumInBackward.apply(h, self.group)
        if self.style == "rowwise":
            return _SumInForward.apply(h, self.group)
        return h

    def complete_norm_sq(self, partial: torch.Tensor) -> torch.Tensor:
        """‖W0 + sBA‖² (or ‖W0‖²) per row from this rank's part: summed over the columns' ranks."""
        if self.style == "rowwise":
            return _SumInForward.apply(partial, self.group)
        return partial

    def local_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W0ᵀ with this rank's part of W0 and of x, completed as the base layer's output is:
        colwise the local output rows (x's gradient summed over the ranks), rowwise the partial
        sums over the columns summed."""
        import torch.nn.functional as F

        if self.style == "colwise":
            return F.linear(_SumInBackward.apply(x, self.group), weight)
        out = F.linear(x, weight)
        return _SumInForward.apply(out, self.group) if self.style == "rowwise" else out

    def replicated_use(self, t: torch.Tensor) -> torch.Tensor:
        """A replicated factor used in a computation local to this rank's part of the weight (the
        norm's partial sums with the gradient kept): its gradient is summed over the ranks."""
        return _SumInBackward.apply(t, self.group) if self.style in ("colwise", "rowwise") else t


def tensor_parallel_of(name: str, base: nn.Module) -> Optional[TensorParallel]:
    """The tensor-parallel split of ``base`` (None for a whole weight), or ShardingError naming the
    module and the placement dorafit cannot follow."""
    weight = getattr(base, "weight", None)
    if weight is None or not hasattr(weight, "device_mesh"):
        return None
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    shown = ", ".join(str(p) for p in placements)
    if mesh.ndim != 1:
        raise ShardingError(f"module {name!r}: its weight is split over a {mesh.ndim}-D mesh ({shown}); attach the "
                            "adapters after the tensor-parallel split and before fully_shard")
    if not isinstance(base, nn.Linear):
        raise ShardingError(f"module {name!r}: a tensor-parallel {type(base).__name__} ({shown}) cannot be adapted; "
                            "dorafit follows nn.Linear layers split colwise (Shard(0)) or rowwise (Shard(1))")
    placement = placements[0]
    if placement.is_replicate():
        return TensorParallel("replicate", mesh)
    if placement.is_shard() and placement.dim in (0, -2):
        return TensorParallel("colwise", mesh)
    if placement.is_shard() and placement.dim in (1, -1):
        return TensorParallel("rowwise", mesh)
    raise ShardingError(f"module {name!r}: its weight is split as {shown}; dorafit follows colwise (Shard(0)) and "
                        "rowwise (Shard(1)) splits of a linear weight only")


# ------------------------------------------------------------------------------------------------
# Whole adapters out of a sharded model


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps it for a subclass named FSDP<name>."""
    cls = type(model)
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is not None and issubclass(cls, fsdp):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, fsdp))
    return cls


def _sharded_trainable(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(module, parameter name) of every DTensor parameter of the adapters and trained copies."""
    from .adapters import ModulesToSave
    from .layers import AdapterLayer

    found = []
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            owners = [(module, module.adapter_parameter_names())]
        elif isinstance(module, ModulesToSave):
            owners = [(m, list(m._parameters)) for m in module.trainable.modules()]
        else:
            continue
        for owner, names in owners:
            found += [(owner, n) for n in names if hasattr(owner._parameters.get(n), "device_mesh")]
    return found


def is_sharded(model: nn.Module) -> bool:
    """True when some adapter tensor of ``model`` is a DTensor (FSDP2 or tensor parallel)."""
    return bool(_sharded_trainable(model))


@contextlib.contextmanager
def whole_adapters(model: nn.Module) -> Iterator[None]:
    """Inside, every sharded adapter tensor (and trained copy) of ``model`` is its whole value as a
    plain tensor, on every rank; the shards are back in place afterwards. Entering gathers them:
    every rank must enter together, and nothing may run the model's forward inside."""
    swapped = []
    try:
        for owner, name in _sharded_trainable(model):
            shard = owner._parameters[name]
            whole = nn.Parameter(shard.detach().full_tensor(), requires_grad=shard.requires_grad)
            owner._parameters[name] = whole
            swapped.append((owner, name, shard))
        yield
    finally:
        for owner, name, shard in swapped:
            owner._parameters[name] = shard


def written_by_one_rank(write: Callable) -> Callable:
    """``write(model, path, ...)`` that works on a sharded model too: called on every rank, it
    gathers the whole adapter, rank 0 alone writes the files, and every rank returns the path."""

    @functools.wraps(write)
    def wrapper(model: nn.Module, path, *args, **kwargs):
        if not is_sharded(model):
            return write(model, path, *args, **kwargs)
        import torch.distributed as dist

        with whole_adapters(model):
            result = write(model, path, *args, **kwargs) if dist.get_rank() == 0 else Path(path)
        dist.barrier()  # the files exist on return, on every rank
        return result

    return wrapper


# ------------------------------------------------------------------------------------------------
# Merging under FSDP2. ``fully_shard`` keeps each parameter as a DTensor of dim-0 chunks, and its
# forward gathers the chunks of the parameter objects it registered: a merged weight must go into
# those objects, in place, or the next forward (and every writer) would still see W0. A block's
# merge therefore runs while FSDP holds the block whole (``FSDPModule.unshard``): the layer
# computes its merged weight with its usual code (the whole weight, or its tensor-parallel part
# on a 2-D mesh), and each process copies its own chunk into the parameter FSDP keeps.


def _fsdp_type() -> Optional[type]:
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def fsdp_owners(model: nn.Module, name: str) -> Tuple[nn.Module, ...]:
    """The FSDP2 modules holding the parameters of submodule ``name``: its nearest sharded ancestor
    (itself included) and any sharded module inside it; () when FSDP2 does not manage it."""
    fsdp = _fsdp_type()
    if fsdp is None:
        return ()
    path, nearest = name.split(".") if name else [], None
    for depth in range(len(path) + 1):
        module = model.get_submodule(".".join(path[:depth]))
        if isinstance(module, fsdp):
            nearest = module
    inside = [m for m in model.get_submodule(name).modules() if isinstance(m, fsdp) and m is not nearest]
    return tuple(([nearest] if nearest is not None else []) + inside)


@contextlib.contextmanager
def held_whole(owners: Tuple[nn.Module, ...]) -> Iterator[None]:
    """Inside, the FSDP2 modules ``owners`` hold their parameters unsharded (a collective: every
    rank enters with the same owners, in the same order)."""
    for module in owners:
        module.unshard()
    try:
        yield
    finally:
        for module in reversed(owners):
            module.reshard()


def fsdp_chunk(name: str, whole: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """This process's dim-0 chunk of ``whole`` (a parameter as FSDP2 gathers it: the whole tensor,
    or this process's tensor-parallel part) in the layout of FSDP2's ``sharded`` DTensor."""
    placement, mesh = sharded.placements[0], sharded.device_mesh
    if getattr(placement, "dim", None) != 0:
        raise ShardingError(f"module {name!r}: FSDP2 splits its weight as {placement}; dorafit merges weights "
                            "FSDP2 splits along dim 0 (the default) only")
    chunks = torch.chunk(whole, mesh.size(0), dim=0)
    index = mesh.get_local_rank(0)
    local = sharded.to_local()
    chunk = chunks[index] if index < len(chunks) else whole[:0]
    if chunk.shape != local.shape:
        raise ShardingError(f"module {name!r}: FSDP2 holds a {tuple(local.shape)} part of its weight here, not the "
                            f"dim-0 chunk {tuple(chunk.shape)} of {tuple(whole.shape)}; cannot place the merged weight")
    return chunk


def agree(problem: Optional[str]) -> Optional[str]:
    """The first process's problem among all processes' (``problem`` on one process): every rank
    raises, or none does (one rank raising alone would leave the others waiting in a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return problem
    found: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p), None)


def is_split(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is a DTensor (FSDP2 or tensor parallel)."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def save_whole_pretrained(model: nn.Module, path, **kwargs):
    """A split model's ``save_pretrained``: every rank calls it, the state is gathered to whole
    tensors on rank 0 (``get_model_state_dict``, one tensor at a time to the CPU), and rank 0
    writes what the model's class writes for a one-process model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Every rank calls the class's writer (transformers' own tensor parallel has collectives in
    # it); rank 0 alone holds the state and writes.
    model_class(model).save_pretrained(model, path, state_dict=state, is_main_process=dist.get_rank() == 0, **kwargs)
    dist.barrier()  # the files exist on return, on every rank
    return Path(path)


def install_whole_writer(model: nn.Module) -> None:
    """After ``dorafit.merge`` of a split transformers model: its ``save_pretrained`` writes the
    whole merged model from rank 0 (the class's own would write each rank's shards)."""
    if callable(getattr(model_class(model), "save_pretrained", None)):
        # A partial, not a bound method: it pickles by reference.
        model.__dict__["save_pretrained"] = functools.partial(save_whole_pretrained, model)
