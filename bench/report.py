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

Plots (matplotlib, Agg backend; skipped with a note if matplotlib is missing or ``--no-plots``):
``kernels.png`` throughput against problem size (elements) per op, one line per provider;
``step.png`` step time (bars, p20–p80 whiskers) and optimizer state (stacked: hidden matrices,
everything else) per optimizer; ``loss.png`` validation loss against steps and against gradient
evaluations (one curve per optimizer: its best learning rate when the train records say which).

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
                    fmt_ms(r.get("median_ms")), f"{fmt_ms(r.get('p20_ms'))}–{fmt_ms(r.get('p80_ms'))}",
                    f"{r['value']:.1f} {r.get('metric', '')}" if r.get("value") is not None else "-",
                    f"{r['pct_of_peak']:.0f}%" if r.get("pct_of_peak") is not None else "-",
                    f"{speed:.2f}×" if speed else "-",
                ))  # fmt: skip
        head = ("op", "shape", "provider", "compute", "median ms", "p20–p80", "throughput", "% peak", "speedup")
        out += [run_line(path, recs), "", md_table(head, rows, n_left=4), ""]
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
                s_ratio = f"{r['state_bytes'] / adamw['state_bytes']:.3f}×" if adamw else "-"
                m_ratio = (f"{r['matrix_state_bytes'] / adamw['matrix_state_bytes']:.3f}×"
                           if adamw and r.get("matrix_state_bytes") is not None else "-")  # fmt: skip
                rows.append((
                    str(case), str(r.get("provider")), str(r.get("grad_evals", "-")), fmt_ms(r.get("median_ms")),
                    f"{fmt_ms(r.get('p20_ms'))}–{fmt_ms(r.get('p80_ms'))}", t_ratio,
                    fmt_mb(r.get("state_bytes")), s_ratio, fmt_mb(r.get("matrix_state_bytes")), m_ratio,
                    fmt_mb(r.get("peak_bytes")),
                ))  # fmt: skip
        head = ("case", "optimizer", "grads/step", "median ms", "p20–p80", "time vs AdamW", "state MB",
                "state vs AdamW", "matrices' state MB", "vs AdamW", "GPU peak MB")  # fmt: skip
        out += [run_line(path, recs), "", md_table(head, rows, n_left=2), ""]
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


# -- plots ----------------------------------------------------------------------------------------


def _short_device(name: str) -> str:
    return name.split("(")[0].strip()


def plot_kernels(results: dict, path: Path, plt: Any) -> bool:
    runs = [(dev, recs) for (bench, dev), (_, recs) in results.items() if bench == "kernels"]
    if not runs:
        return False
    ops = unique(r.get("op") for _, recs in runs for r in recs)
    cols = min(3, len(ops))
    rows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, op in zip(axes.flat, ops):
        ticks: dict[int, list[str]] = {}
        metric = ""
        for d, (dev, recs) in enumerate(runs):
            mine = [r for r in recs if r.get("op") == op and r.get("value") is not None]
            for provider in unique(r.get("provider") for r in mine):
                pts = sorted((math.prod(r["shape"]), r["value"], r["case"]) for r in mine if r["provider"] == provider)
                for n, _, case in pts:
                    ticks.setdefault(n, [])
                    if case not in ticks[n]:
                        ticks[n].append(case)
                cdtype = next(r.get("compute_dtype") for r in mine if r["provider"] == provider)
                label = provider if cdtype in (None, "float32") else f"{provider} ({cdtype})"
                label = label if len(runs) == 1 else f"{label}, {_short_device(dev)}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[d % 4], marker="o", label=label)
                metric = mine[0].get("metric", "")
        ax.set_xscale("log")
        ax.set_xticks(list(ticks), ["\n".join(c) for c in ticks.values()], fontsize=7)
        ax.minorticks_off()
        ax.set_title(op)
        ax.set_ylabel(metric)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    title = "; ".join(_short_device(dev) for dev, _ in runs)
    fig.suptitle(f"Kernel throughput vs problem size (elements), {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_step(results: dict, path: Path, plt: Any) -> bool:
    panels = [(dev, case, [r for r in recs if r.get("case") == case])
              for (bench, dev), (_, recs) in results.items() if bench == "step"
              for case in unique(r.get("case") for r in recs)]  # fmt: skip
    if not panels:
        return False
    height = sum(0.9 + 0.36 * len(recs) for _, _, recs in panels)
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, height), squeeze=False,
                             height_ratios=[len(recs) for _, _, recs in panels])  # fmt: skip
    for (dev, case, recs), (ax_t, ax_s) in zip(panels, axes):
        names = [r["provider"] for r in recs][::-1]
        y = range(len(recs))
        med = [r["median_ms"] for r in recs][::-1]
        lo = [max(0.0, r["median_ms"] - r["p20_ms"]) for r in recs][::-1]
        hi = [max(0.0, r["p80_ms"] - r["median_ms"]) for r in recs][::-1]
        ax_t.barh(y, med, xerr=[lo, hi], color="tab:blue", alpha=0.8, capsize=3)
        for i, (m, h) in enumerate(zip(med, hi)):
            ax_t.text(m + h, i, f"  {fmt_ms(m)}", va="center", ha="left", fontsize=8)
        ax_t.set_yticks(list(y), names, fontsize=8)
        ax_t.set_xlabel("ms per step (median, p20–p80)")
        ax_t.set_xlim(right=max(m + h for m, h in zip(med, hi)) * 1.25)
        ax_t.set_title(f"{case} — {_short_device(dev)}", fontsize=10, loc="left")
        mats = [(r.get("matrix_state_bytes") or 0) / MB for r in recs][::-1]
        rest = [r["state_bytes"] / MB - m for r, m in zip(recs[::-1], mats)]
        ax_s.barh(y, mats, color="tab:orange", label="hidden matrices")
        ax_s.barh(y, rest, left=mats, color="tab:gray", alpha=0.6, label="embeddings, 1-D (AdamW)")
        for i, (m, o) in enumerate(zip(mats, rest)):
            ax_s.text(m + o, i, f" {fmt_mb((m + o) * MB)} ({fmt_mb(m * MB)})", va="center", ha="left", fontsize=8)
        ax_s.set_yticks(list(y), [])
        ax_s.set_xlabel("optimizer state, MB (total, hidden matrices' part)")
        ax_s.set_xlim(right=max(m + o for m, o in zip(mats, rest)) * 1.4)
        ax_s.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
    for ax in axes.flat:
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def best_runs(recs: list[Record]) -> set[tuple[str, str]] | None:
    """(case, provider) of each optimizer's best-lr curve, when the train records name them."""
    chosen = set()
    for b in (r for r in recs if r.get("record") == "best"):
        entry = b.get("equal_steps") or b.get("equal_grad_evals") or {}
        if "lr" in entry:
            chosen.add((str(b.get("case")), f"{b.get('provider')} lr={entry['lr']:g}"))
    return chosen or None


def plot_loss(results: dict, path: Path, plt: Any) -> bool:
    panels = []
    for (bench, dev), (_, recs) in results.items():
        if bench != "train":
            continue
        curves = train_curves(recs)
        chosen = best_runs(recs)
        if chosen and chosen & set(curves):
            curves = {k: v for k, v in curves.items() if k in chosen}
        for case in unique(c for c, _ in curves):
            panels.append((dev, case, {p: v for (c, p), v in curves.items() if c == case}))
    panels = [p for p in panels if any(r.get("val_loss") is not None for v in p[2].values() for r in v)]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), squeeze=False)
    for (dev, case, curves), row in zip(panels, axes):
        vals = []
        for ax, key, xlabel in zip(row, ("step", "grad_evals"), ("steps", "gradient evaluations")):
            for provider, curve in curves.items():
                pts = [r for r in curve if r.get("val_loss") is not None and r.get(key) is not None]
                ax.plot([r[key] for r in pts], [r["val_loss"] for r in pts], marker=".", label=provider)
                vals += [r["val_loss"] for r in pts[len(pts) // 5:]]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss")
            ax.set_title(f"{case} — {_short_device(dev)}", fontsize=10, loc="left")
            ax.grid(alpha=0.3)
        if vals:  # the early, high losses would squash the part where the optimizers differ
            lo, hi = min(vals), max(vals)
            for ax in row:
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
