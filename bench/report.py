"""One report from the benchmark results: markdown tables and PNG plots of bench/results/*.json.

What it reads: every JSON file in the results folder: a list of records (or ``{"records": [...]}``,
or one record per line), each with ``bench`` ("kernels", "step" or "train"; else the file-name
prefix), ``device`` and ``case`` (a string, or a dict whose ``name`` is used). Of several files
for the same (bench, device) only the newest is used (by the records' ``date``, then the file's
modification time), so older runs stay on disk without being mixed into the tables.

What it writes (to stdout and ``<results>/REPORT.md``):

- Kernels (bench/bench_kernels.py): median ms per call of every op, shape and provider, its
  throughput (FLOP/s or effective GB/s), % of the matmul/copy peak measured in that run, and the
  speedup over the reference (``torch``) backend in the same run.
- Step (bench/bench_step.py): ``optimizer.step()`` time per optimizer (median and p20–p80), its
  ratio to torch's AdamW, persistent optimizer state (total and the hidden matrices' part) and
  the GPU peak memory.
- Train (bench/train_lm.py): final validation loss per run; with its ``best`` records, the best
  learning rate's validation loss per optimizer at equal steps and at equal gradient evaluations,
  and its verdict lines. Absent train results are simply left out.

Time-boxed measurements (bench/_common.py ``Timing``) are marked: † a time the budget cut short (fewer
timed calls than planned; one call: the first, one-time costs included), ‡ a case not run whose time
is extrapolated from a smaller one; a list under each table says what each marked row is.

Plots (bench/report_plots.py; matplotlib, Agg backend; skipped with a note if matplotlib is missing or
``--no-plots``): ``kernels.png``, ``step.png`` and ``loss.png``.

    python bench/report.py [--results bench/results] [--no-plots]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
BENCHES = ("kernels", "step", "train")
MB = 2**20

Record = dict[str, Any]


# -- loading --------------------------------------------------------------------------------------


def read_records(path: Path) -> list[Record]:
    """The records of one result file (a JSON list, ``{"records": [...]}``, one object, or JSON lines)."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("records", [data])
    return [_with_case_name(r) for r in data if isinstance(r, dict)]


def _with_case_name(r: Record) -> Record:
    """A record whose ``case`` is a description (a dict) gets its ``name`` as ``case``, the dict kept."""
    case = r.get("case")
    if isinstance(case, dict):
        name = case.get("name") or json.dumps(case, sort_keys=True)
        return {**r, "case": str(name), "case_config": case}
    return r


def _timestamp(date: Any) -> float:
    try:
        return datetime.datetime.fromisoformat(str(date)).timestamp()
    except ValueError:
        return -math.inf


def load_results(results: Path) -> dict[tuple[str, str], tuple[Path, list[Record]]]:
    """{(bench, device): (newest file, its records)} over the JSON files in ``results``."""
    newest: dict[tuple[str, str], tuple[tuple[float, float], Path, list[Record]]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            records = read_records(path)
        except (OSError, ValueError) as exc:
            print(f"# skipped {path.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        groups: dict[tuple[str, str], list[Record]] = {}
        for r in records:
            bench = r.get("bench") or path.name.split("-", 1)[0]
            groups.setdefault((bench, str(r.get("device", "unknown device"))), []).append(r)
        for key, recs in groups.items():
            when = (max(_timestamp(r.get("date")) for r in recs), path.stat().st_mtime)
            if key not in newest or when > newest[key][0]:
                newest[key] = (when, path, recs)
    return {key: (path, recs) for key, (_, path, recs) in sorted(newest.items())}


# -- formatting -----------------------------------------------------------------------------------


def md_table(head: Sequence[str], rows: Iterable[Sequence[str]], n_left: int = 1) -> str:
    align = ["---" if i < n_left else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def fmt_mb(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    mb = nbytes / MB
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.1f}" if mb >= 1 else f"{mb:.3f}"


def fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def unique(values: Iterable[Any]) -> list[Any]:
    """Distinct values in first-appearance order."""
    return list(dict.fromkeys(values))


def timing_mark(r: Record) -> str:
    """The mark of a record's time: ‡ extrapolated (not run), † time-boxed (fewer calls than planned)."""
    return " ‡" if r.get("extrapolated") else " †" if r.get("timeboxed") else ""


def timing_notes(labelled: Iterable[tuple[str, Record]]) -> list[str]:
    """One line per marked record saying what its time is, then a blank line (none when nothing is marked)."""
    out = []
    for label, r in labelled:
        budget = "its budget" if r.get("budget_s") is None else f"its {r['budget_s']:g} s budget"
        if r.get("extrapolated"):
            out.append(f"- ‡ {label}: not run, it would exceed {budget}; extrapolated from "
                       f"{r.get('measured_case')} ({fmt_ms(r.get('measured_ms'))} ms, timed once)")
        elif r.get("timeboxed"):
            first = " (the first call, so one-time costs included)" if not r.get("warmup_calls") else ""
            out.append(f"- † {label}: time-boxed: {r.get('calls')} timed call(s){first} within {budget}")
    return [*out, ""] if out else []


def run_line(path: Path, recs: list[Record]) -> str:
    """One line saying where a table's numbers come from."""
    r = recs[0]
    loads = [x["loadavg_1m"] for x in recs if isinstance(x.get("loadavg_1m"), (int, float))]
    parts = [f"**{r.get('device', '?')}**", f"torch {r.get('torch', '?')}", f"triton {r.get('triton', '-')}",
             str(r.get("date", "?")), f"commit {r.get('commit', '?')}"]  # fmt: skip
    parts += ["quick" if r.get("quick") else "full"] if "quick" in r else []
    if loads:
        lo, hi = min(loads), max(loads)
        parts.append(f"1-min load average at start {lo:.2f}" + (f"–{hi:.2f}" if hi > lo else ""))
    return f"{', '.join(parts)} (`{path.name}`)"


# -- sections -------------------------------------------------------------------------------------


def ratio(r: Record, base: Record | None, key: str, fmt: str) -> str:
    """``fmt`` of r[key] / base[key], or "-" where either is missing (e.g. a step that was not run)."""
    return fmt.format(r[key] / base[key]) if base and r.get(key) is not None and base.get(key) else "-"


def kernels_section(results: dict) -> list[str]:
    out = []
    for (bench, _), (path, recs) in results.items():
        if bench != "kernels":
            continue
        rows = []
        ops = unique(r.get("op") for r in recs)
        for op in ops:
            for r in (r for r in recs if r.get("op") == op):
                speed = r.get("speedup_vs_torch")
                rows.append((
                    str(op), str(r.get("case")), str(r.get("provider")), str(r.get("compute_dtype", "-")),
                    fmt_ms(r.get("median_ms")) + timing_mark(r), f"{fmt_ms(r.get('p20_ms'))}–{fmt_ms(r.get('p80_ms'))}",
                    f"{r['value']:.1f} {r.get('metric', '')}" if r.get("value") is not None else "-",
                    f"{r['pct_of_peak']:.0f}%" if r.get("pct_of_peak") is not None else "-",
                    f"{speed:.2f}×" if speed else "-",
                ))  # fmt: skip
        head = ("op", "shape", "provider", "compute", "median ms", "p20–p80", "throughput", "% peak", "speedup")
        out += [run_line(path, recs), "", md_table(head, rows, n_left=4), ""]
        out += timing_notes((f"{r.get('op')} {r.get('case')} {r.get('provider')}", r) for r in recs)
    if out:
        out = ["## Kernels", "", "Median ms per call; speedup = the `torch` (reference) backend's median over "
               "this row's, same run; % peak of the matmul (same compute dtype) or copy roof measured in that "
               "run (above 100%: the working set sat in cache).", "", *out]  # fmt: skip
    return out


def step_section(results: dict) -> list[str]:
    out = []
    for (bench, _), (path, recs) in results.items():
        if bench != "step":
            continue
        rows = []
        for case in unique(r.get("case") for r in recs):
            in_case = [r for r in recs if r.get("case") == case]
            adamw = next((r for r in in_case if r.get("provider_id") == "adamw"), None)
            for r in in_case:
                t_ratio = f"{r['median_ms'] / adamw['median_ms']:.2f}×" if adamw else "-"
                s_ratio = ratio(r, adamw, "state_bytes", "{:.3f}×")
                m_ratio = ratio(r, adamw, "matrix_state_bytes", "{:.3f}×")
                rows.append((
                    str(case), str(r.get("provider")), str(r.get("grad_evals", "-")),
                    fmt_ms(r.get("median_ms")) + timing_mark(r),
                    f"{fmt_ms(r.get('p20_ms'))}–{fmt_ms(r.get('p80_ms'))}", t_ratio,
                    fmt_mb(r.get("state_bytes")), s_ratio, fmt_mb(r.get("matrix_state_bytes")), m_ratio,
                    fmt_mb(r.get("peak_bytes")),
                ))  # fmt: skip
        head = ("case", "optimizer", "grads/step", "median ms", "p20–p80", "time vs AdamW", "state MB",
                "state vs AdamW", "matrices' state MB", "vs AdamW", "GPU peak MB")  # fmt: skip
        out += [run_line(path, recs), "", md_table(head, rows, n_left=2), ""]
        out += timing_notes((f"{r.get('case')} {r.get('provider')}", r) for r in recs)
    if out:
        out = ["## Optimizer step", "", "Time of one `optimizer.step()` (exact mode: without the closure's own time, "
               "i.e. without its two gradient evaluations); state = bytes of `optimizer.state` "
               "(MB = 2²⁰ bytes), all of it and the hidden matrices' part; GPU peak = "
               "`torch.cuda.max_memory_allocated` over one step (parameters, gradients and state included).",
               "", *out]  # fmt: skip
    return out


def train_curves(recs: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """{(case, provider): evaluation records sorted by step} of one train result."""
    curves: dict[tuple[str, str], list[Record]] = {}
    for r in recs:
        if r.get("record", "curve") == "curve" and "step" in r and ("val_loss" in r or "train_loss" in r):
            curves.setdefault((str(r.get("case")), str(r.get("provider"))), []).append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in curves.items()}


def _last_val(curve: list[Record]) -> Record | None:
    return next((r for r in reversed(curve) if r.get("val_loss") is not None), None)


def train_section(results: dict) -> list[str]:
    out = []
    for (bench, _), (path, recs) in results.items():
        if bench != "train":
            continue
        out += [run_line(path, recs), ""]
        sweep = (recs[0].get("case_config") or {}).get("lr_sweep")
        if isinstance(sweep, dict):  # which lrs ran (scripts/bench.sh runs one per kind on a slow CPU)
            kinds = "; ".join(f"{k} {', '.join(f'{lr:g}' for lr in v)}" for k, v in sweep.items())
            out += [f"Learning rates swept, per optimizer kind: {kinds}.", ""]
        best = [r for r in recs if r.get("record") == "best"]
        if best:
            rows = []
            for b in best:
                s, e = b.get("equal_steps") or {}, b.get("equal_grad_evals") or {}
                rows.append((str(b.get("case")), str(b.get("provider")),
                             fmt_loss(s.get("val_loss")), f"{s['lr']:g}" if "lr" in s else "-",
                             fmt_loss(e.get("val_loss")), f"{e['lr']:g}" if "lr" in e else "-",
                             str(e.get("step", "-"))))  # fmt: skip
            head = ("case", "optimizer", "val loss, equal steps", "lr", "val loss, equal grad evals", "lr", "at step")
            out += ["Best learning rate per optimizer:", "", md_table(head, rows, n_left=2), ""]
        rows = []
        for (case, provider), curve in train_curves(recs).items():
            last = _last_val(curve)
            final = curve[-1]
            rows.append((case, provider, str(final.get("step", "-")), str(final.get("grad_evals", "-")),
                         fmt_loss(last and last.get("val_loss")), fmt_loss(final.get("train_loss")),
                         "yes" if any(r.get("diverged") for r in curve) else ""))  # fmt: skip
        if rows:
            head = ("case", "run", "steps", "grad evals", "final val loss", "final train loss", "diverged")
            out += ["Every run, at its last evaluation:", "", md_table(head, rows, n_left=2), ""]
        for v in (r for r in recs if r.get("record") == "verdict"):
            text = v.get("text")
            out += [f"- {line}" for line in ([text] if isinstance(text, str) else text or [])] + [""]
    if out:
        out = ["## Training", "", "Validation loss as recorded by bench/train_lm.py.", "", *out]
    return out


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result JSON files")
    ap.add_argument("--no-plots", action="store_true", help="markdown only")
    args = ap.parse_args(argv)
    results = load_results(args.results)
    lines = ["# Benchmark report", "",
             "Generated by `bench/report.py` from the newest result file per (benchmark, device) in this folder.",
             ""]  # fmt: skip
    body = kernels_section(results) + step_section(results) + train_section(results)
    lines += body or ["No results found.", ""]
    notes = []
    if not args.no_plots and results:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from report_plots import plot_kernels, plot_loss, plot_step  # here: it imports this module
        except ImportError:
            notes.append("matplotlib is not installed: no plots (pip install matplotlib)")
        else:
            for name, fn in (("kernels.png", plot_kernels), ("step.png", plot_step), ("loss.png", plot_loss)):
                if fn(results, args.results / name, plt):
                    lines += [f"![{name}]({name})", ""]
                    notes.append(f"wrote {args.results / name}")
    text = "\n".join(lines).rstrip() + "\n"
    print(text)
    (args.results / "REPORT.md").write_text(text)
    for note in [*notes, f"wrote {args.results / 'REPORT.md'}"]:
        print(f"# {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
