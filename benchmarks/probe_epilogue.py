"""Would a GEMM epilogue remove DoRA's forward scaling pass on this CPU? A probe.

DoRA's scaled-output node makes y = g ⊙ (x W0ᵀ + ...) with one matmul and one in-place
multiply by g (a pass over the (tokens, out) output). oneDNN can fuse a per-column multiply into
its matmul as a binary post-op; torch exposes it as ``torch.ops.mkldnn._linear_pointwise.binary``
(private, CPU only). This times, per shape, medians over rounds:

    mm + mul_        x @ W0ᵀ, then the multiply in place (what dorafit does)
    mm               x @ W0ᵀ alone (the floor the fusion could reach)
    oneDNN (mul)     the fused matmul with g as a (1, out) binary post-op
    oneDNN (none)    the same oneDNN matmul without post-op

    python benchmarks/probe_epilogue.py
"""

from __future__ import annotations

import statistics
import time

import torch

from dorafit.bench import cpu_model

SHAPES = [(1024, 1024, 1024), (1024, 1024, 2816), (512, 576, 576), (512, 576, 1536), (64, 4096, 4096)]


def median_ms(fn, calls: int = 40, skip: int = 5) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[skip:]) * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, {cpu_model()}, {torch.get_num_threads()} threads")
    fused = torch.ops.mkldnn._linear_pointwise
    print("| tokens, in, out | mm + mul_ ms | mm ms | oneDNN (mul) ms | oneDNN (none) ms |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for n, i, o in SHAPES:
        x, w, g = torch.randn(n, i), torch.randn(o, i), torch.rand(o)
        row = g.view(1, -1)
        torch.testing.assert_close(fused.binary(x, row, w, None, "mul"), (x @ w.t()) * g, rtol=1e-4, atol=1e-3)
        variants = [
            lambda: (x @ w.t()).mul_(g),
            lambda: x @ w.t(),
            lambda: fused.binary(x, row, w, None, "mul"),
            lambda: fused(x, w, None, "none", [], ""),
        ]
        rounds = [[median_ms(v) for v in variants] for _ in range(5)]
        cols = [statistics.median(c) for c in zip(*rounds)]
        print(f"| {n}, {i}, {o} | " + " | ".join(f"{c:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
