"""Where a DoRA training step spends what LoRA's does not, measured inside whole-model steps.

DoRA's step does LoRA's matmuls plus, per adapted layer, three things LoRA does not:

    the norm      ‖W0 + s B A‖ once per optimizer step (``AdapterLayer._compute_norm_sq``): the cross
                  term W0 Aᵀ (r · in · out multiply-adds, ``functional.rows_times_weight_t``) and
                  a few (out, r)-sized operations after it;
    the passes    forward, g ⊙ y in place; backward, g ⊙ grad_y and Σ grad_y ⊙ (y − b) in one
                  pass over two (tokens, out) tensors (``functional._scaled_grad_and_sums``);
    the optimizer AdamW over one more parameter, m.

Part 1 times the norm and the backward's pass where they run, inside real training steps (this
CPU runs each operation before the next, so a wall-clock timer around a call is its cost), and
the optimizer steps of LoRA and DoRA. Part 2 answers "how much faster would DoRA's step be
without it" in one process, round by round: DoRA against copies of itself whose norm is never
recomputed (a stored one is returned) and whose backward skips the pass (grad_y and zeros come
back instead). Those copies compute wrong gradients; they exist to be timed, nothing else.

    python benchmarks/probe_dora_extra.py --workload smollm2 --workload llama
    python benchmarks/probe_dora_extra.py --device cuda --workload llama   (from benchmarks/run_gpu.sh)

Results: ``benchmarks/results/dora-extra.md``. Part 1 runs on a CPU only: on a GPU its timers
would measure kernel launches, not kernels. Part 2 runs anywhere (it waits for the device at the
end of each step).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import sys
import time
from pathlib import Path

import torch

import dorafit
from dorafit import functional as DF
from dorafit.bench import cpu_model, make_variant, time_alternating
from dorafit.layers.base import AdapterLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layers as BL  # noqa: E402


@contextlib.contextmanager
def replaced(owner, name: str, value):
    """``owner.name`` is ``value`` while open, then what it was."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def timed(owner, name: str, totals: dict, key: str):
    """Add the wall-clock time of every call of ``owner.name`` to ``totals[key]`` while open."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    return replaced(owner, name, wrapper)


def skip_pass(grad_y, saved, scale, bias, need, zeros=None):
    """The backward pass's stand-in: grad_y unscaled and zero sums (wrong values, for timing)."""
    _, need_dot, need_sum = need
    zeros = torch.zeros(scale.numel(), dtype=torch.float32, device=grad_y.device)
    return grad_y, (zeros if need_dot else None), (zeros.clone() if need_sum else None)


def freeze_norms(model) -> None:
    """Every layer returns the norm it has now instead of computing one (wrong after a step)."""
    for layer in model.modules():
        if isinstance(layer, AdapterLayer) and layer.magnitude is not None:
            with torch.no_grad():
                stored = layer._compute_norm_sq()
            layer._compute_norm_sq = lambda cross=None, gram=None, stored=stored: stored


def tokens_per_call(model, loss_fn) -> int:
    """Rows of the input of the first adapted layer in one forward (the tokens of a micro-batch)."""
    layer = next(m for m in model.modules() if isinstance(m, AdapterLayer))
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].numel() // args[0].shape[-1]))
    try:
        with torch.no_grad():
            loss_fn(model)
    finally:
        handle.remove()
    return seen[0]


def frozen_base(name: str, device: torch.device):
    """(the frozen base model, its loss, the adapted module names, the rank) of a workload."""
    factory, loss_fn, targets, rank, _ = BL.workload(name, device)
    base = factory().to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, loss_fn, targets, rank


def part1(name: str, steps: int) -> list:
    base, loss_fn, targets, rank = frozen_base(name, torch.device("cpu"))
    variants = {m: make_variant(m, BL.dorafit_model(base, m, targets, rank, 0.0, "input"), loss_fn) for m in ("lora", "dora")}
    step_time, per_step = {}, {}
    for method, variant in variants.items():
        for _ in range(2):
            variant.train_step()
        totals: dict = collections.defaultdict(float)
        with timed(AdapterLayer, "_compute_norm_sq", totals, "norm"), \
                timed(DF, "rows_times_weight_t", totals, "cross term"), \
                timed(DF, "_scaled_grad_and_sums", totals, "backward pass"), \
                timed(torch.optim.AdamW, "step", totals, "optimizer"):
            start = time.perf_counter()
            for _ in range(steps):
                variant.train_step()
            step_time[method] = (time.perf_counter() - start) / steps
        per_step[method] = {k: v / steps for k, v in totals.items()}
    dora, lora_opt = per_step["dora"], per_step["lora"]["optimizer"]
    tokens = tokens_per_call(variants["dora"].model, loss_fn)
    ms = lambda s: f"{1e3 * s:.1f} ms"  # noqa: E731
    return [
        f"part 1, {steps} steps each, per step: LoRA's step {ms(step_time['lora'])} (the base of the percentages; "
        f"DoRA ÷ LoRA is part 2's, measured round by round); in DoRA's step {ms(step_time['dora'])}:",
        f"  the norm {ms(dora['norm'])} ({100 * dora['norm'] / step_time['lora']:.1f} %), of which the cross term W0 Aᵀ "
        f"{ms(dora['cross term'])}: r · in · out multiply-adds a layer, {100 * rank / tokens:.1f} % of its forward x W0ᵀ's "
        f"(r / tokens, {rank} / {tokens})",
        f"  the backward pass g ⊙ grad_y with Σ grad_y ⊙ (y − b) {ms(dora['backward pass'])} "
        f"({100 * dora['backward pass'] / step_time['lora']:.1f} %)",
        f"  AdamW: LoRA {ms(lora_opt)}, DoRA {ms(dora['optimizer'])}",
    ]


def part2(name: str, repeats: int, device: torch.device) -> list:
    base, loss_fn, targets, rank = frozen_base(name, device)
    models = {"LoRA": BL.dorafit_model(base, "lora", targets, rank, 0.0, "input")}
    for key in ("DoRA", "DoRA, norm stored", "DoRA, no backward pass", "DoRA, neither"):
        models[key] = BL.dorafit_model(base, "dora", targets, rank, 0.0, "input")
    for key in ("DoRA, norm stored", "DoRA, neither"):
        freeze_norms(models[key])
    steps = {}
    for key, model in models.items():
        step = make_variant(key, model, loss_fn).train_step
        if key in ("DoRA, no backward pass", "DoRA, neither"):
            step = functools.partial(_with_skip, step)
        steps[key] = step
    timings = time_alternating(steps, repeats, 2, device)
    lines = [f"part 2, {repeats} rounds, step ÷ LoRA's step in the same round (median, quartiles):"]
    for key in list(models)[1:]:
        lines.append(f"  {key:24s} {BL.paired_ratios(timings[key], timings['LoRA'])}; median step {1e3 * timings[key].median:.1f} ms")
    lines.append(f"  LoRA median step {1e3 * timings['LoRA'].median:.1f} ms")
    return lines


def _with_skip(step):
    with replaced(DF, "_scaled_grad_and_sums", skip_pass):
        step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", help="smollm2, llama (bench_layers.py's workloads)")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed in part 1")
    parser.add_argument("--repeats", type=int, default=9, help="rounds of part 2")
    parser.add_argument("--device", default="cpu", help="part 2's device (part 1 runs on a CPU only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}")
    for name in args.workload or ["smollm2"]:
        print(f"### {name}")
        lines = part1(name, args.steps) if device.type == "cpu" else [f"part 1: not on {device.type} (its timers need a CPU)"]
        for line in lines + part2(name, args.repeats, device):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
