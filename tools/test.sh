#!/usr/bin/env bash
# The whole test suite, as CI runs it: Rust format/lint/tests, then the wheel built by
# maturin, installed into a fresh virtual environment with the test extras, the CUDA kernels
# compiled with NVRTC, and pytest run against that installed wheel (not the source tree).
# Tests marked `gpu` skip, saying why, unless a CUDA GPU and CuPy are present.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free"
echo "== cargo fmt / clippy / test"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test -p qlorakit-core --release

echo "== wheel into a fresh venv"
bash tools/setup_env.sh --test .venv-test

echo "== wheel contents: the kernel sources as package data, no test code (the CPU-emulation shim)"
.venv-test/bin/python - dist/qlorakit-*.whl <<'PY'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
sources = sorted(p.name for p in pathlib.Path("python/qlorakit/kernels/cuda").glob("*.cu*"))
missing = [f for f in sources if f"qlorakit/kernels/cuda/{f}" not in names]
test_code = sorted(n for n in names if "shim" in n or "emulation" in n)
assert sources and not missing and not test_code, f"missing from the wheel: {missing}; test code in it: {test_code}"
print(f"{len(sources)} kernel sources in the wheel, no shim")
PY

echo "== ruff"
.venv-test/bin/ruff check python tests tools
.venv-test/bin/ruff format --check python tests tools

echo "== CUDA kernels: NVRTC 12 and 13, sm_80 and sm_90, the sources shipped in the wheel (no GPU needed)"
.venv-test/bin/python tools/check_kernels.py

echo "== pytest (installed wheel)"
.venv-test/bin/python -c "import qlorakit; assert 'site-packages' in qlorakit.__file__; print('testing', qlorakit.__file__)"
.venv-test/bin/python -m pytest -q tests
