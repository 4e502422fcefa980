"""Helpers shared by the benchmarks in bench/: timing, run metadata, result files, tables.

Timing: on CUDA ``triton.testing.do_bench`` (imported only there: triton's driver needs a GPU); on
CPU ``torch.utils.benchmark`` blocked_autorange for fast calls, single timed calls for slow ones.
Every record carries the run metadata of ``run_meta`` (device, versions, date, commit, 1-minute
load average: CPU timings share the cores with whatever else runs).
"""

from __future__ import annotations

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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils import benchmark

RESULTS_DIR = Path(__file__).parent / "results"
SLOW_CALL_S = 1.5  # CPU: a first call slower than this is timed by single calls, not autorange

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


def measure(fn: Fn, cuda: bool, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds per call; the first (CPU) call is a warm-up."""
    if cuda:
        from triton.testing import do_bench  # only here: triton's driver needs a GPU

        med, p20, p80 = do_bench(fn, warmup=25, rep=50 if quick else 200, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    times = [time_call(fn)]  # warm-up, and a probe for pathological cases (bf16 matmuls on CPUs without bf16 units)
    if times[0] > SLOW_CALL_S:  # quick: that one call is the sample; else 3 more single calls
        times = times if quick else [time_call(fn) for _ in range(3)]
    else:
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        times = timer.blocked_autorange(min_run_time=0.4 if quick else 2.0).times
    return summarize_ms(times)


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
