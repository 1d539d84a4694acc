#!/usr/bin/env bash
# Decoder track of `peftlab bench quality` (issue 9) on one GPU: Gemma 3 270M trained on train_math_3k,
# scored on the seven held-out math sets, every method through peftlab and, where it has them, HF PEFT.
#
#   DATA_DIR=/path/to/data GEMMA_GGUF=/path/to/gemma-3-270m-q4_k_m.gguf OUT=/path/to/out \
#     bash benchmarks/gpu/quality_decoder.sh
#
# DATA_DIR holds train_math_3k.json and heldout_<set>.json, flat or under math/. Everything is written
# under $OUT: shards/ (one JSON per process and phase), logs/, and the merged
# quality-decoder-<date>.{json,md,png}, rewritten after each phase.
#
# A 270M model leaves the GPU mostly idle (small kernels, launch-bound), so WORKERS processes run jobs
# side by side; they share one job list through claim files, and each process starts no job it could
# not finish within its phase's time budget (jobs in flight finish; `timeout` stops a phase at
# budget + GRACE seconds, and every finished run is already on disk). MPS=1 runs them under CUDA MPS,
# so their kernels run concurrently instead of taking turns on the GPU.
#   A  every method at the rates LRS names, seed SEED, plus the base model: LRS=centre gives one run per
#      method, LRS=grid (the default) the whole lr search, centre rates first;
#   E  one rate beyond the grid (--lrs extend) for the pairs whose best rate after A is at its edge;
#   S  the TOP best (method, impl) pairs after A (and E), at their best rate, with seed(s) SEED2 (two
#      seeds for the top methods).
# Each phase leaves out the runs that already succeeded in $OUT/shards (and PRIOR, an earlier sweep's
# results), so a sweep cut off by a device call's limit is taken up by running the script again.
#
# Time, measured on an H100 (2026-11-25, 7 workers without MPS, evaluation batches of 256): a job took
# 90-250 s (training 40-130 s for 204 steps, evaluation 30-90 s), about 20 s of GPU per job overall.
set -u
: "${DATA_DIR:?set DATA_DIR to the folder with train_math_3k.json and heldout_*.json}"
: "${GEMMA_GGUF:?set GEMMA_GGUF to the Gemma 3 270M GGUF file}"
OUT=${OUT:-/tmp/out}
WORKERS=${WORKERS:-7}            # ~8-10 GiB each at most (soka 14); 7 fit an 80 GB H100
METHODS=${METHODS:-all}          # comma list (base = the untrained model) or all
IMPL=${IMPL:-peftlab,peft}
LRS=${LRS:-grid}                 # phase A: grid | centre | others | comma list of rates
EPOCHS=${EPOCHS:-1}
LIMIT=${LIMIT:-100}              # evaluation records per held-out set
TRAIN_LIMIT=${TRAIN_LIMIT:-}     # first N training records (empty: all 3,260); for a quick check of the script
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-200}
EVAL_BATCH=${EVAL_BATCH:-256}
BATCH=${BATCH:-16}
CUTOFF=${CUTOFF:-256}
SEED=${SEED:-42}
SEED2=${SEED2:-43}
TOP=${TOP:-4}                    # phase S: how many of the best pairs get a second seed
BUDGET_A=${BUDGET_A:-1200}
BUDGET_E=${BUDGET_E:-420}
BUDGET_S=${BUDGET_S:-240}
GRACE=${GRACE:-60}
PRIOR=${PRIOR:-}                 # a results JSON of an earlier, interrupted sweep: its runs are not redone
PHASES=${PHASES:-A,E,S}          # any of A, E, S, in that order
MPS=${MPS:-0}
DATE=${DATE:-$(date +%F)}
PY=${PYTHON:-python3}

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PEFTLAB_CACHE=${PEFTLAB_CACHE:-/tmp/peftlab-cache}  # the converted GGUF (~1 GB) stays out of $OUT
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / WORKERS > 0 ? CORES / WORKERS : 1 ))}
mkdir -p "$OUT/shards" "$OUT/logs"
START=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - START ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers as t, peft; print('torch', torch.__version__, t.__version__, peft.__version__)"
# Convert the GGUF once before the workers start (they would race on the cache); cached for later runs.
$PY -c "from peftlab.models import resolve; print('model', resolve('$GEMMA_GGUF'))" || exit 1
elapsed "model ready"

COMMON=(--track decoder --model "$GEMMA_GGUF" --data-dir "$DATA_DIR" --epochs "$EPOCHS" --limit "$LIMIT"
        --max-new-tokens "$MAX_NEW_TOKENS" --eval-batch-size "$EVAL_BATCH" --batch-size "$BATCH"
        --micro-batch-size "$BATCH" --cutoff-len "$CUTOFF" --impl "$IMPL" --no-report
        ${TRAIN_LIMIT:+--train-limit "$TRAIN_LIMIT"})
MERGED="$OUT/quality-decoder-$DATE"

if [ -n "$PRIOR" ]; then cp "$PRIOR" "$OUT/shards/prior.json" || exit 1; fi
# phases E and S read the best rates so far from the merged report
compgen -G "$OUT/shards/*.json" > /dev/null && $PY -m peftlab.bench.quality --merge "$OUT"/shards/*.json --output "$MERGED" | tail -1
if [ "$MPS" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT && elapsed "MPS on"
fi
nvidia-smi dmon -s um -d 10 > "$OUT/logs/dmon-$START.log" 2>&1 &
DMON=$!

phase() {  # phase NAME BUDGET ARGS...: WORKERS processes over one job list, then the merged report
  local name=$1 budget=$2 i done=() workers=()
  shift 2
  compgen -G "$OUT/shards/*.json" > /dev/null && done=(--skip-done "$OUT"/shards/*.json)
  for i in $(seq 1 "$WORKERS"); do
    timeout -k 20 $(( budget + GRACE )) $PY -m peftlab.bench.quality "${COMMON[@]}" "$@" "${done[@]}" \
      --claim-dir "$OUT/claims-$name-$START" --time-budget "$budget" --output "$OUT/shards/$name-$START-$i" \
      > "$OUT/logs/$name-$START-$i.log" 2>&1 &
    workers+=($!)
    sleep 2  # staggered starts: model loading and tokenisation do not all hit the disk at once
  done
  wait "${workers[@]}"
  grep -h "^decoder " "$OUT"/logs/"$name-$START"-*.log | sort
  grep -h "Error\|Traceback" "$OUT"/logs/"$name-$START"-*.log | sort | uniq -c | head -20
  $PY -m peftlab.bench.quality --merge "$OUT"/shards/*.json --output "$MERGED" | tail -3
  elapsed "phase $name done"
}

[[ ",$PHASES," == *,A,* ]] && phase A "$BUDGET_A" --methods "$METHODS" --lrs "$LRS" --seeds "$SEED"
if [[ ",$PHASES," == *,E,* ]] && [ -f "$MERGED.json" ]; then
  phase E "$BUDGET_E" --methods "$METHODS" --best-from "$MERGED.json" --lrs extend --seeds "$SEED"
fi
if [[ ",$PHASES," == *,S,* ]] && [ "$TOP" -gt 0 ] && [ -f "$MERGED.json" ]; then
  phase S "$BUDGET_S" --methods "$METHODS" --best-from "$MERGED.json" --top "$TOP" --lrs best --seeds "$SEED2"
fi
kill "$DMON" 2>/dev/null
cat "$MERGED.md" 2>/dev/null | head -70
