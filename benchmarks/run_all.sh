#!/usr/bin/env bash
# Every table of docs/performance.md, in the order they appear there; output in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name: $*"; "$PY" benchmarks/bench_layers.py "$@" 2>&1 | grep -v "USDT\|Warning\|warn(\|Loading weights" | tee "$OUT/$name.md"; }
# What a GPU would launch per adapted layer (exact counts, device-independent; compiling the
# counted graphs takes a few minutes here).
"$PY" benchmarks/count_ops.py --compiled 2>&1 | grep -v "USDT\|Warning\|warn(" | tee "$OUT/ops.md"
if [ "${1:-}" != "--skip-models" ]; then
  run fp32-models    --workload llama --workload minilm --peft --repeats 9
fi
# SmolLM2-135M-Instruct (converted once from its GGUF file): 150 small adapted layers.
run smollm2          --workload smollm2 --peft --repeats 5
run fp32-layer       --workload layer64 --workload layer512 --workload layer4096 --workload accum --peft --repeats 9
run dropout          --workload llama --dropout 0.05 --peft --repeats 3
# bf16 on a CPU without native bf16 matmuls is slow in backward (a bf16 grad_y @ W0 of the
# 4096² layer at 64 tokens takes ≈8 s here): training steps for the small workload only, eval
# forward and saved-for-backward for the models.
run bf16             --workload layer64 --dtype bf16 --peft --repeats 3
run bf16-models      --workload llama --workload minilm --dtype bf16 --peft --no-step --repeats 3
run compiled         --workload layer64 --workload layer512 --workload accum --compile --no-memory --repeats 9
# What DoRA's step adds to LoRA's, part by part, inside whole-model steps.
"$PY" benchmarks/probe_dora_extra.py --workload smollm2 --workload llama --repeats 11 2>&1 | grep -v "USDT\|Warning\|warn(\|Loading weights" | tee "$OUT/dora-extra.md"
"$PY" benchmarks/profile_step.py --tokens 64 512 --repeats 5 2>&1 | grep -v USDT | tee "$OUT/profile.md"
"$PY" benchmarks/profile_step.py --workload minilm --rounds 4 --top 12 2>&1 | grep -v "USDT\|Loading weights" | tee "$OUT/profile-minilm.md"
# SmolLM2: the whole step by operator, then one layer call of each shape (the fixed cost per layer).
{ "$PY" benchmarks/profile_step.py --workload smollm2 --rounds 3 --top 15
  "$PY" benchmarks/bench_layer_call.py --rounds 9 --calls 200 --profile; } 2>&1 | grep -v "USDT\|Loading weights" | tee "$OUT/profile-smollm2.md"
