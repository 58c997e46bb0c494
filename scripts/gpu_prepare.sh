#!/usr/bin/env bash
# Prepares this checkout, on a machine with pip access, for scripts/gpu_checks.sh on a GPU
# machine without network whose image has JAX (CUDA), flax, optax, orbax, matplotlib, pytest
# and PyTorch but not ml_collections or tensorboardX:
#
#   scripts/gpu_prepare.sh [PEERS_DIR]
#
# - .whl/: wheels of the Python packages such a machine lacks (ml_collections, tensorboardX),
#   for CPython 3.12 on x86-64 Linux (PYTHON_VERSION to change it); gpu_checks.sh installs them.
# - .peers/: a copy of PEERS_DIR, the peers' comparison harness (not part of this repository),
#   when given; gpu_checks.sh's `peers` section runs it.
# Both are ignored by git (its info/exclude), so they travel only when a device call carries
# them: carry [".whl", ".peers"].
set -euo pipefail
PEERS=""
if [ $# -gt 0 ]; then  # checked, and made absolute, before any work and before the cd
  [ -f "$1/run.sh" ] || { echo "$1 has no run.sh: not the peers' harness" >&2; exit 2; }
  PEERS=$(cd "$1" && pwd)
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
WHEELS=("ml_collections==1.1.0" "tensorboardX==2.6.5")
exclude=$(git rev-parse --git-path info/exclude)  # also in a worktree, where .git is a file
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.peers/; do
  grep -qxF "$path" "$exclude" 2> /dev/null || echo "$path" >> "$exclude"
done
rm -rf .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
  --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
echo "wheels: $(ls .whl | tr '\n' ' ')"
if [ -n "$PEERS" ]; then
  rm -rf .peers && cp -r "$PEERS" .peers && find .peers -name __pycache__ -prune -exec rm -rf {} +
  echo "peers: $(du -sh .peers | cut -f1) in .peers"
fi
git status --short --ignored .whl .peers | head -3
