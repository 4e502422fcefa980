"""Momentum × learning-rate grid of LiMuon per variance-reduction mode, on train_lm's byte-level GPT.

Issue #10: exact STORM seemed far more sensitive to ``momentum`` (``μ = 1 − β``) than approx mode
and Muon. This runner trains ``bench/train_lm.py``'s model on its data, batches and schedule for every
(mode, μ, lr, seed) and records the final validation loss, so a default μ per mode can be read off
the data. Modes (all with dense momentum, Option #1, and train_lm's AdamW-routed settings: embeddings
in an ``algorithm="adamw"`` group, 1-D parameters routed automatically, ``adamw_lr`` fixed,
``adamw_betas`` (0.9, 0.95), no decay on them; weight decay 0.1 on the matrices):

* ``exact``: ``limuon.LiMuon(variance_reduction="exact")`` via ``step(closure)`` (2 gradients/step);
* ``approx`` and ``none``: ``limuon.LiMuon`` with that mode (1 gradient/step);
* ``muon``: ``limuon.Muon`` (Nesterov), the reference the issue compares against;
* ``adamw``: ``torch.optim.AdamW`` at its own lrs, a μ-free reference row.

``variance_reduction`` and ``adamw_lr`` are always passed explicitly, so a change of the library's
defaults does not change what a grid measures. The seed sets the model init, the batch order and
LiMuon's RSVD seed (train_lm's ``Config.seed``). Each finished run is appended to the JSON at once
(``--resume`` skips runs already there with the same setting), so a grid can be stopped and resumed.

Output: ``record: "run"`` entries (one per run: ``provider_config`` with mode, μ, lr, seed, adamw_lr;
``val_loss``/``train_loss`` at the last step, ``diverged``, the few evaluated ``curve`` points) with
train_lm's metadata (device, versions, corpus description and hash, setting), and a markdown table:
rows mode × μ, columns lr, cells the mean over seeds ± half their range (the best cell of a mode in
bold), followed by the recommended μ per mode (see ``recommend``).

    python bench/momentum_grid.py --resume                   # the recorded grid: 2-core CPU, ~1 hour
    python bench/momentum_grid.py --modes exact --momenta 0.5,0.95 --seeds 0 --steps 20 --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # train_lm and _common, when imported from elsewhere
import train_lm
from train_lm import QUICK, Config, Spec

MODES = {
    "exact": Spec("LiMuon#1 exact", "limuon", "exact"),
    "approx": Spec("LiMuon#1 approx", "limuon", "approx"),
    "none": Spec("LiMuon#1 none", "limuon", "none"),
    "muon": Spec("Muon", "muon"),
    "adamw": Spec("AdamW", "adamw"),
}
MOMENTA = (0.5, 0.7, 0.8, 0.9, 0.95)
MUON_MOMENTA = (0.95,)  # Muon is the reference row at its default (a sweep: --muon-momenta, e.g. with --resume)
EXACT_LRS = (0.005, 0.01, 0.02)
MATRIX_LRS = (0.01, 0.02, 0.04)  # approx, none, Muon
ADAMW_REF_LRS = (1e-3, 2e-3)  # the AdamW reference row (train_lm's --quick sweep)
ADAMW_LR = 1e-3  # the hybrids' AdamW-routed lr: the best of train_lm's --quick AdamW sweep
# The recorded grid: train_lm's --quick setting (2 layers, d=128, 200 steps). The setting
# (4 layers, 300 steps) took 76-84 s per exact run on the shared 2-core CPU: ~2-3 h for the 124 runs.
GRID = dataclasses.replace(QUICK, eval_every=QUICK.steps)
# How the hybrids' AdamW-routed lr follows the schedule (records without it had lr_factor² there: train_lm
# scaled adamw_lr while the library scales it by lr / lr_at_creation too; --resume does not mix the two).
ADAMW_LR_SCHEDULE = "adamw_lr * lr_factor"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def lrs_for(mode: str, args: argparse.Namespace) -> list[float]:
    return args.exact_lrs if mode == "exact" else (args.adamw_lrs if mode == "adamw" else args.lrs)


def plan(args: argparse.Namespace) -> list[tuple[int, str, float | None, float]]:
    """(seed, mode, μ, lr) of every run, mode outermost (in ``--modes`` order, exact first: the mode of
    the issue), so a grid stopped early has whole modes with all their seeds."""
    runs = []
    for mode in args.modes:
        momenta = [None] if mode == "adamw" else (args.muon_momenta if mode == "muon" else args.momenta)
        for seed in args.seeds:
            for mu in momenta:
                runs += [(seed, mode, mu, lr) for lr in lrs_for(mode, args)]
    return runs


def run_key(cfg: dict) -> tuple:
    return cfg["mode"], cfg["momentum"], cfg["lr"], cfg["seed"]


def one_run(cfg: Config, data: tuple, mode: str, mu: float | None, lr: float, adamw_lr: float,
            dev: torch.device) -> dict:
    """Train once; the record's loss fields are those of the last evaluation (the final step)."""
    spec = MODES[mode]
    t0 = time.perf_counter()
    curve = train_lm.train(cfg, *data, spec, lr, lr if mode == "adamw" else adamw_lr, dev,
                           momentum=train_lm.MOMENTUM if mu is None else mu)
    final = curve[-1]
    provider = {"mode": mode, "optimizer": spec.label, "kind": spec.kind, "variance_reduction": spec.variance_reduction,
                "rank": None, "momentum": mu, "lr": lr, "seed": cfg.seed, "steps": cfg.steps,
                "adamw_lr": lr if mode == "adamw" else adamw_lr, "adamw_betas": list(train_lm.ADAMW_BETAS),
                "weight_decay": train_lm.WEIGHT_DECAY}  # fmt: skip
    return {"record": "run", "provider": f"{spec.label} mu={mu} lr={lr:g} seed={cfg.seed}",
            "provider_config": provider, "step": final["step"], "grad_evals": final["grad_evals"],
            "val_loss": final["val_loss"], "train_loss": final["train_loss"], "diverged": final["diverged"],
            "median_ms": final["median_ms"], "wall_s": time.perf_counter() - t0, "curve": curve}


# -- summary --------------------------------------------------------------------------------------


def cells(records: list[dict]) -> dict[tuple, dict]:
    """(mode, μ, lr) -> {mean, half_range, n, diverged}: val loss over the seeds that finished.

    A cell with any diverged seed reports ``diverged`` (the mean of a subset would flatter it)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("record") == "run":
            c = r["provider_config"]
            groups.setdefault((c["mode"], c["momentum"], c["lr"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        vals = [r["val_loss"] for r in runs if not r["diverged"] and r["val_loss"] is not None]
        diverged = len(vals) < len(runs)
        out[key] = {"mean": None if diverged else statistics.fmean(vals), "n": len(runs), "diverged": diverged,
                    "half_range": None if diverged else (max(vals) - min(vals)) / 2}
    return out


def recommend(table: dict[tuple, dict], mode: str) -> dict | None:
    """The μ to recommend for ``mode``, two ways.

    ``at_best_lr``: the lr whose best μ gives the lowest mean loss, and that μ (the grid's optimum).
    ``robust``: the μ with the lowest mean *regret* over lrs, regret at an lr being its loss minus the
    best loss at that lr (a diverged cell counts as the worst regret seen plus 1 nat) — the μ least
    tied to one lr. Only lrs where every μ has a cell count for ``robust``."""
    own = {k: v for k, v in table.items() if k[0] == mode and k[1] is not None}
    ok = {k: v for k, v in own.items() if not v["diverged"]}
    if not ok:
        return None
    (_, mu_best, lr_best), best = min(ok.items(), key=lambda kv: kv[1]["mean"])
    mus = sorted({k[1] for k in own})
    lrs = sorted(lr for lr in {k[2] for k in own} if all((mode, m, lr) in own for m in mus))
    regret: dict[float, list[float]] = {m: [] for m in mus}
    for lr in lrs:
        finite = [own[(mode, m, lr)]["mean"] for m in mus if not own[(mode, m, lr)]["diverged"]]
        floor = min(finite) if finite else 0.0
        worst = max(finite) - floor if finite else 0.0
        for m in mus:
            c = own[(mode, m, lr)]
            regret[m].append(worst + 1.0 if c["diverged"] else c["mean"] - floor)
    mean_regret = {m: statistics.fmean(v) for m, v in regret.items() if v}
    robust = min(mean_regret, key=mean_regret.get) if mean_regret else None
    return {"mode": mode, "at_best_lr": {"momentum": mu_best, "lr": lr_best, "val_loss": best["mean"]},
            "robust": {"momentum": robust, "mean_regret": mean_regret.get(robust), "lrs": lrs,
                       "mean_regret_by_momentum": {str(m): r for m, r in mean_regret.items()}}}


def markdown(records: list[dict], title: str) -> str:
    """Rows mode × μ, columns lr (the union over modes; "—": not in that mode's sweep)."""
    table = cells(records)
    modes = [m for m in MODES if any(k[0] == m for k in table)]
    lrs = sorted({k[2] for k in table})
    lines = [title, "", "| mode | μ | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---|" + "---:|" * len(lrs)]
    for mode in modes:
        own = {k: v for k, v in table.items() if k[0] == mode}
        best = min((v["mean"] for v in own.values() if not v["diverged"]), default=None)
        for mu in sorted({k[1] for k in own}, key=lambda m: -1.0 if m is None else m):
            row = []
            for lr in lrs:
                c = own.get((mode, mu, lr))
                text = "—" if c is None else "diverged" if c["diverged"] else f"{c['mean']:.3f} ± {c['half_range']:.3f}"
                text += f" ({c['n']} seed)" if c is not None and c["n"] == 1 else ""
                row.append(f"**{text}**" if c is not None and c["mean"] == best else text)
            label = MODES[mode].label
            lines.append(f"| {label} | {'—' if mu is None else f'{mu:g}'} | " + " | ".join(row) + " |")
    lines += ["", "Recommended μ (`at best lr`: the grid's best cell; `robust`: lowest mean regret over lrs):", ""]
    for mode in modes:
        rec = recommend(table, mode)
        if rec and mode != "adamw":
            a, r = rec["at_best_lr"], rec["robust"]
            lines.append(f"- {MODES[mode].label}: at best lr {a['lr']:g}: μ = {a['momentum']:g} ({a['val_loss']:.3f}); "
                         f"robust: μ = {r['momentum']:g} (mean regret {r['mean_regret']:.3f} nats)")
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--momenta", type=floats, default=list(MOMENTA), help="comma-separated μ values")
    ap.add_argument("--muon-momenta", type=floats, default=list(MUON_MOMENTA), help="μ values of the Muon rows")
    ap.add_argument("--exact-lrs", type=floats, default=list(EXACT_LRS), help="lrs of exact mode")
    ap.add_argument("--lrs", type=floats, default=list(MATRIX_LRS), help="lrs of approx, none and Muon")
    ap.add_argument("--adamw-lrs", type=floats, default=list(ADAMW_REF_LRS), help="lrs of the AdamW reference row")
    ap.add_argument("--adamw-lr", type=float, default=ADAMW_LR, help="lr of the hybrids' AdamW-routed parameters")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    for name in ("n_layer", "n_head", "d_model", "seq_len", "batch_size", "steps", "eval_every", "eval_batches"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the grid setting's {name}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the CPU is shared)")
    ap.add_argument("--out", help="JSON path (default bench/results/momentum-grid-<device>-<date>.json)")
    ap.add_argument("--md", help="markdown path (default: the JSON path with .md)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out with this setting")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in args.modes if m not in MODES]:
        ap.error(f"--modes: unknown mode(s) {bad}; expected a subset of {list(MODES)}")
    if bad := [m for m in args.momenta + args.muon_momenta if not 0.0 < m < 1.0]:
        ap.error(f"--momenta: every μ must lie in (0, 1), got {bad}")
    if bad := [lr for lr in args.lrs + args.exact_lrs + args.adamw_lrs + [args.adamw_lr] if not lr > 0]:
        ap.error(f"learning rates must be positive, got {bad}")
    return args


def grid_config(args: argparse.Namespace) -> Config:
    over = {f.name: v for f in dataclasses.fields(Config) if (v := getattr(args, f.name, None)) is not None}
    cfg = dataclasses.replace(GRID, **over, bf16=False)
    return dataclasses.replace(cfg, eval_every=over.get("eval_every", cfg.steps))  # evaluate at 0, S/2, S


def same_setting(a: dict, b: dict) -> bool:
    """Whether two records' settings match up to the seed (runs of other seeds share a grid)."""
    return {k: v for k, v in a.items() if k != "seed"} == {k: v for k, v in b.items() if k != "seed"}


def write_json(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)  # a grid killed mid-write keeps the previous file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = grid_config(args)
    meta = {**train_lm.run_meta(dev, False), "bench": "momentum-grid"}
    train_data, val_data, data_info = train_lm.load_corpus()
    case = {"name": cfg.name(), **dataclasses.asdict(cfg), "warmup_steps": cfg.warmup, "tied_head": True,
            "schedule": f"linear warmup {cfg.warmup} steps, cosine to {cfg.min_lr_frac} x peak",
            "params": sum(p.numel() for p in train_lm.GPT(cfg).parameters()), "data": data_info,
            "adamw_lr_schedule": ADAMW_LR_SCHEDULE}  # fmt: skip
    stem = f"momentum-grid-{train_lm.device_slug(dev, meta['device'])}-{datetime.date.today()}"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if args.resume and out.exists() else []
    if other := {r["case"]["name"] for r in records if not same_setting(r["case"], case)}:
        raise SystemExit(f"--resume: {out} holds runs of another setting ({sorted(other)}); choose another --out")
    done = {run_key(r["provider_config"]) for r in records if r.get("record") == "run"}
    todo = [p for p in plan(args) if (p[1], p[2], p[3], p[0]) not in done]
    print(f"# {meta['device']} | torch {meta['torch']} | {cfg.name()} | {case['params'] / 1e6:.2f} M params | "
          f"{len(todo)} runs to do, {len(done)} kept", flush=True)
    start = time.perf_counter()
    for i, (seed, mode, mu, lr) in enumerate(todo):
        run_cfg = dataclasses.replace(cfg, seed=seed)
        rec = one_run(run_cfg, (train_data, val_data), mode, mu, lr, args.adamw_lr, dev)
        records.append({**meta, "case": {**case, "seed": seed}, **rec})
        write_json(out, records)
        elapsed = time.perf_counter() - start
        train_lm.log(f"[{elapsed:7.0f}s, ~{elapsed / (i + 1) * (len(todo) - i - 1) / 60:.0f} min left] "
                     f"{rec['provider']:<44} val {rec['val_loss'] or float('nan'):.4f} ({rec['wall_s']:.0f}s)")
    text = markdown(records, f"### LiMuon momentum × lr grid: {cfg.name()}, final val loss (nats/byte), "
                             f"mean ± half-range of seeds {sorted({r['case']['seed'] for r in records})}, "
                             f"AdamW-routed lr {args.adamw_lr:g}, {meta['device']}")
    md = Path(args.md) if args.md else out.with_suffix(".md")
    md.write_text(text)
    print(text)
    print(f"# wrote {len(records)} records to {out} and the table to {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
