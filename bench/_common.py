"""Helpers shared by the benchmarks in bench/: timing, run metadata, result files, tables.

Timing: every measurement has a time budget (wall seconds, warm-up included) so that a quick run
ends in a known time on any device (issue #10). Its first call is the warm-up and the probe; then on
CUDA ``triton.testing.do_bench`` (imported only there: triton's driver needs a GPU), on CPU
``torch.utils.benchmark`` blocked_autorange for fast calls, single timed calls for slow ones, as many
as the budget holds. A measurement the budget cut short says so in its record (``Timing``: one call,
``"timeboxed": true``); a case that would take far too long is not started: a smaller case is timed
and extrapolated, and the record says which (``"extrapolated": true``, ``measured_case``).
Every record carries the run metadata of ``run_meta`` (device, versions, date, commit, 1-minute
load average: CPU timings share the cores with whatever else runs).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

RESULTS_DIR = Path(__file__).parent / "results"

Fn = Callable[[], object]


def quantile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    v = sorted(values)
    pos = p * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize_ms(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds of per-call times given in seconds."""
    return tuple(1e3 * quantile(seconds, p) for p in (0.5, 0.2, 0.8))


def time_call(fn: Fn) -> float:
    """Wall seconds of one call (CPU)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- time-boxed measurement -----------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """One measurement: quantiles of its timed calls and how its time budget shaped it.

    ``calls`` timed calls (None: ``do_bench`` chose them) after ``warmup_calls`` untimed ones, all
    within ``budget_s`` wall seconds. ``timeboxed``: the budget cut the measurement short of its
    plan (its warm-up and minimum number of calls); with ``calls == 1`` and ``warmup_calls == 0``
    the one sample is the first call, which also paid any one-time cost. ``extrapolated``: the case
    itself was not run; ``measured_case`` was timed once (``measured_ms``) and the quantiles are that
    time times ``scale``, an estimate, not a measurement.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    calls: int | None
    warmup_calls: int
    budget_s: float | None
    timeboxed: bool = False
    extrapolated: bool = False
    measured_case: str | None = None
    measured_ms: float | None = None
    scale: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float], warmup_calls: int, budget_s: float | None, timeboxed: bool) -> Timing:
        return cls(*summarize_ms(seconds), len(seconds), warmup_calls, budget_s, timeboxed)

    def fields(self) -> dict[str, Any]:
        """The record fields (every key always present, so the rows of a table agree)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Smaller:
    """A smaller case of a measurement: ``fn`` does about ``1/scale`` of its work; ``what`` names it."""

    fn: Fn
    scale: float
    what: str


def sample_calls(
    call: Callable[[], float],
    budget_s: float,
    *,
    warmup: int = 1,
    min_calls: int = 3,
    max_calls: int = 10,
    start: float | None = None,
    first: float | None = None,
) -> Timing:
    """Call ``call`` (it returns the seconds to record for one call) within ``budget_s`` wall seconds
    counted from ``start`` (default: now). ``first``: the recorded seconds of a first call already made.

    The first call is warm-up call 1 and the probe. A further call starts only if, lasting as long as
    the call before it, it ends within the budget (a further warm-up only if one timed call still fits
    after it), so the measurement ends by the budget unless its first call alone overruns it. Timed
    calls stop at ``max_calls``. When no timed call fits, the first call is the sample (timeboxed).
    """
    start = time.perf_counter() if start is None else start

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        value = call()
        return value, time.perf_counter() - t0

    value, wall = (first, first) if first is not None else run()
    warm, samples = 1, []
    while warm < warmup and budget_s - (time.perf_counter() - start) >= 2 * wall:
        _, wall = run()
        warm += 1
    while len(samples) < max_calls and budget_s - (time.perf_counter() - start) >= wall:
        v, wall = run()
        samples.append(v)
    if not samples:
        return Timing.of([value], 0, budget_s, timeboxed=True)
    return Timing.of(samples, warm, budget_s, timeboxed=len(samples) < min_calls or warm < warmup)


def _one_call(fn: Fn, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def extrapolate(smaller: Smaller, cuda: bool, budget_s: float, start: float) -> Timing | None:
    """Time ``smaller`` once; if its time times ``scale`` would not fit in what is left of ``budget_s``
    (counted from ``start``), the extrapolated Timing (the case must not be started), else None."""
    t = _one_call(smaller.fn, cuda)
    est = t * smaller.scale
    if est <= budget_s - (time.perf_counter() - start):
        return None
    ms, how = 1e3 * est, dict(measured_case=smaller.what, measured_ms=1e3 * t, scale=smaller.scale)
    return Timing(ms, ms, ms, 0, 0, budget_s, timeboxed=True, extrapolated=True, **how)


def measure_within(fn: Fn, budget_s: float, *, cuda: bool, quick: bool, smaller: Smaller | None = None) -> Timing:
    """Time ``fn`` in at most about ``budget_s`` wall seconds (more only if its first call alone takes longer).

    ``smaller``: where a call may take far too long to start blindly (bf16 matmuls on a CPU without bf16
    units, see ``bf16_matmul_native``), time the smaller case first and extrapolate by its ``scale``:
    the case runs only if that estimate fits in the budget. The first call of ``fn`` is the warm-up and
    the probe (CUDA: the second, the budget starting after the first, which may compile kernels); then
    CUDA: ``triton.testing.do_bench`` (median, p20, p80); CPU: ``torch.utils.benchmark`` blocked_autorange
    for calls much shorter than its run time; else single timed calls (``sample_calls``).
    """
    start = time.perf_counter()
    if smaller is not None and (est := extrapolate(smaller, cuda, budget_s, start)) is not None:
        return est
    first = _one_call(fn, cuda)
    if cuda:  # the first call may have compiled kernels (seconds): the budget starts after it
        start, first = time.perf_counter(), _one_call(fn, cuda)
    left = budget_s - (time.perf_counter() - start)
    if cuda and 10 * first < left:
        from triton.testing import do_bench  # only here: triton's driver needs a GPU

        med, p20, p80 = do_bench(fn, warmup=25, rep=50 if quick else 200, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, None, 2, budget_s)  # and do_bench's own warm-up
    run_time = 0.4 if quick else 2.0
    if not cuda and first < run_time / 10 and left > 2 * first:  # fast calls: timer overhead matters
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min(run_time, left / 2))
        return Timing(*summarize_ms(m.times), m.number_per_run * len(m.times), 1, budget_s)
    return sample_calls(
        lambda: _one_call(fn, cuda), budget_s, min_calls=3, max_calls=10 if quick else 25, start=start, first=first
    )


def measure(fn: Fn, cuda: bool, quick: bool, budget_s: float | None = None) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds per call of ``measure_within`` (default budget: 2 s quick, 10 s)."""
    t = measure_within(fn, budget_s or (2.0 if quick else 10.0), cuda=cuda, quick=quick)
    return t.median_ms, t.p20_ms, t.p80_ms


def timing_note(r: Mapping[str, Any]) -> str:
    """A short mark for progress logs of a record's ``Timing`` fields: empty for a measurement as planned."""
    if r.get("extrapolated"):
        return f" (extrapolated, not run: measured {r['measured_case']}: {r['measured_ms']:.1f} ms)"
    return f" (timeboxed: {r['calls']} call(s) in the {r['budget_s']:g} s budget)" if r.get("timeboxed") else ""


def bf16_matmul_native(dev: torch.device) -> bool:
    """Whether ``dev`` has bf16 matrix instructions: CUDA yes; a CPU as limuon_kernels decides its Newton–Schulz
    dtype (AVX512-BF16 or AMX). Without them torch's CPU bf16 matmul can be ~100x slower than fp32 (issue #10:
    0.9 against 119 GFLOP/s on an AVX2 CPU), so a bf16 peer there is first timed on a smaller case."""
    if dev.type != "cpu":
        return dev.type == "cuda"
    from limuon_kernels import cpu_features

    return cpu_features.has_native_bf16_matmul()


def fmt_duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def print_plan(bench: str, seconds: float, how: str) -> None:
    """The up-front estimate a benchmark prints as it starts: ``seconds`` is an upper bound, ``how`` says whence."""
    line = f"# plan: {bench} takes at most about {fmt_duration(seconds)} on this device ({how})"
    print(line, flush=True)


def platform_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform_cpu_model()
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_slug(dev: torch.device, name: str) -> str:
    """File-name form of a device: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().split("(")[0]).strip("-")
    return slug if dev.type == "cuda" else f"cpu-{slug}-{os.cpu_count()}c"


def run_meta(dev: torch.device, quick: bool, bench: str = "kernels") -> dict:
    """Fields shared by every record of this run."""
    try:
        triton_version: str | None = importlib.metadata.version("triton")  # no import: no driver query
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    git = ["git", "rev-parse", "--short", "HEAD"]
    try:
        commit = subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
    except (OSError, subprocess.CalledProcessError):
        commit = None
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {
        **{"bench": bench, "device": device_name(dev), "torch": torch.__version__, "triton": triton_version},
        **{"date": now, "commit": commit and commit.stdout.strip(), "quick": quick},
        "loadavg_1m": os.getloadavg()[0],  # CPU timings share the cores with whatever else runs
    }


def warn_if_loaded(meta: dict, dev: torch.device) -> None:
    if dev.type != "cuda" and meta["loadavg_1m"] > 0.5 * (os.cpu_count() or 1):
        print(f"# warning: load average {meta['loadavg_1m']:.1f}; other processes compete, expect noise")


def write_records(records: list[dict], bench: str, dev: torch.device, out: str | None) -> Path | None:
    """Write ``records`` as one JSON list to ``out`` (default ``bench/results/<bench>-<device>-<date>.json``;
    ``"-"``: nowhere). Returns the path written."""
    if out == "-" or not records:
        return None
    default = RESULTS_DIR / f"{bench}-{device_slug(dev, records[0]['device'])}-{datetime.date.today()}.json"
    path = Path(out) if out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    print(f"# wrote {len(records)} records to {path}")
    return path


def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], n_left: int) -> str:
    """A plain-text table: the first ``n_left`` columns left-aligned, the rest right-aligned."""
    table = [tuple(head), *(tuple(r) for r in rows)]
    widths = [max(len(x) for x in col) for col in zip(*table)]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(x.ljust(w) if j < n_left else x.rjust(w) for j, (x, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
