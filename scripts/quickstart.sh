#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine: set up the environment, then evaluate.
#
# Today the embedded default is configs/smoke.yaml against the in-repo fake OpenAI server (deterministic
# answers, some truncations), started here on a free loopback port and stopped on exit. When a config starts
# its own servers (`launch:`), only the last step remains: `evalpipe run <that config>`.
#   usage: bash scripts/quickstart.sh [extra evalpipe run options, e.g. --dry-run]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"

config="configs/smoke.yaml"

# --- fake endpoint for the smoke config -------------------------------------------------------------------
workdir="$(mktemp -d)"
python -m evalpipe.testing.fake_server --answer-key-for "$config" --port-file "$workdir/port" \
  --accuracy 0.7 --truncation-rate 0.06 --no-answer-rate 0.03 --tokens-per-s 300 \
  > "$workdir/server.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$workdir"' EXIT
for _ in $(seq 600); do
  [ -s "$workdir/port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$workdir/server.log" >&2; exit 3; }
  sleep 0.1
done
[ -s "$workdir/port" ] || { echo "fake server did not start" >&2; exit 3; }
export EVALPIPE_BASE_URL="http://127.0.0.1:$(cat "$workdir/port")/v1"
# -----------------------------------------------------------------------------------------------------------

evalpipe run "$config" "$@"
