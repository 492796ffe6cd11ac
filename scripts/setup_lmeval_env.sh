#!/usr/bin/env bash
# lm-eval's OpenAI-API client in its own virtual environment, used by tests/test_lm_eval_client.py to check our
# server against an independent harness. It sits on top of the main environment (a .pth entry makes torch,
# transformers, ... importable) so only lm-eval and its extra dependencies are installed (~30 s, ~250 MB), and
# its pins (e.g. an older python-dateutil) stay out of the main environment.
#   EVALPIPE_VENV          the main environment (must exist)
#   EVALPIPE_LMEVAL_VENV   where this one lives (default: "$EVALPIPE_VENV-lmeval")
# Prints the interpreter path on success; exits non-zero if the install failed.
set -euo pipefail

main_venv="${EVALPIPE_VENV:?set EVALPIPE_VENV to the main environment}"
venv="${EVALPIPE_LMEVAL_VENV:-$main_venv-lmeval}"
spec="lm-eval[api]==0.4.13"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating lm-eval environment in $venv" >&2
  python3 -m venv "$venv"
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$main_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/evalpipe-main-env.pth"
stamp="$venv/.evalpipe-lmeval-stamp"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$spec" ]; then
  echo "[setup] installing $spec" >&2
  "$venv/bin/python" -m pip --disable-pip-version-check -q install "$spec" >&2
  echo "$spec" > "$stamp"
fi
echo "$venv/bin/python"
