#!/usr/bin/env bash
# The README's main job: sets everything up, then runs the quick kernel benchmark on this device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" bench/bench_kernels.py --quick "$@"
