#!/usr/bin/env bash
# The Gemma 3 270M device call: assemble the carried GGUF, convert it once, then issue 9's decoder sweep
# (benchmarks/gpu/quality_decoder.sh, configured by its environment variables) and, unless MATH=0,
# issue 5's `peftlab train` + `peftlab eval` run (benchmarks/gpu/gemma_math.sh) side by side on the one
# GPU. Only the merged results and a tarball of logs and shards come back in $OUT. Keep the sweep's
# budgets (BUDGET_A + BUDGET_B + 2 x GRACE + ~40 s of start-up) inside the device call's limit: a call
# cut off by the device tool returns nothing of this.
set -u
export PYTHONPATH=$PWD:$PWD/.carry/pysite PEFTLAB_CACHE=/tmp/peftlab-cache
mkdir -p /tmp/gemma && cat .carry/g*/gpart* > /tmp/gemma/gemma-3-270m-q4_k_m.gguf
export GEMMA_GGUF=/tmp/gemma/gemma-3-270m-q4_k_m.gguf DATA_DIR=$PWD/.carry/data
CONVERTED=$(python3 -c "from peftlab.models import resolve; print(resolve('$GEMMA_GGUF'))" | tail -1) || exit 1
# transformers 5.17 (the device image) reads this GGUF's tokenizer wrongly (455 tokens for a 287-token
# prompt elsewhere); the one converted by transformers 5.24 travels in .carry/tokz (xz) or .carry/tok.
[ -f .carry/tokz/tok.tar.xz ] && tar xJf .carry/tokz/tok.tar.xz -C .carry
[ -d .carry/tok ] && cp .carry/tok/* "$CONVERTED/" && echo "tokenizer from .carry/tok"
FINAL=$OUT; mkdir -p /tmp/math /tmp/sweep
[ "${MATH:-1}" = 1 ] && { OUT=/tmp/math timeout 540 bash benchmarks/gpu/gemma_math.sh > /tmp/math/log 2>&1 & }
OUT=/tmp/sweep bash benchmarks/gpu/quality_decoder.sh 2>&1 | tail -60
wait
[ "${MATH:-1}" = 1 ] && tail -40 /tmp/math/log
cp /tmp/sweep/quality-decoder-* "$FINAL/" 2>/dev/null
tar czf "$FINAL/gemma-logs.tgz" -C /tmp math sweep/logs sweep/shards 2>/dev/null
ls -la "$FINAL"
