#!/usr/bin/env bash
# On a Hopper GPU machine: build the W4AFP8 extension, run the GPU kernel tests, benchmark the MoE layer.
#   bash scripts/gpu_kernels.sh [OUT_DIR]      (default results/kernels; logs and junit go there too)
# Needs torch with CUDA, triton, pytest and nvidia-cutlass==4.2.0.0 importable (PYTHONPATH is fine).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/results/kernels}"
mkdir -p "$out"
cd "$repo"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export EVALPIPE_KERNEL_BUILD_DIR="${EVALPIPE_KERNEL_BUILD_DIR:-/tmp/evalpipe-kernels}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
t0=$SECONDS
python -m runtime.kernels.build 2>&1 | tee "$out/build.log" || exit 1
echo "build: $((SECONDS - t0)) s"
python -m pytest -q -p no:cacheprovider --junitxml="$out/junit.xml" tests/test_gpu_kernels.py 2>&1 | tail -40 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "tests: rc=$tests_rc $((SECONDS - t0)) s"
python bench/moe_kernels.py --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench: rc=$bench_rc $((SECONDS - t0)) s"
exit $((tests_rc || bench_rc))
