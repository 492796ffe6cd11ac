#!/usr/bin/env bash
# Create or reuse the environment of one optional harness extra: `bash scripts/setup_extra.sh lmeval|evalscope`.
#
# The extras cannot share an environment (evalscope pins antlr4 4.13.2 and datasets<=4.8.4, lm-eval[math] pins
# antlr4 4.11), and neither belongs in the core one. Each gets its own environment layered on the core one: a .pth
# entry makes the core packages (torch, transformers, ...) importable, so only the extra and what it needs beyond
# them is installed, and its own pins shadow the core's without changing the core environment.
#   EVALPIPE_VENV              the core environment (created by scripts/setup_env.sh when missing)
#   EVALPIPE_LMEVAL_VENV       where the lmeval one lives (default: "$EVALPIPE_VENV-lmeval", e.g. .venv-lmeval)
#   EVALPIPE_EVALSCOPE_VENV    where the evalscope one lives (default: "$EVALPIPE_VENV-evalscope")
# The requirement is the extra's entry in pyproject.toml, pinned by constraints-<extra>.txt. Safe to run again
# (installs only when those files changed). Prints the environment's python on stdout; exits non-zero on failure.
set -euo pipefail

extra="${1:-}"
case "$extra" in
  lmeval) module=lm_eval; venv_var=EVALPIPE_LMEVAL_VENV ;;
  evalscope) module=evalscope; venv_var=EVALPIPE_EVALSCOPE_VENV ;;
  *) echo "usage: $0 lmeval|evalscope" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh" >&2  # the core environment, in $EVALPIPE_VENV
core="$EVALPIPE_VENV"
venv="${!venv_var:-$core-$extra}"
constraints="$repo/constraints-$extra.txt"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating the $extra environment in $venv (on top of $core)" >&2
  "$core/bin/python" -m venv "$venv"  # the same Python as the environment it sits on
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$core/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/evalpipe-main-env.pth"

requirements="$("$core/bin/python" - "$repo/pyproject.toml" "$extra" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"][sys.argv[2]]))
PY
)"
stamp="$venv/.evalpipe-extra-stamp"
want="$(printf '%s\n%s\n' "$requirements" "$core" | cat - "$constraints" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $(echo $requirements) into $venv" >&2
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install -U pip "setuptools>=77" >&2
  mapfile -t specs <<< "$requirements"
  "${pip[@]}" install -c "$constraints" "${specs[@]}" >&2
  "$venv/bin/python" -c "import $module" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
