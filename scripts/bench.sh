#!/usr/bin/env bash
# The README's main job: sets everything up, then runs the quick benchmarks on this device and
# writes the report (bench/results/REPORT.md and PNG plots):
#   1. kernel throughput (bench/bench_kernels.py --quick; arguments to this script go to it),
#   2. optimizer.step() time and state bytes (bench/bench_step.py --quick),
#   3. training quality (bench/train_lm.py --quick), when that benchmark is present,
#   4. bench/report.py over the newest result of each benchmark and device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" bench/bench_kernels.py --quick "$@"
"$PY" bench/bench_step.py --quick
if [ -f bench/train_lm.py ]; then
  "$PY" bench/train_lm.py --quick
fi
"$PY" bench/report.py
