#!/usr/bin/env bash
# On a GPU machine: build the R1-width synthetic checkpoints (FP8 and W4AFP8), serve each variant and MoE backend,
# sweep concurrency 1, 16, 64 after a warm-up with bench/serving.py, compare greedy outputs with the torch backend,
# and write results/serving/<gpu>.md (+ .json). Exits non-zero on any failed request, 5xx or engine error.
#   bash scripts/gpu_serving.sh OUT_DIR [extra bench/gpu_serving.py options]
# Needs: torch with CUDA, triton, the serving dependencies, nvidia-cutlass==4.2.0.0 (cutlass backend), and a
# tokenizer directory in $TOKENIZER (default: the demo model's, $EVALPIPE_CACHE/models/smollm2-moe-fp8).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: gpu_serving.sh OUT_DIR [options]}"
shift
mkdir -p "$out"
cd "$repo"
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export EVALPIPE_KERNEL_BUILD_DIR="${EVALPIPE_KERNEL_BUILD_DIR:-/tmp/evalpipe-kernels}"
tokenizer="${TOKENIZER:-${EVALPIPE_CACHE:-$HOME/.cache/evalpipe}/models/smollm2-moe-fp8}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python -m runtime.kernels.build > "$out/build.log" 2>&1 || { echo "extension build failed: $out/build.log"; exit 1; }
python bench/gpu_serving.py --work "${WORK:-/tmp/evalpipe-serving}" --out "$repo/results/serving" \
    --tokenizer "$tokenizer" "$@" 2>&1 | tee "$out/gpu_serving.log"
rc=${PIPESTATUS[0]}
cp "$repo"/results/serving/*.md "$repo"/results/serving/*.json "$out"/ 2>/dev/null
exit "$rc"
