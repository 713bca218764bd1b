#!/usr/bin/env bash
# `make finetune`'s recipe on a lent GPU with a larger budget, then the held-out evaluation there
# (issue "Answer quality": "if a GPU is lent, run the same recipe there with a larger budget and
# report it separately").
#
# A device call carries at most 64 MiB, and what the run needs comes to about 235 MB: the default
# assets (generator GGUF, encoder, corpus), the development data, and the wheels the GPU image
# lacks (.whl/: faiss-cpu, gguf, regex, and the transformers, peft and sentence-transformers these
# tests use). So it travels in parts, over calls to the same warm machine:
#
#   bash benchmarks/gpu_finetune.sh pack       # here: .gpu1/ ... .gpuN/, each under the limit
#   bash benchmarks/gpu_finetune.sh stage 1    # there, carrying .whl and .gpu1: wheels into
#                                              # /tmp/site, then tests/test_train.py on the GPU
#   bash benchmarks/gpu_finetune.sh stage N    # there, carrying .gpuN (N = 2 ... the last but one)
#   bash benchmarks/gpu_finetune.sh run N      # there, carrying the last part, .gpuN
#
# `run` puts the parts together and runs benchmarks/finetuned.py: `finetune --k 5 --epochs 1` (one
# pass over every training question with a gold answer in its top 5, k = 5 as in the evaluation),
# then `eval --device cuda --write` for the fine-tuned and the default model. Each phase has a time
# limit, and what finished lands in $OUT: the section (section.md), the logs, the timing, and the
# predictions (predictions.tar.gz) to check the section against.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STAGE=${STAGE:-/tmp/stage}
OUT=${OUT:-/tmp/gpu_finetune}
LIMIT_BYTES=${LIMIT_BYTES:-67108864}  # what one call may carry: 64 MiB
SLACK=${SLACK:-2000000}  # the tracked files (about 1 MB) and some room
DATA_DIR=${DATA_DIR:-../shared/data}
SITE=${SITE:-/tmp/site}  # where the carried wheels are installed
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu N=3 LIMIT=40 checks the script on a CPU

pack() {  # here: the assets and data as one tar, split into parts that fit beside .whl
  local vpy=${VPY:-.venv/bin/python} tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  "$vpy" - "$tmp/root" <<'EOF' || return 1
import shutil, sys
from pathlib import Path
from margin.assets import DEFAULT_CORPUS, DEFAULT_ENCODER, DEFAULT_GENERATOR_GGUF
root = Path(sys.argv[1])
for asset in (DEFAULT_GENERATOR_GGUF, DEFAULT_ENCODER, DEFAULT_CORPUS):
    src, pkg = asset.path(), root / "assets" / asset.package
    dst = pkg / asset.relpath
    dst.parent.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")  # a regular package: found before any installed one
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
EOF
  mkdir -p "$tmp/root/data"
  cp "$DATA_DIR/nq-open-dev.tsv" "$DATA_DIR/triviaqa-dev.tsv" "$tmp/root/data/" || return 1
  tar -C "$tmp/root" -cf "$tmp/all.tar" assets data || return 1
  local wheels first rest
  wheels=$(cat .whl/*.whl | wc -c)
  first=$((LIMIT_BYTES - SLACK - wheels))
  rest=$((LIMIT_BYTES - SLACK))
  rm -rf .gpu[0-9]*
  mkdir -p .gpu1
  head -c "$first" "$tmp/all.tar" >.gpu1/part.01
  tail -c +"$((first + 1))" "$tmp/all.tar" | split -b "$rest" -d -a 2 --numeric-suffixes=2 \
    - "$tmp/part."
  for f in "$tmp"/part.*; do
    local n=$((10#${f##*.}))
    mkdir -p ".gpu$n" && mv "$f" ".gpu$n/"
  done
  sha256sum "$tmp/all.tar" | cut -d' ' -f1 >.gpu1/all.sha256
  du -b .whl .gpu[0-9]*
}

stage() {  # there: keep this call's part (the machine keeps /tmp while it is warm)
  local n=$1
  mkdir -p "$STAGE" && cp ".gpu$n"/* "$STAGE/" || return 1
  if [[ $n == 1 && -z ${NO_WHEELS:-} ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    PYTHONPATH="$PWD/src:$SITE" "$PY" -c "import torch, transformers, peft, faiss; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', \
transformers.__version__, 'peft', peft.__version__)" || return 1
    # the training tests' tiny models train on the GPU: train() takes CUDA when it is there
    PYTHONPATH="$PWD/src:$SITE" timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider \
      tests/test_train.py 2>&1 | tail -5
    return "${PIPESTATUS[0]}"
  fi
  ls -l "$STAGE"
}

run() {  # there: put the parts together, fine-tune, evaluate; each phase under a time limit
  local n=$1 start=$SECONDS
  stage "$n" || return 1
  mkdir -p "$OUT"
  cat "$STAGE"/part.* >"$STAGE/all.tar"
  if [[ $(sha256sum "$STAGE/all.tar" | cut -d' ' -f1) != $(cat "$STAGE/all.sha256") ]]; then
    echo "the parts put together do not match the packed tar: a part is missing" >&2
    return 1
  fi
  tar -C "$STAGE" -xf "$STAGE/all.tar" && rm "$STAGE/all.tar" "$STAGE"/part.*
  export PYTHONPATH="$PWD/src:$STAGE/assets:$SITE" PYTHONUNBUFFERED=1
  export MARGIN_HOME=${MARGIN_HOME:-/tmp/mh} TOKENIZERS_PARALLELISM=false
  local bench=(benchmarks/finetuned.py --data-dir "$STAGE/data" --out /tmp/ft-gpu
               --zero-shot-out /tmp/zs-gpu)
  timeout "${PREPARE_LIMIT:-90}" "$PY" "${bench[0]}" prepare "${bench[@]:1}" --device "$DEVICE" \
    >"$OUT/prepare.log" 2>&1
  echo "== prepare: exit $? after $((SECONDS - start)) s"
  tail -2 "$OUT/prepare.log"
  timeout "${FINETUNE_LIMIT:-300}" "$PY" "${bench[0]}" finetune "${bench[@]:1}" \
    --k "${K:-5}" --epochs "${EPOCHS:-1}" ${LIMIT:+--limit "$LIMIT"} >"$OUT/finetune.log" 2>&1
  echo "== finetune: exit $? after $((SECONDS - start)) s"
  tail -3 "$OUT/finetune.log"
  cp /tmp/ft-gpu/finetune.json "$OUT/" 2>/dev/null
  tail -c 4000 "$MARGIN_HOME/runs/finetuned/log.jsonl" >"$OUT/train-log-tail.jsonl" 2>/dev/null
  if [[ ! -e $MARGIN_HOME/models/finetuned && -e $MARGIN_HOME/runs/finetuned/last ]]; then
    cp -r "$MARGIN_HOME/runs/finetuned/last" "$MARGIN_HOME/models/finetuned"
    echo "== out of time: installed the fine-tune's last checkpoint (train-log-tail.jsonl: its step)"
  fi
  timeout "${EVAL_LIMIT:-200}" "$PY" "${bench[0]}" eval "${bench[@]:1}" --device "$DEVICE" \
    --batch-size "${BATCH:-32}" --threads 8 --n "${N:-500}" --write \
    --section-out "$OUT/section.md" >"$OUT/eval.log" 2>&1
  echo "== eval: exit $? after $((SECONDS - start)) s"
  tail -8 "$OUT/eval.log"
  (cd /tmp && find ft-gpu zs-gpu \( -name predictions.jsonl -o -name metrics.json \) -print0 \
    | tar --null -czf "$OUT/predictions.tar.gz" -T -)
  echo "== done after $((SECONDS - start)) s"
}

case "${1:-}" in
  pack) pack ;;
  stage) stage "${2:?give the part number}" ;;
  run) run "${2:?give the last part number}" ;;
  *) echo "usage: $0 pack | stage N | run N" >&2; exit 2 ;;
esac
