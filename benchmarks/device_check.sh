#!/usr/bin/env bash
# The accelerator check: on a GPU machine, in under 8 minutes, installs the
# project, runs the parity tests on the device, times FERD / FERS / a FERS
# batch / the stage-2 and stage-1 steps, and writes
# benchmarks/results/device_<gpu name>.json (benchmarks/device_check.py).
#
#   benchmarks/device_check.sh              # on the GPU machine
#   benchmarks/device_check.sh --dry-run    # CPU, tiny sizes, no install, no
#                                           # tests (what CI runs)
#   options: --no-install, --skip-tests, --out FILE, --repeats N
#
# ../shared (or FERS_SHARED) must hold the reference data, as for the tests.
# Exit status: non-zero when the parity tests fail or an AUC differs.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0 install=1 tests=1 out="" repeats=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 install=0 tests=0 ;;
    --no-install) install=0 ;;
    --skip-tests) tests=0 ;;
    --out) out="$2"; shift ;;
    --repeats) repeats="$2"; shift ;;
    *) echo "device_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

export PYTHONUNBUFFERED=1
# Full float32 matmuls: GPUs default to TF32 (10-bit mantissa), which the
# parity tolerances (1e-4 of scale) do not allow.
export JAX_DEFAULT_MATMUL_PRECISION=highest
# Let XLA take GPU memory as it needs it, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python}
t0=$(date +%s)

if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
fi
if [ "$install" = 1 ]; then
  echo "== install"
  $py -m pip install -q -e ".[dev]" || $py -m pip install -q --no-deps -e .
  if ! $py -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
    jv=$($py -c 'import jax; print(jax.__version__)')
    $py -m pip install -q "jax[cuda12]==$jv" || \
      echo "WARNING: no GPU backend for jax $jv (pip install jax[cuda12] failed)"
  fi
fi
$py -c 'import jax; print("== devices:", jax.devices(), "matmul precision:", jax.config.jax_default_matmul_precision)'

junit=""
status=0
if [ "$tests" = 1 ]; then
  echo "== parity tests on the device"
  junit=$(mktemp --suffix=.xml)
  # Golden features (1e-4 of scale), the tiny stage-1 step, RX / FERD / FERS
  # maps and AUCs on the shipped scenes: the CPU suite's parity tests.
  timeout 300 $py -m pytest -q -p no:cacheprovider --junitxml="$junit" \
    tests/test_parity.py tests/test_inference.py \
    tests/test_detectors.py::test_rx_equals_reference_golden \
    tests/test_detectors.py::test_rx_on_scenes_matches_reference_maps \
    tests/test_training.py::test_stage1_train_step_golden_parity || status=$?
fi

echo "== timings"
args=()
[ "$dry" = 1 ] && args+=(--dry-run)
[ -n "$junit" ] && args+=(--pytest-junit "$junit")
[ -n "$out" ] && args+=(--out "$out")
[ -n "$repeats" ] && args+=(--repeats "$repeats")
$py benchmarks/device_check.py "${args[@]}" || status=$?
echo "== done in $(( $(date +%s) - t0 )) s (status $status)"
exit $status
