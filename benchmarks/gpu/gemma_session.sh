#!/usr/bin/env bash
# The Gemma 3 270M device call: assemble the carried GGUF, convert it once, then issue 9's decoder sweep
# (benchmarks/gpu/quality_decoder.sh, configured by its environment variables) and, unless MATH=0,
# issue 5's `peftlab train` + `peftlab eval` run (benchmarks/gpu/gemma_math.sh) side by side on the one
# GPU. Results go to /tmp/sweep; the merged results and a tarball of logs and shards are copied to $OUT.
#
#   bash benchmarks/gpu/gemma_session.sh             in the foreground: keep the sweep's budgets
#       (BUDGET_A + BUDGET_S + 2 x GRACE + ~60 s of start-up) inside the device call's limit, or nothing
#       of it comes back;
#   DETACH=1 bash benchmarks/gpu/gemma_session.sh    start the sweep detached and return: a sweep longer
#       than one device call then runs on while later calls (on the still-warm machine) run
#   WAIT=550 bash benchmarks/gpu/gemma_session.sh collect
#       which waits up to WAIT seconds for the sweep, printing its progress, then merges what has
#       finished and copies it to $OUT.
set -u
FINAL=$OUT
collect() {
  local deadline=$(( $(date +%s) + ${WAIT:-0} ))
  while [ ! -f /tmp/sweep/finished ] && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 30; echo "$(date +%T) finished runs: $(cat /tmp/sweep/logs/[AES]-*.log 2>/dev/null | grep -c '^decoder ')"
  done
  [ -f /tmp/sweep/finished ] && echo "sweep finished"
  PYTHONPATH=$PWD python3 -m peftlab.bench.quality --merge /tmp/sweep/shards/*.json \
    --output "/tmp/sweep/quality-decoder-${DATE:-$(date +%F)}" | tail -3
  tail -5 /tmp/sweep/logs/dmon-*.log 2>/dev/null
  cp /tmp/sweep/quality-decoder-* "$FINAL/" 2>/dev/null
  tar czf "$FINAL/gemma-logs.tgz" -C /tmp math sweep/logs sweep/shards sweep/session.log 2>/dev/null
  ls -la "$FINAL"
}
if [ "${1:-}" = collect ]; then collect; exit; fi

export PYTHONPATH=$PWD:$PWD/.carry/pysite PEFTLAB_CACHE=/tmp/peftlab-cache
mkdir -p /tmp/gemma && cat .carry/g*/gpart* > /tmp/gemma/gemma-3-270m-q4_k_m.gguf
export GEMMA_GGUF=/tmp/gemma/gemma-3-270m-q4_k_m.gguf DATA_DIR=$PWD/.carry/data
CONVERTED=$(python3 -c "from peftlab.models import resolve; print(resolve('$GEMMA_GGUF'))" | tail -1) || exit 1
# transformers 5.17 (the device image) reads this GGUF's tokenizer wrongly (455 tokens for a 287-token
# prompt elsewhere); the one converted by transformers 5.24 travels in .carry/tokz (xz) or .carry/tok.
[ -f .carry/tokz/tok.tar.xz ] && tar xJf .carry/tokz/tok.tar.xz -C .carry
[ -d .carry/tok ] && cp .carry/tok/* "$CONVERTED/" && echo "tokenizer from .carry/tok"
mkdir -p /tmp/math /tmp/sweep && rm -f /tmp/sweep/finished
[ "${MATH:-1}" = 1 ] && { OUT=/tmp/math setsid timeout 540 bash benchmarks/gpu/gemma_math.sh > /tmp/math/log 2>&1 & }
if [ "${DETACH:-0}" = 1 ]; then
  # setsid + nohup: the sweep outlives this call; `collect` finds its results in /tmp/sweep
  OUT=/tmp/sweep setsid nohup bash -c 'bash benchmarks/gpu/quality_decoder.sh; touch /tmp/sweep/finished' \
    > /tmp/sweep/session.log 2>&1 < /dev/null &
  sleep 20; tail -5 /tmp/sweep/session.log; exit 0
fi
OUT=/tmp/sweep bash benchmarks/gpu/quality_decoder.sh 2>&1 | tee /tmp/sweep/session.log | tail -60
touch /tmp/sweep/finished
wait
[ "${MATH:-1}" = 1 ] && tail -40 /tmp/math/log
collect
