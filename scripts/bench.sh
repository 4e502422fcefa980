#!/usr/bin/env bash
# The README's main job: sets everything up, then runs the quick benchmarks on this device and
# writes the report (bench/results/REPORT.md and PNG plots). Meant to end within 10 minutes on any
# CPU (issue #10): every measurement has a time budget, and the plan is printed before step 1.
#   0. the plan (bench/plan.py; arguments to this script go to it and to step 1): how long each step
#      will take here; where the whole would exceed its target (a slow or busy CPU), step 3 runs one
#      learning rate per optimizer instead of its sweep (and if need be fewer optimizers); the plan says so,
#   1. kernel throughput (bench/bench_kernels.py --quick),
#   2. optimizer.step() time and state bytes (bench/bench_step.py --quick),
#   3. training quality (bench/train_lm.py --quick), when that benchmark is present,
#   4. bench/report.py over the newest result of each benchmark and device.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The benchmarks need neither Lightning nor transformers (the integration tests do).
export LIMUON_NO_INTEGRATIONS="${LIMUON_NO_INTEGRATIONS:-1}"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
setup_s=$SECONDS
TRAIN_ARGS=""
if [ -f bench/train_lm.py ]; then
  # The plan goes to stderr; stdout: train_lm.py's extra arguments.
  TRAIN_ARGS=$(BENCH_SETUP_S=$SECONDS "$PY" bench/plan.py "$@")
fi
"$PY" bench/bench_kernels.py --quick "$@"
"$PY" bench/bench_step.py --quick
if [ -f bench/train_lm.py ]; then
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of plain words (flags and numbers)
  "$PY" bench/train_lm.py --quick $TRAIN_ARGS
fi
"$PY" bench/report.py
echo "# quick benchmark: done in $((SECONDS / 60)) min $((SECONDS % 60)) s, the set-up's ${setup_s} s included" >&2
