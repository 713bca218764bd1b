#!/usr/bin/env bash
# The decoding and training benchmarks of issue 9 on a GPU (fp32, outputs compared token for
# token), in one short run for the device tool: prints both sections and copies them to $OUT.
#
#   bash benchmarks/gpu_decoding.sh            # full configuration: batch 16, k 5 and 10
#   QUICK=1 bash benchmarks/gpu_decoding.sh    # batch 4, k 5 (a first look)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
OUT=${OUT:-/tmp/gpu_decoding}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [[ -n "${QUICK:-}" ]]; then ARGS=(--batch 4 --k 5); else ARGS=(--batch 16 --k 5 10); fi
"$PY" decoding.py --device cuda --threads 4 "${ARGS[@]}" 2> >(tee "$OUT/decoding.log" >&2) \
  | tee "$OUT/decoding.md"
"$PY" training.py --device cuda --threads 4 2> >(tee "$OUT/training.log" >&2) \
  | tee "$OUT/training.md"
