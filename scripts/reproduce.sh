#!/usr/bin/env bash
# Reproduces the sequence-length sweep and the five claims (experiments/claims.py), in steps.
#
#   scripts/reproduce.sh                 # CPU scale into runs/reproduce_cpu (README Results)
#   scripts/reproduce.sh --full          # accelerator scale into runs/reproduce_full
#   scripts/reproduce.sh --smoke         # seconds: every code path, into /tmp/reproduce_smoke
#   scripts/reproduce.sh --full --list   # the steps, one per line
#   scripts/reproduce.sh --full --step=sweep-exact-fwd,claim1-forward   # only these steps
#   OUT=/some/dir scripts/reproduce.sh   # another output folder
#
# The default output folders are this machine's own (runs/ is not in git), so a run measures
# this machine. The committed results are other folders, finished (results/cpu, with its step
# markers) or resumed across GPU sessions (results/full): `OUT=results/cpu` or
# `OUT=results/full` continues those, and their finished steps are skipped.
#
# Budgets: configs/sweep.py (preset cpu|gpu|smoke) and configs/claims.py (preset
# cpu|full|smoke). Each step prints its elapsed time and, once finished, leaves
# $OUT/.steps/NAME.done: a re-run skips finished steps (FORCE=1 re-runs them), and inside a
# step finished sweep points and training runs are skipped too, so a killed step resumes.
# `--full` steps each take under about ten minutes on one GPU: the sweep and claims 1-2 run
# one (implementation, pass) series per step, claim 4 one (task, seed) and claim 5 one seed
# per step (claim 4's 6x6 grids train 4000 steps per run); the last step of each group only
# gathers (plot, table). Training runs (claims 4-5) keep checkpoints
# under $TRAIN_DIR (large: not for git) and their finished runs' rows in $OUT too, so that
# $OUT alone resumes the steps on another machine. CLAIMS=forward,gradient,threshold limits
# the claims. A step whose command fails (exits non-zero, e.g. a sweep point or a training
# run that ended in "error") is not marked done: the script stops there, exits non-zero and
# names it. An unknown --step name or CLAIMS entry exits before any work, listing the valid
# ones. PYTHON defaults to .venv/bin/python when it exists (the README's quickstart), else
# python3.
# At CPU scale the sweep stops at n = 4096 (claims 1-2 are the longer CPU sweeps); everything
# took about an hour on a 2-core CPU (65 min on 2026-12-07, README Results).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=cpu
LIST=""
ONLY=""
for arg in "$@"; do
  case "$arg" in
    --full) PRESET=full ;;
    --smoke) PRESET=smoke ;;
    --list) LIST=1 ;;
    --step=*) ONLY=${arg#--step=} ;;
    *) echo "usage: $0 [--full|--smoke] [--list] [--step=NAME[,NAME...]]" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
DEFAULT_OUT=runs/reproduce_$PRESET
[ "$PRESET" = smoke ] && DEFAULT_OUT=/tmp/reproduce_smoke
OUT=${OUT:-$DEFAULT_OUT}
TRAIN_DIR=${TRAIN_DIR:-/tmp/tensorattn_claims_$PRESET}
ALL_CLAIMS=forward,gradient,threshold,expressivity,bounded
CLAIMS=${CLAIMS:-$ALL_CLAIMS}
MARKS=$OUT/.steps
START=$(date +%s)

fail() { echo "$0: $*" >&2; exit 2; }

for name in ${CLAIMS//,/ }; do
  [[ ",$ALL_CLAIMS," == *",$name,"* ]] || fail "CLAIMS: unknown claim '$name'; choose from $ALL_CLAIMS"
done

# step NAME COMMAND...: MODE=names collects NAME; MODE=run runs COMMAND unless NAME is done
# (or not selected), times it, and marks it done only when COMMAND succeeds.
MODE=names
NAMES=""
step() {
  local name=$1
  shift
  if [ "$MODE" = names ]; then NAMES="$NAMES $name"; return; fi
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  if [ -e "$MARKS/$name.done" ] && [ -z "${FORCE:-}" ]; then
    echo "== step $name: done earlier, skipped (FORCE=1 re-runs it)"
    return
  fi
  local t0 rc=0
  t0=$(date +%s)
  echo "== step $name"
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "== step $name FAILED (exit $rc) after $(( $(date +%s) - t0 )) s: not marked done" >&2
    exit "$rc"
  fi
  touch "$MARKS/$name.done"
  echo "== step $name done in $(( $(date +%s) - t0 )) s ($(( $(date +%s) - START )) s in all)"
}

wants() { [[ ",$CLAIMS," == *",$1,"* ]]; }

sweep() {
  local config=configs/sweep.py
  case "$PRESET" in
    full) config=configs/sweep.py:preset=gpu ;;
    smoke) config=configs/sweep.py:smoke ;;
    cpu) set -- --config.lengths=128,256,512,1024,2048,4096 --config.time_budget_s=30 "$@" ;;
  esac
  "$PYTHON" -m experiments.sweep --config="$config" --workdir="$OUT/sweep" "$@"
}

# claim NAME [--config.X=...]: one claim into $OUT; the training claims (4-5) keep their
# checkpoints in $TRAIN_DIR and their finished runs' rows in $OUT.
claim() {
  local name=$1
  shift
  "$PYTHON" -m experiments.claims --config="configs/claims.py:preset=$PRESET" \
    --claim="$name" --workdir="$OUT" --config.train_dir="$TRAIN_DIR" "$@"
}

# Every step, in order (run once to collect the names, once to run them).
steps() {
  if [ "$PRESET" = full ]; then
    step sweep-reference sweep --config.implementations=reference
    for impl in blocked exact polynomial; do
      step "sweep-$impl-fwd" sweep --config.implementations=$impl --config.passes=fwd
      step "sweep-$impl-grad" sweep --config.implementations=$impl --config.passes=fwd+grad
    done
    step sweep-plot "$PYTHON" scripts/plot_sweep.py "$OUT/sweep"
    for pair in 1:forward 2:gradient; do
      n=${pair%%:*} name=${pair#*:}
      wants "$name" || continue
      step "claim$n-$name-exact" claim "$name" --config."$name".implementations=exact
      step "claim$n-$name-polynomial" claim "$name" --config."$name".implementations=polynomial
      step "claim$n-$name" claim "$name"
    done
    if wants threshold; then step claim3-threshold claim threshold; fi
    if wants expressivity; then
      for task in match2 match3 function_composition relation_composition \
          quotient_relation_composition; do
        for seed in 0 1 2; do
          step "claim4-expressivity-$task-seed$seed" claim expressivity \
            --config.expressivity.tasks="$task" --config.expressivity.seeds="$seed"
        done
      done
      step claim4-expressivity claim expressivity
    fi
    if wants bounded; then
      for seed in 0 1 2; do
        step "claim5-bounded-seed$seed" claim bounded --config.bounded.seeds="$seed"
      done
      step claim5-bounded claim bounded
    fi
  else
    step sweep sweep
    n=0
    for name in forward gradient threshold expressivity bounded; do
      n=$((n + 1))
      if wants "$name"; then step "claim$n-$name" claim "$name"; fi
    done
  fi
}

steps
if [ -n "$ONLY" ]; then
  for name in ${ONLY//,/ }; do
    [[ " $NAMES " == *" $name "* ]] || fail "--step: unknown step '$name'; steps:$NAMES"
  done
fi
if [ -n "$LIST" ]; then
  printf '%s\n' $NAMES
  exit 0
fi
command -v "$PYTHON" >/dev/null || fail "PYTHON=$PYTHON: not found (set PYTHON=/path/to/python)"
mkdir -p "$OUT" "$MARKS"
MODE=run
steps
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ') ($(( $(date +%s) - START )) s)"
