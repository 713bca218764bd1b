#!/usr/bin/env bash
# The decoding and training benchmarks of issue 9 on a GPU (fp32, outputs compared token for
# token), in one short run for a lent GPU machine. Each benchmark runs in its own process under a
# time limit, so one that fails or overruns still leaves the others' sections; each section
# (Markdown) and log lands in $OUT.
#
#   bash benchmarks/gpu_decoding.sh                 # batch 16, k 5 and 10, batch-1 latency
#   QUICK=1 bash benchmarks/gpu_decoding.sh         # batch 2, k 2, 3 new tokens: a smoke test
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_decoding.sh   # the same on a CPU (checks the script)
#
# PY (default: the repo's .venv, else python3) must have torch with CUDA; margin runs from src/.
# Wheels in $WHEELS (default .whl/: e.g. the transformers and faiss-cpu the tests use, fetched
# with `pip download --no-deps`) are installed into /tmp/site first, for machines with no index.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-/tmp/gpu_decoding}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-200}  # seconds per benchmark process
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  command -v nvidia-smi >/dev/null \
    && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, margin; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

failed=0
bench() {  # bench NAME SCRIPT ARGS...: $OUT/NAME.md (the section) and $OUT/NAME.log
  local name=$1 script=$2 start=$SECONDS rc
  shift 2
  timeout "$LIMIT" "$PY" "benchmarks/$script" --device "$DEVICE" --threads 4 "$@" \
    >"$OUT/$name.md" 2> >(tee "$OUT/$name.log" >&2)
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
  [[ $rc == 0 ]] || failed=1
}

if [[ -n "${QUICK:-}" ]]; then
  bench decoding-quick decoding.py --batch 2 --k 2 --runs 1 --max-new-tokens 3 --hf-seq-batch 1
  bench training-quick training.py --batch 2 --k 2 --runs 1
else
  bench decoding decoding.py --batch 16 --k 5 10 --runs 7 --profile
  bench training training.py --runs 7
fi
cat "$OUT"/*.md
exit $failed
