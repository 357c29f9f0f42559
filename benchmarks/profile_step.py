"""Where a DoRA training step spends its time, against the cost model of DESIGN.md §2.

One 4096×4096 linear, r 16, input that needs a gradient (as every layer but the first):

    base forward + backward ≈ 4·N·in·out FLOPs, the factored norm ≈ 2·r·in·out, i.e. r / (2N)

The script profiles LoRA and DoRA steps (forward, backward, AdamW) at several token counts
with torch.profiler and prints, per variant, the self CPU time of the top operators, then the
measured DoRA − LoRA time beside the predicted norm cost.

    python benchmarks/profile_step.py --tokens 64 512

``--workload minilm`` (or ``llama``, ``smollm2``) profiles a whole model instead, alternating LoRA and DoRA
steps, and splits DoRA − LoRA by operator and input shape: calls that only DoRA makes (its
scaling, the magnitude's reduction, the norm) against calls both variants make identically
(matmuls of the same shapes, attention, GELU...), whose difference is the machine's, not
DoRA's: on a CPU, mostly the page faults of freshly allocated large tensors.

    python benchmarks/profile_step.py --workload minilm --rounds 4
    python benchmarks/profile_step.py --workload smollm2 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import OrderedDict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import dorafit
from dorafit.bench import make_variant, time_alternating


def profile_model(name: str, rounds: int, top: int) -> None:
    """DoRA − LoRA per (operator, input shapes), split into DoRA's own calls and shared calls."""
    from bench_layers import workload  # benchmarks/ is the script's directory

    factory, loss_fn, targets, rank, _ = workload(name, torch.device("cpu"))
    base = factory()
    for p in base.parameters():
        p.requires_grad_(False)
    variants = {}
    for method in ("lora", "dora"):
        cfg = dorafit.AdapterConfig(method=method, rank=rank, alpha=2 * rank, targets=targets)
        variants[method] = make_variant(method, dorafit.attach(copy.deepcopy(base), cfg), loss_fn)
    for v in variants.values():
        v.train_step()
    # (op, shapes) -> [total self time, calls], summed over alternating rounds
    totals = {k: {} for k in variants}
    wall = {k: 0.0 for k in variants}  # ms per profiled step
    for _ in range(rounds):
        for key, v in variants.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                start = time.perf_counter()
                v.train_step()
                wall[key] += (time.perf_counter() - start) * 1000 / rounds
            for e in prof.key_averages(group_by_input_shape=True):
                if e.key.startswith("aten::"):
                    slot = totals[key].setdefault((e.key, str(e.input_shapes)), [0.0, 0])
                    slot[0] += e.self_cpu_time_total / 1000 / rounds
                    slot[1] += e.count
    lora, dora = totals["lora"], totals["dora"]
    own, shared = [], []
    for k in set(lora) | set(dora):
        t_l, n_l = lora.get(k, [0.0, 0])
        t_d, n_d = dora.get(k, [0.0, 0])
        if n_l == n_d:
            shared.append((t_d - t_l, k, n_d // rounds))
        else:  # DoRA's extra calls of this shape, at DoRA's time per call
            extra = (n_d - n_l) / max(n_d, 1) * t_d if n_d > n_l else t_d - t_l
            own.append((extra, k, (n_d - n_l) // rounds))
            shared.append((t_d - extra - t_l, k, min(n_l, n_d) // rounds))
    step_l = sum(t for t, _ in lora.values())
    step_d = sum(t for t, _ in dora.values())
    print(f"## {name}: operator self time per step, {rounds} alternating rounds (profiled, so slower than the benchmark)")
    print(f"LoRA {step_l:.1f} ms, DoRA {step_d:.1f} ms: DoRA − LoRA {step_d - step_l:+.1f} ms ({100 * (step_d / step_l - 1):+.1f} %)")
    own_sum, shared_sum = sum(t for t, _, _ in own), sum(t for t, _, _ in shared)
    print(f"- calls only DoRA makes: {own_sum:+.1f} ms ({100 * own_sum / step_l:+.1f} % of LoRA's step)")
    print(f"- calls both make, same shapes and counts: {shared_sum:+.1f} ms ({100 * shared_sum / step_l:+.1f} %)")
    # What the operators' self times do not cover: Python (layers, autograd.Function
    # backwards, the optimizer's loop), the autograd engine and the profiler's own bookkeeping.
    outside = {k: wall[k] - sum(t for t, _ in totals[k].values()) for k in totals}
    n_ops = {k: sum(n for _, n in totals[k].values()) // rounds for k in totals}
    print(f"- profiled wall time per step: LoRA {wall['lora']:.1f} ms, DoRA {wall['dora']:.1f} ms; outside aten operators "
          f"LoRA {outside['lora']:.1f} ms, DoRA {outside['dora']:.1f} ms ({outside['dora'] - outside['lora']:+.1f} ms); "
          f"aten calls per step LoRA {n_ops['lora']}, DoRA {n_ops['dora']}\n")
    for title, rows in (("DoRA's own calls", own), ("shared calls, largest differences", shared)):
        print(f"### {title}\n\n| ms per step | calls per step | operator | input shapes |\n|---|---|---|---|")
        for t, (op, shapes), n in sorted(rows, key=lambda r: -abs(r[0]))[:top]:
            print(f"| {t:+.1f} | {n} | {op} | {shapes[:90]} |")
        print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--workload", choices=["minilm", "llama", "smollm2"], help="profile a whole model instead of one layer")
    parser.add_argument("--rounds", type=int, default=4, help="alternating profiled steps per variant (--workload)")
    args = parser.parse_args()
    if args.workload:
        profile_model(args.workload, args.rounds, args.top)
        return 0
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(proj=nn.Linear(args.size, args.size)))
    for tokens in args.tokens:
        x = torch.randn(tokens, args.size).requires_grad_(True)
        variants = {}
        for method in ("lora", "dora"):
            cfg = dorafit.AdapterConfig(method=method, rank=args.rank, alpha=2 * args.rank, targets=["proj"])
            model = dorafit.attach(copy.deepcopy(base), cfg)
            variants[method] = make_variant(method, model, lambda m: m(x).pow(2).mean())
        # 1. wall time, alternating
        times = time_alternating({k: v.train_step for k, v in variants.items()}, args.repeats, 2)
        # 2. operator breakdown
        print(f"## {tokens} tokens, {args.size}×{args.size}, r {args.rank}")
        for key, v in variants.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    v.train_step()
            print(f"### {key}: step median {times[key]}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        predicted = args.rank / (2 * tokens)
        measured = times["dora"].median / times["lora"].median - 1
        print(f"cost model: norm adds r/(2N) = {100 * predicted:.1f}% of the base forward+backward; "
              f"measured DoRA − LoRA = {100 * measured:+.1f}% of the LoRA step\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
