"""The PNG plots of bench/report.py (matplotlib, passed in as ``plt`` with the Agg backend set).

``kernels.png``: throughput against problem size (elements) per op, one line per provider; a hollow
marker is a time-boxed or extrapolated measurement. ``step.png``: step time (bars, p20–p80 whiskers)
and optimizer state (stacked: hidden matrices, everything else) per optimizer; a hatched bar is a
time-boxed or extrapolated step. ``loss.png``: validation loss against steps and against gradient
evaluations (one curve per optimizer: its best learning rate when the train records say which).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from report import MB, Record, fmt_mb, fmt_ms, timing_mark, train_curves, unique

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
            # (a record over a set of shapes, as the --ns-methods rows' whole-model totals, has no one size)
            mine = [r for r in recs if r.get("op") == op and r.get("value") is not None
                    and all(isinstance(d, int) for d in r.get("shape", ()))]
            for provider in unique(r.get("provider") for r in mine):
                pts = [(math.prod(r["shape"]), r) for r in mine if r["provider"] == provider]
                pts.sort(key=lambda p: p[0])
                for n, r in pts:
                    ticks.setdefault(n, [])
                    if r["case"] not in ticks[n]:
                        ticks[n].append(r["case"])
                cdtype = next(r.get("compute_dtype") for r in mine if r["provider"] == provider)
                label = provider if cdtype in (None, "float32") else f"{provider} ({cdtype})"
                label = label if len(runs) == 1 else f"{label}, {_short_device(dev)}"
                (line,) = ax.plot([n for n, _ in pts], [r["value"] for _, r in pts], styles[d % 4], marker="o",
                                  label=label)  # fmt: skip
                marked = [(n, r["value"]) for n, r in pts if timing_mark(r)]
                if marked:  # hollow: time-boxed or extrapolated
                    ax.plot(*zip(*marked), "o", mfc="white", mec=line.get_color(), ms=7, zorder=3)
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
    hollow = any(timing_mark(r) for _, recs in runs for r in recs)
    note = " (hollow marker: time-boxed or extrapolated)" if hollow else ""
    fig.suptitle(f"Kernel throughput vs problem size (elements), {title}{note}")
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
        marks = [timing_mark(r) for r in recs][::-1]
        bars = ax_t.barh(y, med, xerr=[lo, hi], color="tab:blue", alpha=0.8, capsize=3)
        for i, (m, h, mark) in enumerate(zip(med, hi, marks)):
            ax_t.text(m + h, i, f"  {fmt_ms(m)}{mark}", va="center", ha="left", fontsize=8)
            bars.patches[i].set_hatch("//" if mark else "")  # time-boxed or extrapolated
        ax_t.set_yticks(list(y), names, fontsize=8)
        ax_t.set_xlabel("ms per step (median, p20–p80; hatched: † time-boxed, ‡ extrapolated)" if any(marks)
                        else "ms per step (median, p20–p80)")  # fmt: skip
        ax_t.set_xlim(right=max(m + h for m, h in zip(med, hi)) * 1.25)
        ax_t.set_title(f"{case} — {_short_device(dev)}", fontsize=10, loc="left")
        mats = [(r.get("matrix_state_bytes") or 0) / MB for r in recs][::-1]
        rest = [(r.get("state_bytes") or 0) / MB - m for r, m in zip(recs[::-1], mats)]  # none: step not run
        ax_s.barh(y, mats, color="tab:orange", label="hidden matrices")
        ax_s.barh(y, rest, left=mats, color="tab:gray", alpha=0.6, label="embeddings, 1-D (AdamW)")
        for i, (m, o, r) in enumerate(zip(mats, rest, recs[::-1])):
            text = f" {fmt_mb((m + o) * MB)} ({fmt_mb(m * MB)})" if r.get("state_bytes") is not None else " not run"
            ax_s.text(m + o, i, text, va="center", ha="left", fontsize=8)
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
