"""Measuring adapter cost: step time, memory saved for backward and step peak memory.

Used by ``benchmarks/`` and by ``dorafit bench``. Variants are timed alternately in one
process (warm-up first, then rounds that run every variant once), so that a noisy machine
affects them alike; results are medians with min and max.

- step time: wall time of forward + loss + backward + optimizer step (+ zero_grad);
- saved for backward: bytes of the distinct storages autograd keeps for backward, parameters
  excluded (``torch.autograd.graph.saved_tensors_hooks``);
- step peak: the highest total of memory allocated during one step above what was allocated
  before it, from the allocator events of ``torch.profiler`` (``profile_memory=True``; on CUDA,
  ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch


@dataclass
class Timing:
    """Seconds per call over repeats."""

    samples: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def __str__(self) -> str:
        return f"{1e3 * self.median:9.2f} ms ({1e3 * self.low:.2f}–{1e3 * self.high:.2f})"


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (Linux ``/proc/cpuinfo``), else what
    ``platform`` knows: printed beside every timing, since the figures depend on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    fns: Dict[str, Callable[[], None]],
    repeats: int = 5,
    warmup: int = 2,
    device: Optional[torch.device] = None,
) -> Dict[str, Timing]:
    """Time each function ``repeats`` times, interleaved round by round, after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    out = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out[name].samples.append(time.perf_counter() - start)
    return out


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor], params: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages that autograd saves during ``forward()``, parameters excluded."""
    exclude = {p.untyped_storage().data_ptr() for p in params}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and ptr != 0:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    total = sum(seen.values())
    del out
    return total


def step_peak_bytes(step: Callable[[], None], device: Optional[torch.device] = None) -> int:
    """Peak bytes allocated during ``step()`` above the allocation level before it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------
# Side-by-side comparison of adapter variants on one workload

@dataclass
class Variant:
    """One model under test: a step function for training and a forward for evaluation."""

    name: str
    model: torch.nn.Module
    train_step: Callable[[], None]
    eval_forward: Callable[[], torch.Tensor]
    train_forward: Callable[[], torch.Tensor]


def make_variant(
    name: str,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    lr: float = 1e-4,
    accumulation: int = 1,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Variant:
    """Wrap an adapted model in a training step (AdamW, ``accumulation`` micro-batches) and an
    evaluation forward (``no_grad``, eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr) if params else None
    device = next(model.parameters()).device

    def ctx():
        if autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=autocast_dtype)

    def train_forward() -> torch.Tensor:
        model.train()
        with ctx():
            return loss_fn(model)

    def train_step() -> None:
        for _ in range(accumulation):
            loss = train_forward() / accumulation
            if loss.requires_grad:  # a frozen base model with inputs that need no gradient: forward only
                loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def eval_forward() -> torch.Tensor:
        model.eval()
        with torch.no_grad(), ctx():
            return loss_fn(model)

    return Variant(name, model, train_step, eval_forward, train_forward)


def measure_variants(
    variants: Sequence[Variant],
    repeats: int = 5,
    warmup: int = 2,
    memory: bool = True,
    eval_too: bool = True,
    steps: bool = True,
) -> Dict[str, Dict[str, object]]:
    """Step time, eval time, saved-for-backward bytes and step peak for each variant.

    ``steps=False`` runs no training step at all (no step time, no step peak; the saved bytes
    need a forward only), for machines where a backward is too slow to repeat.
    """
    device = next(variants[0].model.parameters()).device
    results: Dict[str, Dict[str, object]] = {v.name: {} for v in variants}
    if steps:
        train = time_alternating({v.name: v.train_step for v in variants}, repeats, warmup, device)
        for v in variants:
            results[v.name]["step"] = train[v.name]
    if eval_too:
        # Warm-up as for steps: a compiled model builds its no-grad graphs on the first calls
        # (one computing the norm, one reading the kept norm).
        evals = time_alternating({v.name: v.eval_forward for v in variants}, repeats, max(1, warmup), device)
        for v in variants:
            results[v.name]["eval"] = evals[v.name]
    if memory:
        for v in variants:
            params = list(v.model.parameters())
            results[v.name]["saved"] = saved_for_backward_bytes(v.train_forward, params)
            if steps:
                results[v.name]["peak"] = step_peak_bytes(v.train_step, device)
    return results


# ------------------------------------------------------------------------------------------
# Another version of dorafit in the same process (a baseline to measure a change against)


def load_dorafit_copy(checkout: str, name: str = "dorafit_baseline"):
    """Import the ``dorafit`` package of another checkout (e.g. ``git archive main``) as module
    ``name``, beside this one, so that both versions run in one process and one round structure.

    Only the library core is meant to be used from it (``attach``, ``AdapterConfig``, ``merge``):
    it imports itself relatively; its ``train`` and ``eval`` recipes import ``dorafit`` by name.
    """
    import importlib.util
    import pathlib
    import sys

    if name in sys.modules:
        return sys.modules[name]
    root = pathlib.Path(checkout) / "dorafit"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# What a GPU would launch: aten operators, elementwise traffic and host syncs, counted exactly

# Matmuls: their outputs are not counted as elementwise traffic.
MATMUL_OPS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm", "mv", "dot", "matmul", "linear"})
# Reads of a tensor's value by Python (``.item()``, ``bool(t)``, ``if t.any():``): a stream stall.
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero"})
# Operators that return an alias of their input without a kernel, besides schema views.
_ALIASING_OPS = frozenset({"_unsafe_view", "lift_fresh", "alias", "detach_"})


@dataclass
class OpCount:
    """Aten operators of a piece of code: each one is at least one kernel launch on a GPU.

    ``ops``: operator names in call order, views excluded; ``elementwise_bytes``: bytes written
    by non-matmul operators whose output has one of the ``big_numel`` sizes (e.g. tokens × out
    and tokens × in of one layer); ``other_bytes``: bytes written by the other non-matmul
    operators (weight-sized temporaries such as g ⊙ W0, per-feature vectors); ``syncs``:
    operators that read a value on the host.
    """

    ops: List[str] = field(default_factory=list)
    elementwise_bytes: int = 0
    other_bytes: int = 0
    syncs: int = 0

    def __len__(self) -> int:
        return len(self.ops)


def count_ops(fn: Callable[[], object], big_numel: Sequence[int] = ()) -> OpCount:
    """Run ``fn()`` once and count its aten operators (forward and backward alike)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = OpCount()

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in HOST_SYNC_OPS:
                count.syncs += 1
            if func.is_view or name in _ALIASING_OPS:
                return out
            count.ops.append(name)
            if name not in MATMUL_OPS:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        size = t.numel() * t.element_size()
                        if t.numel() in big_numel:
                            count.elementwise_bytes += size
                        else:
                            count.other_bytes += size
            return out

    with Counter():
        fn()
    return count


# The calls ``count_layer_ops`` measures on one adapted layer.
LAYER_CALLS = ("train", "accumulation", "eval", "decode")


def count_layer_ops(method: str, tokens: int, in_features: int, out_features: int, call: str, *,
                    rank: int = 16, bias: bool = False, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> OpCount:
    """Count one call of one adapted nn.Linear in its steady state:

    train         forward + backward right after an optimizer step (the norm is due)
    accumulation  forward + backward of a later micro-batch (the norm is kept)
    eval          a no-grad forward in eval mode (g is kept)
    decode        the same with one token, x (1, 1, in)

    The input needs a gradient in training, as for any layer but the first. Counted from the
    call itself: the optimizer step before it is not. Elementwise bytes: outputs of tokens × out
    or tokens × in elements.
    """
    import dorafit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=bias)).to(device, dtype)
    dorafit.attach(model, dorafit.AdapterConfig(method=method, rank=rank, alpha=2 * rank, targets=["0"],
                                                adapter_dtype="base" if dtype != torch.float32 else "float32"))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    optimizer = torch.optim.SGD(params, lr=1e-3)
    x = torch.randn(tokens, in_features, dtype=dtype, device=device, requires_grad=True)
    grad_out = torch.randn(tokens, out_features, dtype=dtype, device=device)

    def step(micro: bool) -> None:
        x.grad = None
        model(x).backward(grad_out)
        if not micro:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm: the first calls read ‖W0‖² and build what is kept
        step(False)
    if call in ("train", "accumulation"):
        if call == "accumulation":
            step(True)
        x.grad = None
        return count_ops(lambda: model(x).backward(grad_out), (tokens * out_features, tokens * in_features))
    model.eval()
    x_eval = torch.randn(1, 1, in_features, dtype=dtype, device=device) if call == "decode" else x.detach()
    with torch.no_grad():
        model(x_eval)
        rows = x_eval.numel() // in_features
        return count_ops(lambda: model(x_eval), (rows * out_features, rows * in_features))


def count_step_syncs(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 3) -> Dict[str, int]:
    """Host syncs of a causal LM's steady-state steps: a training step (forward + backward after
    two optimizer steps), an evaluation forward, and a greedy generation of ``new_tokens`` with
    the key/value cache. Compare with the same model without adapters: transformers reads a
    value or two itself."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def train() -> None:
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def generate() -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    for _ in range(2):
        train()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    counts = {"train": count_ops(train).syncs}
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        counts["eval"] = count_ops(lambda: model(input_ids=ids, use_cache=False)).syncs
        generate()
        counts["generate"] = count_ops(generate).syncs
    return counts
