"""One active adapter costs what one adapter costs: a second, inactive named adapter is free.

Builds one LLaMA-shaped model (4 layers, hidden 256, intermediate 704, vocab 1024; DoRA r 16 on
q,k,v,o,gate,up,down; 2×128 tokens, causal-LM loss) twice from the same weights: once with one
adapter, once with that adapter active and a second one ("code", another rank and targets)
attached but inactive. Times a training step (forward, backward, AdamW step) of both,
alternating, in one process, and prints medians, min–max, the ratio of the medians and the
median of the per-round ratios (robust to a loaded machine). Also times entering
and leaving ``dorafit.disable_adapter`` and the forward inside it against the detached base.

    python benchmarks/bench_named_adapters.py --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import dorafit


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    base = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    single = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(rank=16, alpha=32, targets=targets))
    two = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(rank=16, alpha=32, targets=targets), name="math")
    dorafit.attach(two, dorafit.AdapterConfig(rank=8, targets=["q_proj", "v_proj"]), name="code")
    two.load_state_dict(single.state_dict())  # same adapter weights
    return base, single, two


def step_fn(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(times):
    return f"{1000 * statistics.median(times):8.1f} ms  ({1000 * min(times):.1f}–{1000 * max(times):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, single, two = build(args)
    ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
    steps = {"one adapter": step_fn(single, ids), "active + inactive second": step_fn(two, ids)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.repeats):
        for name, fn in steps.items():  # alternate so that load drifts hit both alike
            t = timed(fn)
            if i >= args.warmup:
                times[name].append(t)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print("training step (forward + backward + AdamW), median (min–max) over", args.repeats)
    for name, ts in times.items():
        print(f"  {name:<26} {summary(ts)}")
    ratio = statistics.median(times["active + inactive second"]) / statistics.median(times["one adapter"])
    rounds = [b / a for a, b in zip(times["one adapter"], times["active + inactive second"])]
    print(f"  ratio of medians (two / one)   {ratio:.3f}")
    print(f"  median per-round ratio         {statistics.median(rounds):.3f}")

    # disable_adapter: cost to enter + leave, and the forward inside against the base model
    enter = []
    for _ in range(200):
        t0 = time.perf_counter()
        with dorafit.disable_adapter(two):
            pass
        enter.append(time.perf_counter() - t0)
    fwd = {"base model": [], "inside disable_adapter": []}
    base.eval(), two.eval()
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            t_base = timed(lambda: base(input_ids=ids))
            with dorafit.disable_adapter(two):
                t_dis = timed(lambda: two(input_ids=ids))
            if i >= args.warmup:
                fwd["base model"].append(t_base)
                fwd["inside disable_adapter"].append(t_dis)
    print(f"disable_adapter enter+leave: median {1e6 * statistics.median(enter):.1f} µs "
          f"({len(dorafit.adapter_modules(two))} adapter layers)")
    print("no-grad forward, median (min–max)")
    for name, ts in fwd.items():
        print(f"  {name:<26} {summary(ts)}")


if __name__ == "__main__":
    main()
