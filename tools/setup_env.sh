#!/usr/bin/env bash
# Build qlorakit's wheel with maturin and install it into a virtual environment.
#   bash tools/setup_env.sh                # .venv, runtime dependencies only
#   bash tools/setup_env.sh --test DIR     # DIR (fresh), with the test extras
#   bash tools/setup_env.sh --test DIR cuda13   # ... plus more extras (CuPy for the GPU tests)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
venv=".venv"
if [[ "${1:-}" == "--test" ]]; then
  venv="${2:-.venv-test}"
  more=("${@:3}")
  extras="[$(IFS=,; echo "test${more[*]:+,${more[*]}}")]"
  rm -rf "$venv"
fi

# No pip cache: torch's CUDA build and its nvidia-* wheels are several GB, and a cached copy of each beside the
# installed one has run CI machines out of disk.
export PIP_NO_CACHE_DIR=1

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "maturin>=1.7,<2"
rm -rf dist
"$venv/bin/maturin" build --release --out dist
wheel=$(ls dist/qlorakit-*.whl)
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
"$venv/bin/python" -m pip install --quiet "${wheel}${extras}"
echo "installed $(basename "$wheel") into $venv"
