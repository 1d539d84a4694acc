#!/usr/bin/env bash
# One device call: environment, then the speed comparisons of issue 8 (results under $OUT).
# Each step has its own time limit so that one slow step cannot take the others' results with it.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
bench() { timeout "$1" python3 -m peftlab.bench.speed "${@:2}" 2>&1 | grep -v Warning; }
ZOO=$(python3 -c "import peftlab; print(','.join(m for m in peftlab.methods() if m not in {'lora','dora','ia3','randlora','prompt','prefix'}))")
bench 150 --shapes llama-3.2-1b --methods lora,dora,ia3,randlora,prompt,prefix --output "$OUT/speed-1b"
bench 200 --shapes llama-3.2-1b --methods "lora,$ZOO" --impl peftlab --warmup 2 --steps 5 --output "$OUT/speed-1b-zoo"
bench 120 --shapes llama-3.1-8b --methods lora --batch 4 --seq 2048 --checkpointing --output "$OUT/speed-8b-ckpt"
bench 90 --shapes llama-3.1-8b --methods lora --impl peftlab --batch 4 --seq 2048 --output "$OUT/speed-8b"
