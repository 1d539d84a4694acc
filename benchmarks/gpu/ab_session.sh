#!/usr/bin/env bash
# peftlab's training speed at two codes on one GPU, alternating processes (results under $OUT):
#   BASE=<dir holding another commit's peftlab/, e.g. from `git archive`> [METHODS=lora,loca] [ROUNDS=2] \
#     bash benchmarks/gpu/ab_session.sh
# Each code runs from its own directory (so its peftlab/ is the one imported) with its own inductor cache:
# with one shared cache, the older code loads the newer code's compiled graphs (2026-12-07: a missing operator).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
ROOT=$PWD
ARGS="--shapes llama-3.2-1b --methods ${METHODS:-lora} --impl peftlab --compile --warmup 5 --steps 25"
rates() { grep -o '"method": "[a-z0-9_]*"\|"tok_s": [0-9.]*\|"step_ratio_vs_lora": [0-9.]*\|"note": "[^"]\+"' | paste -sd' '; }
for round in $(seq "${ROUNDS:-2}"); do
  echo "base $round: $(cd "$BASE" && PYTHONPATH=$BASE TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-base timeout 240 \
    python3 -m peftlab.bench.speed $ARGS --output "$OUT/ab-base-$round" 2>&1 | rates)"
  echo "current $round: $(PYTHONPATH=$ROOT TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-current timeout 240 \
    python3 -m peftlab.bench.speed $ARGS --output "$OUT/ab-current-$round" 2>&1 | rates)"
done
