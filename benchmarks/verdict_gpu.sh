#!/usr/bin/env bash
# All five verdict experiments (benchmarks/verdict.py) on one GPU, as independent pipelines in
# parallel processes: a 135M model leaves a large GPU mostly idle, each process being bound by
# its own kernel launches, so seeds and experiments run side by side. The order is the issue's:
#   1. tokens (3 seeds) beside damage and steps, which need no choice;
#   2. tokens on the dev split (the same stages: evaluation only), then `--best auto`;
#   3. kd, structured and sweep (which carry the choice), side by side.
# Rows land in $ARCHIVE_ROOT (default benchmarks/results/verdict-gpu), one archive per
# pruning scheme, as on the CPU; a rerun resumes from them. QUICK=1: the smoke configuration
# (tiny pool, minutes on a CPU), to check this script itself.
#   bash benchmarks/verdict_gpu.sh            WORK=/tmp/verdict THREADS=2 EMB=DIR (optional)
# EMB: a folder of cached embeddings of the pool (select/embed.py's store), copied into each
# pipeline's cache so that no process loads the sentence encoder.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${ARCHIVE_ROOT:-benchmarks/results/verdict-gpu}
WORK=${WORK:-/tmp/verdict}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=${THREADS:-2} PYTHONUNBUFFERED=1
Q=(); [ -n "${QUICK:-}" ] && Q=(--quick)
mkdir -p "$WORK/logs"

# run NAME OUT ARGS...: one verdict.py process, its log in $WORK/logs/NAME.log
run() {
  local name=$1 out=$2; shift 2
  if [ -n "${EMB:-}" ] && [ -z "${QUICK:-}" ]; then
    # -n: vectors already there stay (the warning that newer cp prints about -n is not an error)
    for scheme in wanda50 structured25; do mkdir -p "$out/$scheme/cache" && cp -rn "$EMB"/. "$out/$scheme/cache/" 2>/dev/null; done
  fi
  local t0=$SECONDS
  "$PY" benchmarks/verdict.py --archive-root "$ROOT" --out "$out" "${Q[@]}" "$@" >"$WORK/logs/$name.log" 2>&1
  echo "verdict_gpu: $name rc=$? $((SECONDS - t0)) s ($(date -u +%H:%M:%S))"
}

echo "verdict_gpu: start $(date -u +%FT%TZ); archive $ROOT"
# The embedded model is converted once here, not by five processes at once.
"$PY" -c "from paser.io.models import materialise_embedded as m; print('dense model:', m('smollm2-135m'))" || exit 1
pids=()
for s in 0 1 2; do run "tokens-s$s" "$WORK/t$s" --experiment tokens --seeds "$s" & pids+=($!); done
run damage "$WORK/damage" --experiment damage &
run steps "$WORK/steps" --experiment steps &
wait "${pids[@]}"

pids=()
for s in 0 1 2; do run "tokens-dev-s$s" "$WORK/t$s" --experiment tokens --split dev --seeds "$s" & pids+=($!); done
wait "${pids[@]}"
"$PY" benchmarks/verdict.py --archive-root "$ROOT" --out "$WORK/t0" "${Q[@]}" --experiment tokens --split dev --summary \
  >"$WORK/logs/tokens-dev-summary.log" 2>&1

for s in 0 1 2; do run "kd-s$s" "$WORK/t$s" --experiment kd --best auto --seeds "$s" & done
for s in 0 1 2; do run "structured-s$s" "$WORK/st$s" --experiment structured --best auto --seeds "$s" & done
for s in 0 1; do run "sweep-s$s" "$WORK/sw$s" --experiment sweep --best auto --seeds "$s" & done
wait
echo "verdict_gpu: done $(date -u +%FT%TZ)"
