"""Where a DoRA training step spends its time, against the cost model of DESIGN.md §2.

One 4096×4096 linear, r 16, input that needs a gradient (as every layer but the first):

    base forward + backward ≈ 4·N·in·out FLOPs, the factored norm ≈ 2·r·in·out, i.e. r / (2N)

The script profiles LoRA and DoRA steps (forward, backward, AdamW) at several token counts
with torch.profiler and prints, per variant, the self CPU time of the top operators, then the
measured DoRA − LoRA time beside the predicted norm cost.

    python benchmarks/profile_step.py --tokens 64 512
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import OrderedDict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import dorafit
from dorafit.bench import make_variant, time_alternating


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
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
