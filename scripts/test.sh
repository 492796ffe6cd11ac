#!/usr/bin/env bash
# Run the test suite, setting up the environment first if needed. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
# lm-eval and EvalScope (independent harnesses: an OpenAI-API client, cross-check graders) each get their own
# environment on top of this one (scripts/setup_extra.sh); without one, the tests that need it are skipped.
for extra in lmeval evalscope; do
  var="EVALPIPE_${extra^^}_PYTHON"
  if [ -z "${!var:-}" ]; then
    python_path="$(bash "$repo/scripts/setup_extra.sh" "$extra")" \
      || { echo "[setup] $extra environment unavailable; its tests will be skipped" >&2; python_path=""; }
    export "$var=$python_path"
  fi
done
# Tests never reach the network: hub look-ups fail fast instead of waiting on timeouts.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
