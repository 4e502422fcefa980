#!/usr/bin/env bash
# The README's test command: sets everything up, then runs the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
if "$PY" -m ruff --version >/dev/null 2>&1; then
  "$PY" -m ruff check .
else
  echo "ruff is not installed here: lint skipped" >&2
fi
"$PY" -m pytest -q "$@"
