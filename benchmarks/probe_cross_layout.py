"""The norm's cross term on this CPU: which matmul layout, and when to stack A's rows on the tokens.

Where DoRA's detached norm is due (once per optimizer step), ‖W0 + s B A‖ needs C = A W0ᵀ
(r × in × out multiply-adds), then O(r² (in + out)) more (``functional.factored_norm_sq``).
Two questions, medians over rounds, r 16:

1. The same product in two layouts: A W0ᵀ, (r, out), as dorafit computed it before, and
   W0 Aᵀ, (out, r), transposed afterwards (``functional.rows_times_weight_t`` now). Also the
   whole norm from W0 both ways: the addmm of ``factored_norm_sq`` reads C transposed, which is
   contiguous only in the second layout.
2. The forward products of a training call when the norm is due, beyond LoRA's (x W0ᵀ, x Aᵀ and
   the in-place addmm): "apart" adds W0 Aᵀ and the norm; "stacked" makes [x; A] W0ᵀ and
   [x; A] Aᵀ (``functional.stacked_products``: one read of W0, a copy of x, y outside z's
   storage). The last column is what ``compose._stack_norm_rows`` picks.
3. Not the norm, noted here because it is the same effect: ∂L/∂B = s gradᵀ h of the low-rank
   path (LoRA's autograd and dorafit's DoRA node alike) written as (out, r) rows, against s hᵀ
   grad written as (r, out) rows, alone and with the copy that would give B's layout back.

    python benchmarks/probe_cross_layout.py
    python benchmarks/probe_cross_layout.py --device cuda     (from benchmarks/run_gpu.sh)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dorafit import functional as DF
from dorafit.bench import _sync, cpu_model
from dorafit.layers.compose import _stack_norm_rows

RANK, SCALING = 16, 2.0
LAYERS = [(576, 576), (192, 576), (1536, 576), (576, 1536), (1024, 1024), (2816, 1024), (1024, 2816), (4096, 4096)]
CALLS = [(512, 576, 576), (512, 576, 192), (512, 576, 1536), (512, 1536, 576), (1024, 1024, 1024),
         (1024, 1024, 2816), (1024, 2816, 1024), (64, 1024, 1024), (128, 1024, 1024), (256, 1024, 1024),
         (256, 1024, 2816), (64, 4096, 4096), (256, 4096, 4096)]


DEVICE = torch.device("cpu")  # --device


def median_ms(fn, budget_s: float = 0.25, rounds: int = 9) -> float:
    """Median over ``rounds`` of the mean time of a batch of calls sized to ``budget_s``."""
    fn()
    _sync(DEVICE)
    start = time.perf_counter()
    fn()
    _sync(DEVICE)
    calls = max(3, int(budget_s / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(DEVICE)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e3


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE)


def norm_before(w0_sq, w, a, b):
    """The norm as computed before: C = A W0ᵀ (r, out), read transposed by the addmm."""
    return DF.factored_norm(w0_sq, a @ w.t(), a, b, SCALING)


def norm_now(w0_sq, w, a, b):
    return DF.factored_norm(w0_sq, DF.rows_times_weight_t(a, w), a, b, SCALING)


def layouts() -> None:
    print("| out, in | A W0ᵀ ms | W0 Aᵀ ms | ÷ | norm, A W0ᵀ ms | norm, W0 Aᵀ ms | ÷ |")
    print("|---|---|---|---|---|---|---|")
    for out_f, in_f in LAYERS:
        w, a = randn(out_f, in_f) / in_f ** 0.5, randn(RANK, in_f) / in_f ** 0.5
        b, w0_sq = randn(out_f, RANK) * 0.01, DF.weight_norm_sq_per_output(w)
        torch.testing.assert_close(norm_now(w0_sq, w, a, b), norm_before(w0_sq, w, a, b), rtol=1e-5, atol=1e-6)
        cols = [median_ms(f) for f in (lambda: a @ w.t(), lambda: (w @ a.t()).t(),
                                       lambda: norm_before(w0_sq, w, a, b), lambda: norm_now(w0_sq, w, a, b))]
        print(f"| {out_f}, {in_f} | {cols[0]:.3f} | {cols[1]:.3f} | {cols[1] / cols[0]:.2f} | "
              f"{cols[2]:.3f} | {cols[3]:.3f} | {cols[3] / cols[2]:.2f} |")


def stacking() -> None:
    print("| tokens, in, out | LoRA's products ms | apart: DoRA − LoRA ms | stacked: DoRA − LoRA ms | cheaper | rule picks |")
    print("|---|---|---|---|---|---|")
    for n, in_f, out_f in CALLS:
        x, w = randn(n, in_f), randn(out_f, in_f) / in_f ** 0.5
        a, b = randn(RANK, in_f) / in_f ** 0.5, randn(out_f, RANK) * 0.01
        w0_sq = DF.weight_norm_sq_per_output(w)

        def lora():
            return (x @ w.t()).addmm_(x @ a.t(), b.t(), alpha=SCALING)

        def apart():
            norm = DF.factored_norm(w0_sq, DF.rows_times_weight_t(a, w), a, b, SCALING)
            return (x @ w.t()).addmm_(x @ a.t(), b.t(), alpha=SCALING), norm

        def stacked():
            z, h, cross, gram = DF.stacked_products(x, a, w)
            norm = DF.factored_norm(w0_sq, cross, a, b, SCALING, gram=gram)
            return torch.addmm(z, h, b.t(), alpha=SCALING), norm

        (y_apart, n_apart), (y_stacked, n_stacked) = apart(), stacked()
        torch.testing.assert_close(y_apart, y_stacked, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(n_apart, n_stacked, rtol=1e-4, atol=1e-5)
        rounds = [[median_ms(f, rounds=3) for f in (lora, apart, stacked)] for _ in range(3)]
        base, sep, stk = (statistics.median(c) for c in zip(*rounds))
        picks = "stacked" if _stack_norm_rows(x, w) else "apart"
        print(f"| {n}, {in_f}, {out_f} | {base:.3f} | {sep - base:+.3f} | {stk - base:+.3f} | "
              f"{'stacked' if stk < sep else 'apart'} | {picks} |")


def b_gradient() -> None:
    print("| tokens, out | gradᵀ h, (out, r) ms | hᵀ grad, (r, out) ms | ÷ | and its copy to (out, r) ms | ÷ |")
    print("|---|---|---|---|---|---|")
    for n, out_f in [(64, 4096), (512, 576), (512, 1536), (1024, 1024), (1024, 2816)]:
        grad, h = randn(n, out_f), randn(n, RANK)
        torch.testing.assert_close(grad.t() @ h, (h.t() @ grad).t(), rtol=1e-4, atol=1e-3)
        cols = [median_ms(f) for f in (lambda: grad.t() @ h, lambda: h.t() @ grad,
                                       lambda: (h.t() @ grad).t().contiguous())]
        print(f"| {n}, {out_f} | {cols[0]:.3f} | {cols[1]:.3f} | {cols[1] / cols[0]:.2f} | {cols[2]:.3f} | {cols[2] / cols[0]:.2f} |")


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    DEVICE = torch.device(parser.parse_args().device)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, r {RANK}, float32")
    torch.manual_seed(0)
    layouts()
    print()
    stacking()
    print()
    b_gradient()


if __name__ == "__main__":
    main()
