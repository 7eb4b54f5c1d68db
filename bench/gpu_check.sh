#!/usr/bin/env bash
# GPU check for the kernels (issue 3): on a machine with an NVIDIA GPU, run the kernel tests with the
# Triton kernels COMPILED (not interpreted) and the kernel benchmark; print everything.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (from the repository root; OUT_DIR default: ./gpu_check_out)
#
# Needs torch with CUDA and triton importable (pip install -e .[test] once if they are not; this
# script installs only what is missing: pytest, pytest-timeout, matplotlib). Takes a few minutes:
# most of it is Triton compiling and autotuning the configs on first use.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
export PYTHONPATH="${PYTHONPATH:-}"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
"$PY" - <<'EOF' || { echo "torch with CUDA is required"; exit 1; }
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF

# the package: installed (editable) or importable from this checkout
if ! "$PY" -c "import scaleswap.kernels.ops" 2>/dev/null; then
    echo "== scaleswap not installed: pip install -e . --no-deps"
    "$PY" -m pip install -q --no-deps -e . || exit 1
fi
for mod in pytest pytest_timeout matplotlib; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q "${mod/_/-}"
done

status=0
echo "== kernel tests (compiled Triton on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'))"
"$PY" -m pytest tests/kernels -q -p no:cacheprovider --timeout 900 -rs 2>&1 | tee "$OUT/tests.log" || status=1

echo "== kernel benchmark (Triton vs cuBLAS fp16 vs roofline)"
# default: 4-bit, per channel and g128, every shape and M (autotuning every (shape, M) bucket takes most
# of the time); BENCH_ARGS="" runs the full default set of bench/kernels.py
"$PY" bench/kernels.py --device cuda --json "$OUT/kernels_gpu.json" --png "$OUT/kernels_gpu.png" \
    ${BENCH_ARGS---bits 4 --group-sizes=-1,128} 2>&1 | tee "$OUT/bench.log" || status=1

echo "== done (status $status); logs, JSON and PNG in $OUT/"
exit $status
