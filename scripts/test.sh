#!/usr/bin/env bash
# Run the test suite, setting up the environment first if needed. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
# Tests never reach the network: hub look-ups fail fast instead of waiting on timeouts.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
