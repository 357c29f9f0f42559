#!/usr/bin/env bash
# Every table of docs/performance.md, in the order they appear there; output in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name: $*"; "$PY" benchmarks/bench_layers.py "$@" 2>&1 | grep -v "USDT\|Warning\|warn(" | tee "$OUT/$name.md"; }
run fp32-models      --workload llama --workload minilm --peft
run fp32-layer       --workload layer64 --workload layer512 --workload layer4096 --workload accum --peft
run dropout          --workload llama --workload layer512 --dropout 0.05 --peft
run bf16             --workload llama --workload layer512 --dtype bf16 --peft --repeats 3
run compiled         --workload layer512 --workload minilm --compile --no-memory
"$PY" benchmarks/profile_step.py --tokens 64 512 2>&1 | grep -v USDT | tee "$OUT/profile.md"
