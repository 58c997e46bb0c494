#!/usr/bin/env bash
# Reproduces the sequence-length sweep and the five claims (experiments/claims.py).
#
#   scripts/reproduce.sh                 # CPU scale into results/cpu (see README Results)
#   scripts/reproduce.sh --full          # accelerator scale into results/full
#   scripts/reproduce.sh --smoke         # seconds: every code path, into /tmp/reproduce_smoke
#   OUT=/some/dir scripts/reproduce.sh   # another output folder
#
# Every step resumes: finished sweep points and training runs are skipped on a re-run.
# Training runs (claims 4-5) keep checkpoints under $TRAIN_DIR (large: not for git).
# CLAIMS=forward,gradient,threshold limits what runs. At CPU scale the sweep stops at n = 4096
# (claims 1-2 are the longer CPU sweeps); everything took 59.5 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=cpu
case "${1:-}" in
  --full) PRESET=full ;;
  --smoke) PRESET=smoke ;;
  "") ;;
  *) echo "usage: $0 [--full|--smoke]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python}
DEFAULT_OUT=results/$PRESET
[ "$PRESET" = smoke ] && DEFAULT_OUT=/tmp/reproduce_smoke
OUT=${OUT:-$DEFAULT_OUT}
TRAIN_DIR=${TRAIN_DIR:-/tmp/tensorattn_claims_$PRESET}
CLAIMS=${CLAIMS:-forward,gradient,threshold,expressivity,bounded}
mkdir -p "$OUT"

START=$(date +%s)
SWEEP_ARGS=(--config.lengths=128,256,512,1024,2048,4096 --config.time_budget_s=30)
case "$PRESET" in
  full) SWEEP_ARGS=(--config=configs/sweep.py:preset=gpu) ;;
  smoke) SWEEP_ARGS=(--config=configs/sweep.py:smoke) ;;
  cpu) SWEEP_ARGS=(--config=configs/sweep.py "${SWEEP_ARGS[@]}") ;;
esac
"$PYTHON" -m experiments.sweep "${SWEEP_ARGS[@]}" --workdir="$OUT/sweep"
echo "sweep done after $(( $(date +%s) - START )) s"

for claim in ${CLAIMS//,/ }; do
  case "$claim" in
    expressivity|bounded) dir=$TRAIN_DIR ;;
    *) dir=$OUT ;;
  esac
  "$PYTHON" -m experiments.claims --claim="$claim" --preset="$PRESET" --workdir="$dir"
  if [ "$dir" != "$OUT" ]; then  # tables, plots and rows to $OUT; checkpoints stay behind
    cp "$dir"/claim*_"$claim".{jsonl,md,png} "$OUT"/ 2>/dev/null || true
    tail -n 1 "$dir/claims.jsonl" >> "$OUT/claims.jsonl"
  fi
  echo "claim $claim done after $(( $(date +%s) - START )) s"
done
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
