#!/usr/bin/env bash
# Run the test suite, setting up the environment first if needed. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
# lm-eval (an independent OpenAI-API client) gets its own environment; without it its test is skipped.
if [ -z "${EVALPIPE_LMEVAL_PYTHON:-}" ]; then
  EVALPIPE_LMEVAL_PYTHON="$(bash "$repo/scripts/setup_lmeval_env.sh")" \
    || { echo "[setup] lm-eval environment unavailable; its test will be skipped" >&2; EVALPIPE_LMEVAL_PYTHON=""; }
  export EVALPIPE_LMEVAL_PYTHON
fi
# Tests never reach the network: hub look-ups fail fast instead of waiting on timeouts.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
