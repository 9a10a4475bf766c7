#!/usr/bin/env bash
# One prepared GPU check, for a machine with an NVIDIA GPU where CuPy is
# already installed and there may be no network. It installs nothing. From the repository root:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh [extra pytest args]
#
#   1. the machine: nvidia-smi, CuPy and its view of the GPU          -> $OUT/env.txt
#   2. the gpu-marked tests on the real CuPy: every backend-parametrised test's cupy case and
#      the CLI smoke of every path with --backend cupy (tests/test_cli.py), MINIDIFF_BACKEND=cupy
#      without --backend included                                      -> $OUT/pytest.txt, pytest.xml
#   3. the per-step count on the strict stand-in, for reference       -> $OUT/count_step.txt
#   4. bench_speed.py --backend cupy, against PyTorch CUDA when torch sees the GPU
#                                                                      -> $OUT/bench.txt, bench.json
# Budget: under 8 minutes (timeouts: tests 240 s, count 30 s, benchmark 180 s; the rest is seconds).
# Everything it writes goes under $OUT (default /tmp/gpu_check_out), temporary files included.
# Exit status: 0 when every stage passed, 1 when one failed, 2 when there is no GPU or CuPy to check.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT_DIR/tmp"
export TMPDIR="$OUT_DIR/tmp"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the checkout itself: nothing to install
export MINIDIFF_STRICT_CUPY=0                         # the real CuPy, never the stand-in, for stage 2
export PIP_NO_INDEX=1                                 # no network: nothing may try to download
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$OUT_DIR/tmp/cupy_kernel_cache}  # compiled kernels, deleted at the end
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT_DIR/log.txt"; }
failed=0

# 1. The machine. Stop early, installing nothing, where there is nothing to check.
if ! gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null); then
    stamp "FAIL: nvidia-smi finds no NVIDIA GPU here; nothing to check"
    exit 2
fi
{ echo "gpu: $gpu"; nvidia-smi 2>&1 | head -15; } > "$OUT_DIR/env.txt"
if ! "$PY" - >> "$OUT_DIR/env.txt" 2>&1 <<'EOF'
import sys
import cupy, numpy
import minidiff.backend as b
ok, why = b.gpu_status()
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| cupy", cupy.__version__,
      "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "| devices", cupy.cuda.runtime.getDeviceCount())
print("minidiff sees the GPU:", ok, why)
try:                                   # the reference the benchmark compares with, where there is one
    import torch
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| sees the GPU:", torch.cuda.is_available())
except ImportError:
    print("torch: not installed (the benchmark runs minidiff alone)")
sys.exit(0 if ok else 1)
EOF
then
    stamp "FAIL: CuPy is not importable or sees no GPU (see $OUT_DIR/env.txt); install the extra the README names"
    cat "$OUT_DIR/env.txt"
    exit 2
fi
for tool in pytest hypothesis PIL tqdm safetensors; do
    if ! "$PY" -c "import $tool" 2>/dev/null; then
        stamp "FAIL: $tool is missing and this check installs nothing: pip install -e '.[test]' first"
        exit 2
    fi
done
stamp "machine: $gpu; $(grep "^python " "$OUT_DIR/env.txt"); $(grep "^torch" "$OUT_DIR/env.txt")"

# 2. The gpu-marked tests and the CLI smoke on the real CuPy.
stamp "pytest -m gpu on the real CuPy (cupy cases of the backend tests, CLI smoke of every path)"
MINIDIFF_BACKEND=cupy HYPOTHESIS_PROFILE=dev timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    --basetemp="$OUT_DIR/tmp/pytest" --junitxml="$OUT_DIR/pytest.xml" --durations=10 "$@" \
    > "$OUT_DIR/pytest.txt" 2>&1
test_rc=$?
tail -25 "$OUT_DIR/pytest.txt"
stamp "pytest exit code $test_rc"
[ "$test_rc" -eq 0 ] || failed=1
rm -rf "$OUT_DIR/tmp/pytest"   # checkpoints and pictures of the smoke: only the reports are kept

# 3. What a training step asks of the GPU, counted on the stand-in (the figure the tests hold).
stamp "count_step.py (strict stand-in, for reference)"
MINIDIFF_STRICT_CUPY=1 timeout 30 "$PY" benchmarks/count_step.py --json "$OUT_DIR/count_step.json" \
    > "$OUT_DIR/count_step.txt" 2>&1 || failed=1
head -9 "$OUT_DIR/count_step.txt"

# 4. The speed benchmark on the GPU (minidiff on CuPy against PyTorch CUDA where torch sees the GPU).
stamp "bench_speed.py --backend cupy"
timeout 180 "$PY" benchmarks/bench_speed.py --backend cupy --warmup 3 --reps 10 --timeout 60 \
    --json "$OUT_DIR/bench.json" > "$OUT_DIR/bench.txt" 2>&1
bench_rc=$?
cat "$OUT_DIR/bench.txt"
stamp "benchmark exit code $bench_rc"
[ "$bench_rc" -eq 0 ] || failed=1

rm -rf "$OUT_DIR/tmp"
stamp "done: tests $test_rc, benchmark $bench_rc; reports in $OUT_DIR"
exit "$failed"
