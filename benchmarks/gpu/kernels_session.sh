#!/usr/bin/env bash
# Check and time peftlab's Triton kernels on one GPU (results under $OUT): `BASE=<commit dir> bash benchmarks/gpu/kernels_session.sh`.
# 1. the kernels' tests on CUDA; 2. the kernel probe; 3. LoRA 1B beside PEFT; 4. with $BASE (a directory
# holding another commit's peftlab/), peftlab alone at both codes (benchmarks/gpu/ab_session.sh).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
ROOT=$PWD
quiet() { grep -v "Warning\|WARNING\|====\|^W[0-9]\{4\} \|_warn_once"; }
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=$ROOT timeout 120 python3 -m pytest tests/test_kernels.py -q -p no:randomly 2>&1 | tail -2
PYTHONPATH=$ROOT timeout 120 python3 benchmarks/gpu/kernels_probe.py 8192:16 2>&1 | quiet | tee "$OUT/kernels-probe.txt"
LORA="--shapes llama-3.2-1b --methods lora --compile --warmup 5 --steps 40"
PYTHONPATH=$ROOT timeout 150 python3 -m peftlab.bench.speed $LORA --output "$OUT/speed-1b" 2>&1 | grep '"tok_s"'
if [ -n "${BASE:-}" ]; then bash "$ROOT/benchmarks/gpu/ab_session.sh"; fi
