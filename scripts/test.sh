#!/usr/bin/env bash
# The README's test command: sets everything up, then runs the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
