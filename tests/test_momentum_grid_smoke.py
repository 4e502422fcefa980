"""Smoke test of bench/momentum_grid.py: a 2-run grid on a tiny model, its records, resume, and the
summary arithmetic (mean ± half-range over seeds, the recommended momentum) on hand-made records."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import momentum_grid

TINY = ["--steps", "3", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "16",
        "--batch-size", "2", "--eval-batches", "1"]
META_FIELDS = {"bench", "device", "torch", "triton", "date", "commit", "case"}
CONFIG_FIELDS = {"mode", "variance_reduction", "rank", "momentum", "lr", "seed", "steps", "adamw_lr"}


def test_two_run_grid_records_and_resume(tmp_path):
    out = tmp_path / "grid.json"
    argv = [*TINY, "--modes", "exact", "--momenta", "0.5,0.9", "--exact-lrs", "0.02", "--adamw-lr", "0.003",
            "--seeds", "1", "--out", str(out)]
    assert momentum_grid.main(argv) == 0
    runs = json.loads(out.read_text())
    assert len(runs) == 2
    for run, mu in zip(runs, (0.5, 0.9)):
        assert run.keys() >= META_FIELDS and run["bench"] == "momentum-grid" and run["record"] == "run"
        case = run["case"]
        assert (case["steps"], case["n_layer"], case["seed"]) == (3, 1, 1) and len(case["data"]["sha256"]) == 16
        cfg = run["provider_config"]
        assert cfg.keys() >= CONFIG_FIELDS
        assert (cfg["mode"], cfg["variance_reduction"], cfg["rank"]) == ("exact", "exact", None)
        assert (cfg["momentum"], cfg["lr"], cfg["seed"], cfg["adamw_lr"]) == (mu, 0.02, 1, 0.003)
        assert run["grad_evals"] == 2 * 3 - 1  # step(closure): 2 gradients per step after the first
        assert run["step"] == 3 and not run["diverged"] and math.isfinite(run["val_loss"])
        assert [p["step"] for p in run["curve"]] == [0, 2, 3]  # evaluated at 0, S/2 (rounded up), S
    assert runs[0]["val_loss"] != runs[1]["val_loss"]  # μ reached the optimizer
    md = out.with_suffix(".md").read_text()
    assert "| LiMuon#1 exact | 0.5 |" in md and "| LiMuon#1 exact | 0.9 |" in md and "(1 seed)" in md

    assert momentum_grid.main([*argv, "--resume"]) == 0  # nothing left to run: the records are kept as they were
    assert json.loads(out.read_text()) == runs
    with pytest.raises(SystemExit, match="another setting"):
        momentum_grid.main([*argv, "--resume", "--steps", "4"])


def run(mode: str, mu: float, lr: float, seed: int, val: float | None) -> dict:
    cfg = {"mode": mode, "momentum": mu, "lr": lr, "seed": seed}
    return {"record": "run", "provider_config": cfg, "val_loss": val, "diverged": val is None}


def test_cells_mean_half_range_and_divergence():
    table = momentum_grid.cells([run("none", 0.9, 0.02, 0, 2.0), run("none", 0.9, 0.02, 1, 2.5),
                                 run("none", 0.5, 0.02, 0, 2.2), run("none", 0.5, 0.02, 1, None)])
    assert table[("none", 0.9, 0.02)] == {"mean": 2.25, "half_range": 0.25, "n": 2, "diverged": False}
    assert table[("none", 0.5, 0.02)]["diverged"] and table[("none", 0.5, 0.02)]["mean"] is None


def test_recommend_best_cell_and_robust_choice():
    # μ=0.9 wins only at lr 0.04 (by 0.01); μ=0.7 is within 0.01 of the best at every lr and
    # best at the other two: the grid optimum is μ=0.9, the robust choice μ=0.7.
    losses = {(0.9, 0.01): 2.60, (0.9, 0.02): 2.40, (0.9, 0.04): 2.00,
              (0.7, 0.01): 2.10, (0.7, 0.02): 2.05, (0.7, 0.04): 2.01,
              (0.5, 0.01): 2.20, (0.5, 0.02): None, (0.5, 0.04): 2.30}
    records = [run("approx", mu, lr, s, v) for (mu, lr), v in losses.items() for s in (0, 1)]
    rec = momentum_grid.recommend(momentum_grid.cells(records), "approx")
    assert rec["at_best_lr"] == {"momentum": 0.9, "lr": 0.04, "val_loss": 2.00}
    assert rec["robust"]["momentum"] == 0.7 and rec["robust"]["lrs"] == [0.01, 0.02, 0.04]
    # regret of 0.7: (0 + 0 + 0.01)/3; of 0.5 at lr 0.02 (diverged): the worst finite regret there (0.35) + 1
    assert rec["robust"]["mean_regret"] == pytest.approx(0.01 / 3)
    assert rec["robust"]["mean_regret_by_momentum"]["0.5"] == pytest.approx((0.10 + 1.35 + 0.30) / 3)
    assert momentum_grid.recommend(momentum_grid.cells(records), "exact") is None


@pytest.mark.parametrize("mode", ["none", "muon"])
def test_schedule_reaches_adamw_routed_params_once(mode, monkeypatch):
    # The grid's hybrids take train_lm's schedule: the AdamW-routed lr at step t must be
    # adamw_lr · lr_factor(t), not lr_factor(t)² (the library already scales adamw_lr by lr / lr_at_creation).
    import limuon._adamw as adamw_mod

    seen: list[float] = []
    real = adamw_mod.adamw_lr
    monkeypatch.setattr(adamw_mod, "adamw_lr", lambda group: seen.append(real(group)) or seen[-1])
    cfg = momentum_grid.train_lm.Config(n_layer=1, n_head=2, d_model=16, seq_len=8, batch_size=2, steps=6,
                                        eval_every=6, eval_batches=1, bf16=False)
    data = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    momentum_grid.train_lm.train(cfg, data, data, momentum_grid.MODES[mode], 0.02, 3e-3, torch.device("cpu"))
    calls = len(seen) // cfg.steps  # the same number of calls (AdamW-routed groups) every step
    expected = [3e-3 * momentum_grid.train_lm.lr_factor(t, cfg) for t in range(cfg.steps) for _ in range(calls)]
    assert calls >= 1 and seen == pytest.approx(expected, rel=1e-12)
