#!/usr/bin/env bash
# Builds Realm's CUDA kernels and runs every GPU check and the CUDA benchmark in one go, on a
# machine with an NVIDIA GPU, its driver and the CUDA toolkit (nvcc), from a checkout whose
# Python environment has the project installed (`pip install -e '.[test]'`; a .venv in the
# checkout is activated if there is one). No network is needed.
#
#   scripts/gpu_check.sh [--full]      # --full: the benchmark's full run (default: --quick)
#
# Steps: show the GPU; build the CPU library and the CUDA extension for this GPU's
# architecture only (fast); refuse to go on if CUDA is not usable (the reason is printed);
# run the CUDA tests (kernels against the CPU and the references, whole models, tenants,
# paging, the runtime) and the benchmark. Logs go to $OUT (default build/gpu-check).
# Exit status: 0 when the tests passed, else non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
out=${OUT:-build/gpu-check}
mkdir -p "$out"
quick=--quick
if [ "${1:-}" = "--full" ]; then quick=; fi

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
export REALM_CUDA_ARCHS=${REALM_CUDA_ARCHS:-${cap:-90}}

echo "== build (sm_$REALM_CUDA_ARCHS)"
timeout 600 python build_ffi.py > "$out/build.txt" 2>&1 || { cat "$out/build.txt"; exit 1; }
timeout 600 python build_cuda.py >> "$out/build.txt" 2>&1 || { cat "$out/build.txt"; exit 1; }
python - <<'PY' || exit 1
from realm import kernels
status = kernels.cuda_status()
print("cuda:", status)
raise SystemExit(0 if status.startswith("ok") else 1)
PY

echo "== tests"
timeout 900 python -m pytest -q -rs -p no:cacheprovider \
    tests/kernels/test_cuda_kernels.py tests/kernels/test_cuda_device.py \
    tests/kernels/test_cuda_plumbing.py tests/kernels/test_cuda_build.py 2>&1 | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}

echo "== benchmark"
timeout 900 python -m benchmarks.cuda $quick 2>&1 | tee "$out/bench.txt"

echo "== done: tests exit status $tests; logs in $out"
exit "$tests"
