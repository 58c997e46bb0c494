#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, each bounded in time, with their logs and rows in DIR.
#
#   scripts/gpu_checks.sh DIR                          # all sections, in this order
#   scripts/gpu_checks.sh DIR tests                    # some of: tests kernels peers polynomial
#
# tests:      the whole test suite on this machine (GPU-compiled cases included), its log and
#             a summary line (device, JAX version, counts, wall time) in DIR/gpu_checks.txt.
# kernels:    experiments/bench_pallas.py: the Triton-lowered Pallas kernels and the Mosaic GPU
#             kernels on the windowed, grouped-head shapes of issue 10, then full attention;
#             the Mosaic GPU kernels' ptxas reports in DIR/mosaic_registers_gpu.jsonl.
# peers:      the side-by-side run against the peers' Triton kernels (issue 10), needing a copy
#             of them in .peers (see its run.sh): once with implementation=None (DIR/peers_*.jsonl,
#             DIR/tensorattn_jax.jsonl), then tensorattn alone with implementation="mosaic_gpu"
#             (DIR/mosaic_gpu/tensorattn_jax.jsonl, beside the same peer rows).
# polynomial: experiments/bench_polynomial_fused.py at issue 14's shape, non-causal then causal.
# Each section runs under `timeout` (TIMEOUT_S, default 540 s) so that one fits a 10-minute slot;
# a section cut by it says so in gpu_checks.txt and the rows it wrote are kept.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: $0 DIR [tests|kernels|peers|polynomial]...}
shift
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)
SECTIONS=${*:-tests kernels peers polynomial}
TIMEOUT_S=${TIMEOUT_S:-540}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
for s in $SECTIONS; do
  case $s in
    tests | kernels | peers | polynomial) ;;
    *) echo "unknown section $s (tests, kernels, peers, polynomial)" >&2; exit 2 ;;
  esac
done
SUMMARY=$DIR/gpu_checks.txt

env_line=$("$PYTHON" -c 'import jax; d = jax.devices()[0]; print(f"{d.device_kind} ({d.platform}), jax {jax.__version__}")') ||
  { echo "$PYTHON cannot import jax (PYTHON=.venv/bin/python?)" >&2; exit 2; }
echo "== $(date -u +%FT%TZ) $env_line" | tee -a "$SUMMARY"

section() {  # section NAME COMMAND...: runs COMMAND under the timeout, logs to DIR/NAME.log
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  timeout "$TIMEOUT_S" "$@" 2>&1 | tee "$DIR/$name.log"
  rc=${PIPESTATUS[0]}
  local what="exit $rc"
  [ "$rc" = 124 ] && what="cut at ${TIMEOUT_S} s (timeout)"
  local counts
  counts=$(grep -E '[0-9]+ (passed|failed)' "$DIR/$name.log" | tail -1)
  echo "$name: $what in $(($(date +%s) - t0)) s${counts:+; $counts}" | tee -a "$SUMMARY"
}

for s in $SECTIONS; do
  case $s in
    tests) section tests "$PYTHON" -m pytest -p no:cacheprovider -rs ;;
    kernels)
      # (MOSAIC_GPU_DUMP_PTXAS: the Mosaic GPU kernels' ptxas reports go to the log, read back
      # into DIR/mosaic_registers_gpu.jsonl to set beside experiments.mosaic_registers' rows)
      section kernels_grouped env MOSAIC_GPU_DUMP_PTXAS=1 "$PYTHON" -m experiments.bench_pallas \
        --impls=pallas,mosaic_gpu --bwd_impls=pallas,mosaic_gpu \
        --cases=window16384,group64,group128 --head_dims=128 --out="$DIR/bench_pallas.jsonl"
      "$PYTHON" -m experiments.mosaic_registers --from_log="$DIR/kernels_grouped.log" \
        --out="$DIR/mosaic_registers_gpu.jsonl" > /dev/null
      section kernels_full "$PYTHON" -m experiments.bench_pallas \
        --impls=pallas,mosaic_gpu --bwd_impls=pallas,mosaic_gpu \
        --cases=full4096 --out="$DIR/bench_pallas.jsonl" ;;
    peers)
      if [ ! -f .peers/run.sh ]; then
        echo "peers: skipped, no .peers/run.sh (the peers' comparison harness, not in this repository)" | tee -a "$SUMMARY"
        continue
      fi
      section peers env OUT="$DIR" bash .peers/run.sh
      mkdir -p "$DIR/mosaic_gpu"
      cp "$DIR"/peers_*.jsonl "$DIR/mosaic_gpu/" 2>/dev/null
      section peers_mosaic_gpu env OUT="$DIR/mosaic_gpu" TENSORATTN_IMPL=mosaic_gpu \
        PYTHONPATH="$PWD:${PYTHONPATH:-}" "$PYTHON" .peers/tensorattn_jax.py ;;
    polynomial)
      section polynomial_noncausal "$PYTHON" -m experiments.bench_polynomial_fused --causal=0 \
        --out="$DIR/bench_polynomial_fused.jsonl"
      section polynomial_causal "$PYTHON" -m experiments.bench_polynomial_fused --causal=1 \
        --out="$DIR/bench_polynomial_fused.jsonl" ;;
  esac
done
