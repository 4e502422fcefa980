"""The plan of the quick benchmark suite: how long each part of ``scripts/bench.sh`` will take on this
device, printed (stderr) before the first part starts, and train_lm.py's extra arguments (stdout).

Issue #10: the quick suite must end in under 10 minutes on any CPU and say as it starts how long it will
take. ``bench_kernels.py`` and ``bench_step.py`` time every measurement within a budget, so the sum of
their budgets bounds them (``plan()`` of each). ``train_lm.py --quick`` trains a fixed number of steps:
its time is estimated by a few-step probe of each optimizer (``train_lm.run_seconds``), run here with
the threads the training will use. Each script's start (importing torch and the packages) is counted at
what this process's own start cost; ``report.py`` at the same again.

When the whole (with the set-up already spent, ``BENCH_SETUP_S`` from scripts/bench.sh) would exceed
``TARGET_S`` (a CPU much slower or busier than the 2-core machine the quick suite was sized on), training
runs one learning rate per optimizer instead of its 2-point sweep (the best at equal steps in the newest
recorded quick training run, else the sweep's first), and if that is still too long, only the optimizers
of the paper's ordering (``CORE``). The train records say which lrs and optimizers ran (``case.lr_sweep``,
their runs), and so does bench/report.py. What is printed on stdout is that choice as train_lm.py
arguments (nothing when the full sweep fits).

    python bench/plan.py [arguments of bench_kernels.py]
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_kernels  # noqa: E402
import bench_step  # noqa: E402
import torch  # noqa: E402
import train_lm  # noqa: E402
from _common import RESULTS_DIR, fmt_duration, log  # noqa: E402

TARGET_S = 8.5 * 60  # the 10-minute promise, less a margin for the estimates' error (train's: ~20% seen)
CORE = ("adamw", "muon", "limuon1-exact")  # the three of the paper's ordering (docs/ALGORITHM.md §6)
SWEEP_REFERENCE = {"adamw": "adamw", "matrix": "muon", "exact": "limuon1-exact"}  # whose best lr a sweep keeps


def recorded_best_lrs(results: Path | None = None) -> tuple[dict[str, list[float]], str]:
    """One lr per sweep (the newest quick train results' best at equal steps in ``results``, default
    bench/results, else the sweep's first) and where it came from. Only runs that swept lrs count: the
    best of a run shortened to one lr (by this plan) says nothing."""
    results = results or RESULTS_DIR
    lrs = {k: v[:1] for k, v in train_lm.LRS_QUICK.items()}
    best: dict[str, dict] = {}
    for path in sorted(results.glob("train-*.json")):
        for r in json.loads(path.read_text()):
            sweeps = ((r.get("case") if isinstance(r.get("case"), dict) else None) or {}).get("lr_sweep") or {}
            swept = all(len(v) > 1 for v in sweeps.values())
            usable = r.get("record") == "best" and r.get("quick") and (r.get("equal_steps") or {}).get("lr")
            if usable and swept and str(r.get("date", "")) >= str(best.get(r["provider"], {}).get("date", "")):
                best[r["provider"]] = r
    found = []
    for sweep, key in SWEEP_REFERENCE.items():
        if (r := best.get(train_lm.SPECS[key].label)) is not None:
            lrs[sweep] = [r["equal_steps"]["lr"]]
            found.append(str(r.get("date", "?"))[:10])
    return lrs, f"best of the quick run of {max(found)}" if found else "each sweep's first"


def train_plan(dev: torch.device, budget_s: float) -> tuple[float, list[str], str]:
    """(seconds, train_lm.py arguments, what they mean) of ``train_lm.py --quick``: the first of its full
    lr sweep, one lr per optimizer, and one lr for ``CORE`` only that fits in ``budget_s`` (else the last)."""
    train_lm.cpu_threads(None, dev)
    cfg = dataclasses.replace(train_lm.QUICK, bf16=dev.type == "cuda")
    names, lrs = list(train_lm.SPECS), train_lm.LRS_QUICK
    train_data, val_data, _ = train_lm.load_corpus()
    per_run = train_lm.run_seconds(cfg, names, lrs, train_data, val_data, dev)
    full = sum(len(lrs[train_lm.SPECS[k].sweep]) * s for k, s in per_run.items())
    if full <= budget_s:
        return full, [], "the full lr sweep"
    one, whence = recorded_best_lrs()
    args = [a for sweep, flag in (("adamw", "--adamw-lrs"), ("matrix", "--matrix-lrs"), ("exact", "--exact-lrs"))
            for a in (flag, f"{one[sweep][0]:g}")]  # fmt: skip
    how = f"{whence}; the full sweep ≈ {fmt_duration(full)}"
    if sum(per_run.values()) <= budget_s:
        return sum(per_run.values()), args, f"one lr per optimizer, {how}"
    labels = ", ".join(train_lm.SPECS[k].label for k in CORE)
    return sum(per_run[k] for k in CORE), [*args, "--optimizers", ",".join(CORE)], f"one lr, {labels} only, {how}"


def main(argv: list[str] | None = None) -> int:
    startup = time.perf_counter() - T0
    kernels_args = bench_kernels.parse_args(["--quick", *(sys.argv[1:] if argv is None else argv)])
    dev = torch.device(kernels_args.device)
    kernels = bench_kernels.plan(kernels_args)[0] + startup
    step = bench_step.plan(bench_step.parse_args(["--quick", "--device", str(dev)]))[0] + startup
    report = startup
    before = float(os.environ.get("BENCH_SETUP_S", 0))  # scripts/bench.sh's set-up, already spent
    # What is left for training: the target less the set-up, the other parts, its start-up and this plan's.
    train, train_args, how = train_plan(dev, TARGET_S - before - kernels - step - report - 2 * startup)
    train += startup
    meta = bench_kernels.run_meta(dev, True)  # after train_plan: it may have chosen 1 thread
    total = before + time.perf_counter() - T0 + kernels + step + train + report
    log(f"# quick benchmark plan on {meta['device']}: kernels ≤ {fmt_duration(kernels)}, step ≤ "
        f"{fmt_duration(step)}, train ≈ {fmt_duration(train)} ({how}), report ≈ {fmt_duration(report)} (each "
        f"with its start-up, {fmt_duration(startup)}): at most about {fmt_duration(total)} on this device, "
        f"set-up ({fmt_duration(before)}) and this plan included")
    if total > TARGET_S:
        log(f"# warning: that is over the {TARGET_S / 60:.1f}-minute target: this CPU is slow or busy "
            f"(load average {meta['loadavg_1m']:.1f})")
    print(" ".join(train_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
