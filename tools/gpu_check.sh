#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one NVIDIA GPU lent for a few minutes and no network:
# `pytest -m gpu`, then tools/bench_gpu.py --quick and tools/bench_paged.py at quick sizes, each under a
# time limit (7.5 minutes in all), then one summary block: what passed and the figures.
# Exit status: 0 when every step passed (or in a dry run), 1 when a step failed or timed out.
#
#   bash tools/gpu_check.sh --venv DIR      # an existing environment with qlorakit[test,cuda12|13] installed
#   bash tools/gpu_check.sh --wheels DIR    # a fresh venv installed offline from the wheels in DIR:
#                                           #   pip install --no-index --find-links DIR "qlorakit[$QLORAKIT_EXTRAS]"
#   bash tools/gpu_check.sh --dry-run       # print what it would run, run nothing (also what happens without a GPU)
#
# Environment instead of the options: QLORAKIT_VENV=DIR, QLORAKIT_WHEELS=DIR, QLORAKIT_EXTRAS (default
# "test,cuda12"; "test,cuda13" for CUDA 13 drivers). With neither, the repository's .venv-test is used.
# Prepare the wheel directory on a machine with network:
#   pip download --dest wheels dist/qlorakit-*.whl "qlorakit[test,cuda12]"  (same Python version and platform)
# Nothing is fetched from PyPI here: the wheel route installs with --no-index only.
# Logs: $QLORAKIT_GPU_LOGS (default a fresh directory under /tmp), one file a step.
set -uo pipefail
cd "$(dirname "$0")/.."

venv="${QLORAKIT_VENV:-}"
wheels="${QLORAKIT_WHEELS:-}"
extras="${QLORAKIT_EXTRAS:-test,cuda12}"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv="${2:?--venv needs a directory}"; shift 2 ;;
    --wheels) wheels="${2:?--wheels needs a directory}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Time limits (seconds) per step: 45 + 210 + 110 + 80 = 445 s, under 8 minutes with a wheel install.
LIMIT_PROBE=45
LIMIT_PYTEST=210
LIMIT_BENCH_GPU=110
LIMIT_BENCH_PAGED=80

logs="${QLORAKIT_GPU_LOGS:-/tmp/qlorakit-gpu-check.$$}"

if [[ -n "$wheels" ]]; then
  venv="${venv:-$logs/venv}"
  setup=("python3 -m venv $venv"
    "$venv/bin/python -m pip install --no-index --find-links $wheels qlorakit[$extras]")
else
  venv="${venv:-.venv-test}"
  setup=()
fi
py="$venv/bin/python"

names=(probe pytest-gpu bench_gpu bench_paged)
limits=("$LIMIT_PROBE" "$LIMIT_PYTEST" "$LIMIT_BENCH_GPU" "$LIMIT_BENCH_PAGED")
commands=(
  "$py -c \"import cupy, torch, qlorakit; print('qlorakit', qlorakit.__version__, qlorakit.__file__); print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0)); print('cupy', cupy.__version__)\""
  "$py -m pytest -q -m gpu -rs -p no:cacheprovider tests"
  "$py tools/bench_gpu.py --quick"
  "$py tools/bench_paged.py --layers 4 --steps 10 --rounds 2 --warmup 2 --demo-steps 3"
)

show_plan() {
  echo "gpu_check: environment $venv${wheels:+ (created from the wheels in $wheels, extras [$extras])}; logs in $logs"
  for line in "${setup[@]}"; do echo "  setup: $line"; done
  for i in "${!names[@]}"; do
    printf '  %-12s (limit %3ss) %s\n' "${names[$i]}" "${limits[$i]}" "${commands[$i]}"
  done
}

gpu=""
if command -v nvidia-smi > /dev/null 2>&1; then
  gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null | head -n 1)"
fi
if [[ $dry_run -eq 1 || -z "$gpu" ]]; then
  [[ $dry_run -eq 1 ]] && echo "gpu_check: dry run, nothing is run" \
    || echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none): nothing to check; it would run:"
  show_plan
  exit 0
fi

mkdir -p "$logs"
echo "gpu_check: GPU $gpu"
show_plan
start_all=$SECONDS
for line in "${setup[@]}"; do
  echo "== setup: $line"
  if ! bash -c "$line" > "$logs/setup.log" 2>&1; then
    tail -n 20 "$logs/setup.log"
    echo "gpu_check: FAILED to set up the environment (log $logs/setup.log)"
    exit 1
  fi
done
if [[ ! -x "$py" ]]; then
  echo "gpu_check: no Python at $py: pass --venv DIR or --wheels DIR (see --help)"
  exit 1
fi

results=()
failed=0
for i in "${!names[@]}"; do
  name="${names[$i]}"
  echo "== $name"
  step_start=$SECONDS
  timeout --kill-after=10 "${limits[$i]}" bash -c "${commands[$i]}" 2>&1 | tee "$logs/$name.log"
  code=${PIPESTATUS[0]}
  seconds=$((SECONDS - step_start))
  if [[ $code -eq 0 ]]; then
    status="PASS"
  elif [[ $code -eq 124 || $code -eq 137 ]]; then
    status="TIMEOUT after ${limits[$i]} s"
  else
    status="FAIL (exit $code)"
  fi
  [[ $code -ne 0 ]] && failed=1
  results+=("$(printf '%-12s %-22s %4s s' "$name" "$status" "$seconds")")
  # Without a working GPU stack the rest cannot run either.
  [[ $name == probe && $code -ne 0 ]] && break
done

echo
echo "==================== gpu_check summary ===================="
echo "GPU: $gpu"
for line in "${results[@]}"; do echo "  $line"; done
if [[ -f "$logs/pytest-gpu.log" ]]; then
  echo "pytest -m gpu: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$logs/pytest-gpu.log" | tail -n 1)"
fi
for bench in bench_gpu bench_paged; do
  [[ -f "$logs/$bench.log" ]] || continue
  echo "-- $bench figures"
  grep -E 'GB/s|ms|qlorakit|PagedAdamW|deviation|==|bitsandbytes|dense|allocated|skipped' "$logs/$bench.log" \
    | grep -vE '^(torch|versions|device|GPU:)' | sed 's/^/  /'
done
echo "total $((SECONDS - start_all)) s; logs in $logs"
if [[ $failed -ne 0 ]]; then
  echo "RESULT: FAILED"
  exit 1
fi
echo "RESULT: all passed"
