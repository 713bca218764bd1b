#!/usr/bin/env bash
# RAG-Token beam search on a GPU (issue 28): this checkout's margin against an earlier one's, each
# against transformers and the floor in the same process, alternating checkouts over ROUNDS
# rounds, in one short run for a lent GPU machine. fp32, outputs compared token for token.
#
#   git archive REV src | (mkdir -p .old && tar -x -C .old)   # the earlier checkout, carried
#   OLD=.old/src bash benchmarks/gpu_beam.sh                  # on the GPU machine
#   DEVICE=cpu QUICK=1 OLD=.old/src bash benchmarks/gpu_beam.sh   # checks the script on a CPU
#
# Each process's section (Markdown) lands in $OUT as new-R.md / old-R.md, its log in new.log /
# old.log; the first round
# also profiles (torch.profiler: kernels by device time, synchronisations, launches).
# PY (default: the repo's .venv, else python3) must have torch with CUDA; wheels in $WHEELS
# (default .whl/: the transformers the tests use) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-/tmp/gpu_beam}
DEVICE=${DEVICE:-cuda}
OLD=${OLD:?set OLD to the earlier checkout\'s src/ folder}
ROUNDS=${ROUNDS:-2}
LIMIT=${LIMIT:-150}  # seconds per benchmark process
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
SITE=
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  SITE=/tmp/site
fi
export PYTHONUNBUFFERED=1
{
  command -v nvidia-smi >/dev/null \
    && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  PYTHONPATH="$PWD/src${SITE:+:$SITE}" "$PY" -c "import torch, transformers; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

if [[ -n "${QUICK:-}" ]]; then
  ARGS=(--batch 2 --k 2 --runs 1 --max-new-tokens 3)
else
  ARGS=(--batch 16 --k 5 10 --runs 7)
fi
failed=0
for round in $(seq 1 "$ROUNDS"); do
  for side in new old; do
    src=$PWD/src
    [[ $side == old ]] && src=$(cd "$OLD" && pwd)
    extra=()
    [[ $round == 1 ]] && extra=(--profile)
    start=$SECONDS
    PYTHONPATH="$src${SITE:+:$SITE}" timeout "$LIMIT" "$PY" -c \
      "import margin, sys; assert margin.__file__.startswith('$src'), margin.__file__" || exit 1
    PYTHONPATH="$src${SITE:+:$SITE}" timeout "$LIMIT" "$PY" benchmarks/decoding.py \
      --device "$DEVICE" --threads 4 "${ARGS[@]}" --sides token hf_tok floor_tok --no-latency \
      "${extra[@]}" >"$OUT/$side-$round.md" 2>>"$OUT/$side.log"
    rc=$?
    echo "== $side round $round: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
    [[ $rc == 0 ]] || failed=1
  done
done
grep -h "margin RAG-Token\|transformers .RagToken\|floor, RAG-Token\|RAG-Token:" "$OUT"/*.md
exit $failed
