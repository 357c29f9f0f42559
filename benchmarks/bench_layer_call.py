"""DoRA's fixed cost per layer call, against LoRA's, at SmolLM2-135M-Instruct's shapes.

SmolLM2 (hidden 576, intermediate 1536, 9 / 3 heads of 64) has 150 small adapted layers at the
paper's targets, so what one DoRA call costs beyond a LoRA call, independent of FLOPs, decides
the model's ratios. Per projection shape (in → out):

    q 576 → 576,  k / v 576 → 192,  up 576 → 1536,  down 1536 → 576      r 16, no bias

(``--shape tiny``: 16 → 16, where FLOPs do not count) and two call kinds:

    decode   no_grad, eval, x (4, 1, in): one greedy step of 4 sequences with a KV cache
    train    x (4, 128, in) needing a gradient: forward + backward + AdamW step + zero_grad,
             so the norm is recomputed every call, as in a training step

Each call kind alternates LoRA and DoRA (and the frozen base) in rounds of ``--calls`` calls and
prints the median µs per call and the per-round difference. ``--profile`` adds, per variant,
the torch.profiler operator counts and self times of one call, which says how much of the
difference is kernels and how much is Python around them.

    python benchmarks/bench_layer_call.py --rounds 9 --calls 200 --profile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import dorafit
from dorafit.bench import cpu_model

SHAPES = OrderedDict(q=(576, 576), kv=(576, 192), up=(576, 1536), down=(1536, 576))
# A layer too small for its FLOPs to matter: what is left is the fixed cost per call.
EXTRA_SHAPES = OrderedDict(tiny=(16, 16))


BASELINE = None  # another dorafit version (``--baseline``): variants "baseline lora", "baseline dora"


def build(method: str, in_f: int, out_f: int) -> nn.Module:
    """One adapted nn.Linear (no bias, as in LLaMA) with a non-zero B, so DoRA's g ≠ 1."""
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(proj=nn.Linear(in_f, out_f, bias=False)))
    for p in base.parameters():
        p.requires_grad_(False)
    if method == "base":
        return base
    library = BASELINE if method.startswith("baseline ") else dorafit
    method = method.replace("baseline ", "")
    model = library.attach(base, library.AdapterConfig(method=method, rank=16, alpha=32, targets=["proj"]))
    with torch.no_grad():
        model.proj.lora_b.normal_(0, 0.02)
    return model


def decode_call(model: nn.Module, in_f: int) -> Callable[[], None]:
    x = torch.randn(4, 1, in_f, generator=torch.Generator().manual_seed(1))
    model.eval()

    def call() -> None:
        with torch.no_grad():
            model(x)

    return call


def train_call(model: nn.Module, in_f: int) -> Callable[[], None]:
    x = torch.randn(4, 128, in_f, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def call() -> None:
        model(x).pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None

    return call


def time_rounds(calls: Dict[str, Callable[[], None]], rounds: int, per_round: int) -> Dict[str, List[float]]:
    """µs per call, one sample per round; the variants alternate within every round."""
    for fn in calls.values():  # warm-up
        for _ in range(max(2, per_round // 10)):
            fn()
    out: Dict[str, List[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            out[key].append((time.perf_counter() - start) / per_round * 1e6)
    return out


def op_table(fn: Callable[[], None], repeats: int = 20) -> Dict[str, List[float]]:
    """{aten op: [calls per call, self µs per call]} over ``repeats`` profiled calls."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    table = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            table[e.key] = [e.count / repeats, e.self_cpu_time_total / repeats]
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200, help="calls per round for decode (train: a tenth)")
    parser.add_argument("--kind", choices=["decode", "train"], action="append")
    parser.add_argument("--shape", choices=list(SHAPES) + list(EXTRA_SHAPES), action="append",
                        help="default: the four SmolLM2 shapes; tiny: 16 → 16, the fixed cost alone")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="also print operator counts per call")
    parser.add_argument("--baseline", help="a checkout of another dorafit version: its LoRA and DoRA alternate too")
    args = parser.parse_args(argv)
    global BASELINE
    if args.baseline:
        from dorafit.bench import load_dorafit_copy

        BASELINE = load_dorafit_copy(args.baseline)
    variants = ["base", "lora", "dora"] + (["baseline lora", "baseline dora"] if BASELINE else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {cpu_model()}, {torch.get_num_threads()} threads; µs per call, medians of "
          f"{args.rounds} alternating rounds")
    head = "| call | shape (in → out) | base | LoRA | DoRA | DoRA − LoRA per round (quartiles) | DoRA ÷ LoRA |"
    rule = "|---|---|---|---|---|---|---|"
    if BASELINE:
        head += " baseline LoRA | baseline DoRA | LoRA ÷ baseline LoRA per round | DoRA ÷ baseline DoRA per round |"
        rule += "---|---|---|---|"
    print("\n" + head + "\n" + rule)
    profiles = []
    for kind in args.kind or ["decode", "train"]:
        make_call = decode_call if kind == "decode" else train_call
        per_round = args.calls if kind == "decode" else max(5, args.calls // 10)
        for name in args.shape or list(SHAPES):
            in_f, out_f = {**SHAPES, **EXTRA_SHAPES}[name]
            calls = {m: make_call(build(m, in_f, out_f), in_f) for m in variants}
            t = time_rounds(calls, args.rounds, per_round)
            diff = sorted(d - l for d, l in zip(t["dora"], t["lora"]))
            q = lambda f: diff[min(len(diff) - 1, int(f * len(diff)))]  # noqa: E731
            med = {k: statistics.median(v) for k, v in t.items()}
            row = (f"| {kind} | {name} {in_f} → {out_f} | {med['base']:.1f} | {med['lora']:.1f} | {med['dora']:.1f} | "
                   f"{statistics.median(diff):+.1f} ({q(0.25):+.1f} to {q(0.75):+.1f}) | {med['dora'] / med['lora']:.3f} |")
            if BASELINE:
                ratio = lambda a, b: statistics.median(x / y for x, y in zip(t[a], t[b]))  # noqa: E731
                row += (f" {med['baseline lora']:.1f} | {med['baseline dora']:.1f} | {ratio('lora', 'baseline lora'):.3f} | "
                        f"{ratio('dora', 'baseline dora'):.3f} |")
            print(row, flush=True)
            if args.profile:
                profiles.append((kind, name, {m: op_table(calls[m]) for m in ("lora", "dora")}))
    for kind, name, tables in profiles:
        lora, dora = tables["lora"], tables["dora"]
        n_l = sum(c for c, _ in lora.values())
        n_d = sum(c for c, _ in dora.values())
        s_l = sum(s for _, s in lora.values())
        s_d = sum(s for _, s in dora.values())
        print(f"\n### {kind}, {name}: aten ops per call LoRA {n_l:.0f} ({s_l:.0f} µs self), "
              f"DoRA {n_d:.0f} ({s_d:.0f} µs self)\n")
        print("| operator | LoRA calls | DoRA calls | LoRA self µs | DoRA self µs |\n|---|---|---|---|---|")
        for op in sorted(set(lora) | set(dora), key=lambda k: -abs(dora.get(k, [0, 0])[1] - lora.get(k, [0, 0])[1])):
            cl, sl = lora.get(op, [0, 0.0])
            cd, sd = dora.get(op, [0, 0.0])
            if cl != cd or abs(sd - sl) > 1:
                print(f"| {op} | {cl:g} | {cd:g} | {sl:.1f} | {sd:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
