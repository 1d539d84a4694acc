#!/usr/bin/env bash
# Speed comparisons of issue 8 on one GPU (results under $OUT): `bash benchmarks/gpu/speed_session.sh A|B`.
# A: LoRA on the 8B shape, both gradient-checkpointed (then peftlab alone under each of BUDGETS, if set);
#    peftlab (transformer blocks compiled) beside HF PEFT (eager, its usual recipe) on the 1B shape
#    (METHODS_1B: a comma list, default lora,dora,ia3);
# B: the whole zoo on the 1B shape, step time relative to LoRA, eager;
# C: the same with the transformer blocks compiled (METHODS: a comma list, LoRA first; default all).
# GRAPHS=1: peftlab's compiled blocks replay as CUDA graphs (A's 1B run and C).
# Each step has its own time limit so that one slow step cannot take the others' results with it.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
bench() { timeout "$1" python3 -m peftlab.bench.speed "${@:2}" 2>&1 | grep -v "Warning\|WARNING\|====\|Native/Hybrid\|^W[0-9]\{4\} " | tee -a "$OUT/speed-session.log"; }
if [ "${1:-A}" = A ]; then
  bench 170 --shapes llama-3.1-8b --methods lora --batch 4 --seq 2048 --checkpointing --compile --output "$OUT/speed-8b-ckpt"
  for budget in ${BUDGETS-}; do  # peftlab alone (PEFT without checkpointing runs out of memory here)
    bench 110 --shapes llama-3.1-8b --methods lora --batch 4 --seq 2048 --compile --activation-budget "$budget" \
      --impl peftlab --output "$OUT/speed-8b-budget-$budget"
  done
  bench 170 --shapes llama-3.2-1b --methods "${METHODS_1B:-lora,dora,ia3}" --compile ${GRAPHS:+--cuda-graphs} \
    --output "$OUT/speed-1b"
else
  ALL=$(python3 -c "import peftlab; print(','.join(['lora'] + [m for m in peftlab.methods() if m != 'lora']))")
  if [ "$1" = B ]; then
    bench 280 --shapes llama-3.2-1b --methods "${METHODS:-$ALL}" --impl peftlab --warmup 2 --steps 5 \
      --output "$OUT/speed-1b-zoo"
  else
    bench "${LIMIT:-560}" --shapes llama-3.2-1b --methods "${METHODS:-$ALL}" --impl peftlab --compile \
      ${GRAPHS:+--cuda-graphs} --warmup 2 --steps 4 --output "$OUT/speed-1b-zoo-compiled${PART:-}"
  fi
fi
