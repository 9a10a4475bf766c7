#!/usr/bin/env bash
# One prepared GPU check (issue 7): on a fresh machine with an NVIDIA GPU and CuPy,
#   1. install minidiff (editable) with its test and gpu extras,
#   2. run the whole test suite with the cupy backend (gpu-marked tests included),
#   3. run the speed benchmark with --backend cupy (against PyTorch CUDA when torch sees the GPU).
# Usage, from the repository root:  bash benchmarks/gpu_check.sh [extra pytest args]
# Budget: under 8 minutes in all (install ~1 min, tests <= 4.5 min, benchmark <= 3 min); each stage has a timeout.
# Output: $OUT (or /tmp/gpu_check_out) gets pytest.txt, bench.txt and bench.json.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT_DIR"
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

# Stop before installing anything (CuPy is ~100 MB) where there is no NVIDIA GPU to check.
if ! gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null); then
    stamp "FAIL: nvidia-smi finds no NVIDIA GPU here; nothing to check (and nothing installed)"
    exit 2
fi
stamp "machine: $gpu"

# 1. Install. A preinstalled CuPy (any cupy-cudaXXx wheel) is kept: installing cupy-cuda12x on
#    top of another CuPy wheel would clash. The machine may have no network: when everything the
#    tests need already imports, install without dependencies (no index needed); pip gets short
#    timeouts either way, and the checkout on PYTHONPATH is the last resort.
PIP="$PY -m pip install -q --timeout 10 --retries 1"
if "$PY" -c "import cupy, numpy, pytest, hypothesis, PIL, tqdm, safetensors" 2>/dev/null; then
    stamp "CuPy $("$PY" -c 'import cupy; print(cupy.__version__)') and the test tools already installed"
    $PIP --no-deps --no-build-isolation -e . || stamp "editable install failed; using the checkout on PYTHONPATH"
elif "$PY" -c "import cupy" 2>/dev/null; then
    stamp "CuPy $("$PY" -c 'import cupy; print(cupy.__version__)') already installed; installing minidiff[test]"
    $PIP -e ".[test]" || stamp "pip install failed; using the checkout on PYTHONPATH"
else
    stamp "installing minidiff[test,gpu]"
    $PIP -e ".[test,gpu]" || stamp "pip install failed; using the checkout on PYTHONPATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import minidiff.backend as b, sys; sys.exit(0 if b.gpu_available() else 1)"; then
    stamp "FAIL: CuPy is not importable or sees no GPU; nothing to check"
    exit 2
fi

# 2. The whole suite on cupy. MINIDIFF_BACKEND makes cupy the default backend; the backend_name
#    fixture also runs each parametrised test on numpy, and -m "gpu or not gpu" selects everything.
stamp "pytest with MINIDIFF_BACKEND=cupy"
MINIDIFF_BACKEND=cupy HYPOTHESIS_PROFILE=dev timeout 270 "$PY" -m pytest -q -m "gpu or not gpu" \
    --durations=10 "$@" 2>&1 | tee "$OUT_DIR/pytest.txt" | tail -40
test_rc=${PIPESTATUS[0]}
stamp "pytest exit code $test_rc"

# 3. The benchmark on the GPU. The training step of every config fits easily on a modern GPU.
stamp "benchmark --backend cupy"
timeout 170 "$PY" benchmarks/bench_speed.py --backend cupy --warmup 3 --reps 10 --timeout 60 \
    --json "$OUT_DIR/bench.json" 2>&1 | tee "$OUT_DIR/bench.txt"
bench_rc=${PIPESTATUS[0]}
stamp "benchmark exit code $bench_rc; done"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
