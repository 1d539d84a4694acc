#!/usr/bin/env bash
# Speed comparisons of issue 8 on one GPU (results under $OUT): `bash benchmarks/gpu/speed_session.sh [part]`.
# part 1: 1B, peftlab (blocks compiled) beside HF PEFT, then the whole zoo eager (step time vs LoRA);
# part 2: the slow methods compiled, and the 8B shape with and without gradient checkpointing.
# Each step has its own time limit so that one slow step cannot take the others' results with it.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
bench() { timeout "$1" python3 -m peftlab.bench.speed "${@:2}" 2>&1 | grep -v "Warning\|WARNING\|====\|Native/Hybrid"; }
CORE=lora,dora,ia3,randlora,prompt,prefix
if [ "${1:-1}" = 1 ]; then
  ZOO=$(python3 -c "import peftlab; print(','.join(m for m in peftlab.methods() if m not in '$CORE'.split(',')))")
  bench 150 --shapes llama-3.2-1b --methods $CORE --compile --output "$OUT/speed-1b-compiled"
  bench 100 --shapes llama-3.2-1b --methods lora --impl peftlab --output "$OUT/speed-1b-eager"
  bench 240 --shapes llama-3.2-1b --methods "lora,$ZOO" --impl peftlab --warmup 2 --steps 5 --output "$OUT/speed-1b-zoo"
else
  bench 240 --shapes llama-3.2-1b --methods lora,dora,randlora,loldu,soka,wara,tlora,salt,diffora,svft,triadaptlora \
    --impl peftlab --compile --warmup 3 --steps 5 --output "$OUT/speed-1b-zoo-compiled"
  bench 150 --shapes llama-3.1-8b --methods lora --batch 4 --seq 2048 --checkpointing --compile --output "$OUT/speed-8b-ckpt"
  bench 150 --shapes llama-3.1-8b --methods lora --batch 4 --seq 2048 --compile --output "$OUT/speed-8b"
fi
