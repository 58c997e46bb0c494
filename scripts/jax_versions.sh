#!/usr/bin/env bash
# The GPU kernels' checks that need no GPU (CUDA lowering, interpret mode against the float64
# oracle) under other JAX versions than the installed one, e.g. the GPU machines' version:
#
#   scripts/jax_versions.sh PYTHON VERSION...      # e.g. python3.12 0.11.2 0.12.1
#   TESTS="tests" scripts/jax_versions.sh ...        # the whole suite instead
#
# Each version gets its own virtual environment, kept for re-runs, under
# ${JAXENV_DIR:-/tmp/tensorattn-jax}/VERSION (jax >= 0.11 needs Python >= 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:?usage: $0 PYTHON VERSION...}
shift
[ $# -gt 0 ] || { echo "usage: $0 PYTHON VERSION..." >&2; exit 2; }
TESTS=${TESTS:-tests/test_pallas.py tests/test_mosaic_gpu.py tests/test_polynomial_fused.py}
ROOT=${JAXENV_DIR:-/tmp/tensorattn-jax}
status=0
for version in "$@"; do
  env=$ROOT/$version
  if [ ! -f "$env/.installed" ]; then  # a failed install is redone, not reused
    rm -rf "$env"
    "$PYTHON" -m venv "$env"
    "$env/bin/pip" install -q "jax==$version" "jaxlib==$version" -r requirements.txt -e .
    touch "$env/.installed"
  fi
  # environments made before pytest-xdist joined requirements.txt get it now
  "$env/bin/python" -c "import xdist" 2> /dev/null || "$env/bin/pip" install -q "pytest-xdist>=3.5"
  echo "== jax $version ($("$env/bin/python" --version))"
  # shellcheck disable=SC2086
  "$env/bin/python" -m pytest -n auto $TESTS -p no:cacheprovider || status=1
done
exit $status
