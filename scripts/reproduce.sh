#!/usr/bin/env bash
# Reproduces the sequence-length sweep and the five claims (experiments/claims.py).
#
#   scripts/reproduce.sh                 # CPU scale into results/cpu (see README Results)
#   scripts/reproduce.sh --full          # accelerator scale into results/full
#   scripts/reproduce.sh --smoke         # seconds: every code path, into /tmp/reproduce_smoke
#   OUT=/some/dir scripts/reproduce.sh   # another output folder
#
# Every step resumes: finished sweep points and training runs are skipped on a re-run.
# Training runs (claims 4-5) keep checkpoints under $OUT/train (large: not for git) unless
# TRAIN_DIR points elsewhere. Claims 4-5 at CPU scale take far longer than claims 1-3 on a
# 2-core machine; CLAIMS=forward,gradient,threshold limits what runs.
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

SWEEP_ARG=
case "$PRESET" in
  full) SWEEP_ARG=:preset=gpu ;;
  smoke) SWEEP_ARG=:smoke ;;
esac
"$PYTHON" -m experiments.sweep --config="configs/sweep.py$SWEEP_ARG" --workdir="$OUT/sweep"

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
done
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
