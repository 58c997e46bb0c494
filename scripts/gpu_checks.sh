#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, each bounded in time, with their logs and rows in DIR.
#
#   scripts/gpu_checks.sh DIR                     # all sections, in this order:
#                                                 #   smoke peers kernels polynomial tests reproduce
#                                                 #   (and polynomial_wide, when named)
#   scripts/gpu_checks.sh DIR smoke peers         # some of them, in the order given
#   BUDGET_S=540 ARCHIVE=$OUT/gpu.tgz scripts/gpu_checks.sh /tmp/g   # one device call
#
# smoke:      the tests marked `gpu`: every compiled GPU kernel (Triton-lowered Pallas, Mosaic
#             GPU forward and backward, fused polynomial) against the float64 oracle, and those
#             marked `multi_device` (simulated CPU devices beside the GPU, issue 15), each test
#             named in the log, one that hangs failed after SMOKE_TEST_TIMEOUT_S (75 s). Run
#             first: a kernel that fails here makes its timings below meaningless.
# peers:      the side-by-side run against the peers' Triton kernels (issue 10), needing a copy
#             of them in .peers (see its run.sh): its two scripts as sections of their own, the
#             peers (DIR/peers_torch.jsonl) then tensorattn with implementation=None
#             (DIR/tensorattn_jax.jsonl, and the table), then tensorattn alone with
#             implementation="mosaic_gpu" (DIR/mosaic_gpu/tensorattn_jax.jsonl, beside the same
#             peer rows).
# kernels:    experiments/bench_pallas.py: the Triton-lowered Pallas kernels and the Mosaic GPU
#             kernels on the windowed, grouped-head shapes of issue 10, then full attention
#             (default tiles, a few tile variants, the backward layouts; no check against the
#             blocked kernel: smoke checks them against the oracle); the Mosaic GPU
#             kernels' ptxas reports in DIR/mosaic_registers_gpu.jsonl.
# polynomial: experiments/bench_polynomial_fused.py at issue 14's shape, non-causal then causal
#             (the XLA kernel, for comparison, up to n = 65536 only); then the XLA kernel's
#             autodiff gradient at n = 16384 and 65536 (on a CPU it beats the closed form at
#             H = 16: is it the better default on a GPU?).
# polynomial_wide: experiments/bench_polynomial at head dims 64 and 128 (8 heads, entries in
#             [-0.5, 0.5]), degrees 2 and 4 (and the lowest degrees meeting its error target)
#             against the exact kernel: where the polynomial method stops being worth it
#             (issue 14); its crossover table in DIR/crossover_hH.txt, also after a cut.
#             270 s per head dim: one device call on its own (BUDGET_S=560).
# tests:      the whole test suite on this machine (issue 15), its counts and wall time.
# reproduce:  scripts/reproduce.sh --full (issue 13) into DIR/full, resuming from a copy of
#             results/full: the steps a run finishes, and the finished training runs of the
#             steps it is cut in, come back with DIR (commit them to results/full to go on).
#
# After peers and kernels, experiments/gpu_targets.py checks issue 10's targets against the
# rows, and names the fastest configuration timed per case beside the default's time
# (DIR/targets.txt: what the defaults should become). DIR/gpu_checks.txt gets a line per section: device, JAX version,
# exit status, wall time, test counts. Each section runs under `timeout`: its own cap below
# (so that a hung kernel cannot take a whole device call), at most TIMEOUT_S (default 540 s);
# with BUDGET_S, all of them together end within BUDGET_S seconds of the start (a section
# gets what is left, and is skipped with under 20 s left). A section's processes carry a tag
# in their environment, and whatever is still running when it ends (e.g. under a nested
# `timeout`, which leaves the section's process group) is killed, so that nothing holds the GPU
# into the next section's timings. In `tests`, a test that hangs fails
# after TEST_TIMEOUT_S (default 180 s, with pytest-timeout). With ARCHIVE=FILE.tgz, DIR is
# archived into FILE after each section, so a call killed at its limit still returns what
# the finished sections wrote (a device call returns at most 8 files). Python wheels in
# .whl/ (packages the machine lacks, e.g. ml_collections) are installed into a side folder
# first. Tests run on PYTEST_WORKERS processes (default 8, with pytest-xdist; 0: one
# process), each taking GPU memory as needed.
set -uo pipefail
DIR=${1:?usage: $0 DIR [smoke|peers|kernels|polynomial|polynomial_wide|tests|reproduce]...}
shift
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)  # relative paths: from the caller's folder
if [ -n "${ARCHIVE:-}" ]; then
  mkdir -p "$(dirname "$ARCHIVE")" && ARCHIVE=$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")
fi
cd "$(dirname "$0")/.."
SECTIONS=${*:-smoke peers kernels polynomial tests reproduce}
TIMEOUT_S=${TIMEOUT_S:-540}
BUDGET_S=${BUDGET_S:-0}
ARCHIVE=${ARCHIVE:-}
PYTHON=${PYTHON:-python3}
PYTEST_WORKERS=${PYTEST_WORKERS:-8}
START=$(date +%s)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
for s in $SECTIONS; do
  case $s in
    smoke | peers | kernels | polynomial | polynomial_wide | tests | reproduce) ;;
    *) echo "unknown section $s (smoke, peers, kernels, polynomial, polynomial_wide, tests," \
      "reproduce)" >&2; exit 2 ;;
  esac
done
SUMMARY=$DIR/gpu_checks.txt

if compgen -G ".whl/*.whl" > /dev/null; then  # pure-Python wheels: unzipping them will do
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tensorattn-wheels .whl/*.whl ||
    for wheel in .whl/*.whl; do "$PYTHON" -m zipfile -e "$wheel" /tmp/tensorattn-wheels; done
  export PYTHONPATH=/tmp/tensorattn-wheels:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
env_line=$("$PYTHON" -c 'import jax; d = jax.devices()[0]; print(f"{d.device_kind} ({d.platform}), jax {jax.__version__}")') ||
  { echo "$PYTHON cannot import jax (PYTHON=.venv/bin/python?)" >&2; exit 2; }
echo "== $(date -u +%FT%TZ) $env_line" | tee -a "$SUMMARY"

archive() {  # DIR -> ARCHIVE, replaced whole so that a kill never leaves half an archive
  [ -n "$ARCHIVE" ] || return 0
  tar czf "$ARCHIVE.part" -C "$(dirname "$DIR")" "$(basename "$DIR")" && mv "$ARCHIVE.part" "$ARCHIVE"
}

reap() {  # reap TAG: kills every process whose environment holds TENSORATTN_SECTION=TAG
  local pid
  for pid in $(grep -lz "^TENSORATTN_SECTION=$1\$" /proc/[0-9]*/environ 2> /dev/null |
    cut -d/ -f3); do
    [ "$pid" != "$$" ] && kill -KILL "$pid" 2> /dev/null
  done
  return 0
}

section() {  # section NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S (and TIMEOUT_S)
  local name=$1 t0 rc limit=$TIMEOUT_S  # and the time left, logging to DIR/NAME.log
  [ "$2" -lt "$limit" ] && limit=$2
  shift 2
  t0=$(date +%s)
  if [ "$BUDGET_S" -gt 0 ]; then
    local left=$((BUDGET_S - (t0 - START)))
    if [ "$left" -lt 20 ]; then
      echo "$name: skipped, ${left} s of BUDGET_S=$BUDGET_S left" | tee -a "$SUMMARY"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  # The log is a file, not a pipe: a process left running would hold a pipe open, and the
  # section with it. `tail` shows the log until the command ends.
  local tag="$name.$$.$t0" pid
  TENSORATTN_SECTION=$tag timeout -k 10 "$limit" "$@" > "$DIR/$name.log" 2>&1 &
  pid=$!
  tail -n +1 -f --pid="$pid" "$DIR/$name.log" &
  wait "$pid"
  rc=$?
  reap "$tag"
  wait
  local what="exit $rc"
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && what="cut at ${limit} s (timeout)"
  local counts
  counts=$(grep -E '[0-9]+ (passed|failed|skipped|errors?)\b.* in [0-9.]+s' "$DIR/$name.log" |
    tail -1 | tr -d '=' | xargs)
  echo "$name: $what in $(($(date +%s) - t0)) s${counts:+; $counts}" | tee -a "$SUMMARY"
  archive
}

targets() {  # issue 10's targets from the rows so far -> DIR/targets.txt
  rm -f "$DIR/targets.jsonl"
  "$PYTHON" -m experiments.gpu_targets --dir="$DIR" --out="$DIR/targets.jsonl" \
    > "$DIR/targets.txt" 2>&1 && tail -1 "$DIR/targets.txt" | tee -a "$SUMMARY"
}

pytest_cmd=("$PYTHON" -m pytest -p no:cacheprovider -rs)
if [ "$PYTEST_WORKERS" -gt 0 ] && "$PYTHON" -c "import xdist" 2> /dev/null; then
  pytest_cmd+=(-n "$PYTEST_WORKERS")
fi
# A kernel that hangs on the GPU fails its test after a time limit instead of the section.
test_timeout=() smoke_timeout=()
if "$PYTHON" -c "import pytest_timeout" 2> /dev/null; then
  test_timeout=(--timeout="${TEST_TIMEOUT_S:-180}" --timeout-method=thread)
  smoke_timeout=(--timeout="${SMOKE_TEST_TIMEOUT_S:-75}" --timeout-method=thread)
fi

archive
for s in $SECTIONS; do
  case $s in
    smoke)
      section smoke 180 "${pytest_cmd[@]}" "${smoke_timeout[@]}" -vv \
        -m "gpu or multi_device" tests/test_conformance.py tests/test_mosaic_gpu.py \
        tests/test_polynomial_fused.py tests/test_sharding.py ;;
    tests) section tests 540 "${pytest_cmd[@]}" "${test_timeout[@]}" ;;
    reproduce)
      rm -rf "$DIR/full" && mkdir -p "$DIR/full"
      [ -d results/full ] && cp -r results/full/. "$DIR/full/"
      section reproduce 540 env OUT="$DIR/full" TRAIN_DIR=/tmp/tensorattn_train \
        PYTHON="$PYTHON" bash scripts/reproduce.sh --full ;;
    kernels)
      bench=("$PYTHON" -m experiments.bench_pallas --impls=pallas,mosaic_gpu --head_dims=128
        --bwd_impls=pallas,mosaic_gpu --bwd_layouts=default,split --budget_s=3 --check=false
        --out="$DIR/bench_pallas.jsonl")
      # (MOSAIC_GPU_DUMP_PTXAS: the Mosaic GPU kernels' ptxas reports go to the log, read back
      # into DIR/mosaic_registers_gpu.jsonl to set beside experiments.mosaic_registers' rows)
      section kernels_grouped 180 env MOSAIC_GPU_DUMP_PTXAS=1 "${bench[@]}" \
        --cases=window16384,group64,group128 --variants_window=64:64:4 \
        --variants_mosaic=32:128:2,32:64:3
      "$PYTHON" -m experiments.mosaic_registers --from_log="$DIR/kernels_grouped.log" \
        --out="$DIR/mosaic_registers_gpu.jsonl" > /dev/null
      section kernels_full 90 "${bench[@]}" --cases=full4096 --variants_full=64:64:4 \
        --variants_mosaic=32:128:2
      targets
      archive ;;
    peers)
      if [ ! -f .peers/peers_torch.py ] || [ ! -f .peers/tensorattn_jax.py ]; then
        echo "peers: skipped, no .peers/{peers_torch,tensorattn_jax}.py (the peers' comparison harness, not in this repository)" | tee -a "$SUMMARY"
        continue
      fi
      # Its two scripts, each capped on its own (run.sh's nested timeouts would outlive a cut).
      section peers_torch 180 env OUT="$DIR" "$PYTHON" .peers/peers_torch.py
      section peers 150 env OUT="$DIR" "$PYTHON" .peers/tensorattn_jax.py
      mkdir -p "$DIR/mosaic_gpu"
      cp "$DIR"/peers_*.jsonl "$DIR/mosaic_gpu/" 2>/dev/null
      section peers_mosaic_gpu 120 env OUT="$DIR/mosaic_gpu" TENSORATTN_IMPL=mosaic_gpu \
        "$PYTHON" .peers/tensorattn_jax.py
      targets
      archive ;;
    polynomial)
      for causal in 0 1; do
        section "polynomial_causal$causal" 120 "$PYTHON" -m experiments.bench_polynomial_fused \
          --causal=$causal --kernels=fused,xla --xla_max_n=65536 --budget_s=5 \
          --out="$DIR/bench_polynomial_fused.jsonl"
      done
      section polynomial_autodiff 60 "$PYTHON" -m experiments.bench_polynomial_fused \
        --kernels=xla_autodiff --passes=fwd+grad --lengths=16384,65536 --budget_s=5 \
        --out="$DIR/bench_polynomial_fused.jsonl" ;;
    polynomial_wide)
      for h in 64 128; do
        rm -f "$DIR/bench_polynomial_h$h.jsonl"  # the table below reads this run's rows only
        section "polynomial_h$h" 270 "$PYTHON" -m experiments.bench_polynomial --head_dim=$h \
          --heads=8 --degree=2 --degrees=4 --entry_bound=0.5 --min_log2_t=10 --max_log2_t=14 \
          --exact_max_log2_t=12 --repeats=3 --out="$DIR/bench_polynomial_h$h.jsonl"
        # The crossover table from the rows written, also when the section was cut.
        "$PYTHON" -m experiments.bench_polynomial --from_rows="$DIR/bench_polynomial_h$h.jsonl" \
          > "$DIR/crossover_h$h.txt" 2>&1
      done
      archive ;;
  esac
done
archive
