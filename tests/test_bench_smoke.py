"""Smoke tests of the benchmarks: bench/bench_step.py on a tiny parameter set (every provider, the
record fields, the optimizer-state accounting of ALGORITHM.md §5) and bench/report.py rendering a
results folder. Timings are not checked: speed is measured by the benchmarks, never asserted.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_step  # noqa: E402
import report  # noqa: E402

M, N = 24, 40
SPECS = [
    bench_step.ParamSpec("a", (M, N), "matrix"),
    bench_step.ParamSpec("b", (M, N), "matrix"),  # same shape as a: one stacked bucket in limuon
    bench_step.ParamSpec("c", (N, M), "matrix"),
    bench_step.ParamSpec("bias", (N,), "vector"),
    bench_step.ParamSpec("emb", (10, 8), "embedding"),
]
TINY_REPS = bench_step.Reps(min_n=2, max_n=2, budget_s=0.0, warmup=2)
F32, BF16, STEP = 4, 2, 4  # bytes per fp32 word, per bf16 word, per step counter (0-d fp32 tensor)


def expected_matrix_state(provider: str, m: int, n: int, r: int = bench_step.RANK) -> int:
    """ALGORITHM.md §5 per m×n matrix, in bytes, plus the step counter where the optimizer keeps one."""
    return {
        "adamw": 2 * m * n * F32 + STEP,
        "torch-muon": m * n * F32,
        "muon": m * n * F32,
        "muon-bf16": m * n * F32,
        "limuon1-approx": m * n * F32 + STEP,
        "limuon1-exact": m * n * F32 + m * n * BF16 + STEP,
        "limuon2-approx": r * (m + n + 1) * F32 + STEP,
        "limuon2-exact": r * (m + n + 1) * F32 + m * n * BF16 + STEP,
    }[provider]


@pytest.mark.parametrize("provider", list(bench_step.PROVIDERS))
def test_step_record_and_state_bytes(provider):
    rec = bench_step.bench_provider(provider, SPECS, torch.device("cpu"), reps=TINY_REPS)
    assert rec["provider"] == bench_step.PROVIDERS[provider] and rec["provider_id"] == provider
    assert rec["grad_evals"] == (2 if provider.endswith("exact") else 1)
    assert 0 <= rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"]
    assert rec["timed_steps"] == 2 and rec["peak_bytes"] is None  # CPU: no peak
    assert rec["n_tensors"] == len(SPECS) and rec["n_matrices"] == 3
    matrices = sum(expected_matrix_state(provider, *s.shape) for s in SPECS if s.role == "matrix")
    others = sum(2 * math.prod(s.shape) * F32 + STEP for s in SPECS if s.role != "matrix")  # AdamW everywhere
    assert rec["matrix_state_bytes"] == matrices
    assert rec["state_bytes"] == matrices + others
    assert sum(rec["state_by_key"].values()) == rec["state_bytes"]
    # The storages may hold a little more (LiMuon's S: r of the r + oversample singular values).
    assert 0 <= rec["state_storage_bytes"] - rec["state_bytes"] <= 3 * 5 * F32


def test_state_bytes_counts_shared_storage_once():
    p, q = torch.zeros(3, 4, requires_grad=True), torch.zeros(3, 4, requires_grad=True)
    opt = torch.optim.SGD([p, q])
    stacked = torch.zeros(2, 3, 4)
    opt.state[p]["buf"], opt.state[q]["buf"] = stacked[0], stacked[1]
    opt.state[q]["alias"] = stacked[1]  # the same bytes again
    assert bench_step.state_bytes([opt]) == (2 * 12 * F32, 2 * 12 * F32, {"buf": 2 * 12 * F32})


def _train_records() -> list[dict]:
    meta = {"bench": "train", "device": "test cpu", "torch": torch.__version__, "triton": None,
            "date": "2026-01-01T00:00:00+00:00", "case": "tiny"}  # fmt: skip
    recs = []
    for label, lr, base in (("AdamW", 3e-3, 3.0), ("LiMuon#1 exact", 0.02, 2.8)):
        for step in (0, 10, 20):
            recs.append({**meta, "record": "curve", "provider": f"{label} lr={lr:g}", "step": step,
                         "grad_evals": step * (2 if "exact" in label else 1), "train_loss": base - step / 50,
                         "val_loss": base - step / 40})  # fmt: skip
        recs.append({**meta, "record": "best", "provider": label,
                     "equal_steps": {"lr": lr, "step": 20, "val_loss": base - 0.5},
                     "equal_grad_evals": {"lr": lr, "step": 10, "val_loss": base - 0.25}})  # fmt: skip
    recs.append({**meta, "record": "verdict", "text": ["equal steps: holds"]})
    return recs


def test_step_main_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_step, "gpt2_specs", lambda layers: SPECS)
    monkeypatch.setattr(bench_step, "QUICK_REPS", TINY_REPS)
    out = tmp_path / "step-test.json"
    assert bench_step.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == len(bench_step.PROVIDERS)
    for r in records:
        for key in ("bench", "device", "torch", "triton", "date", "case", "provider", "median_ms", "p20_ms",
                    "p80_ms", "state_bytes", "peak_bytes", "loadavg_1m"):  # fmt: skip
            assert key in r, key
        assert r["bench"] == "step" and r["case"] == "distilgpt2 (2 of 6 layers)" and r["peak_bytes"] is None

    kernels = sorted((BENCH / "results").glob("kernels-*.json"))
    if kernels:
        shutil.copy(kernels[-1], tmp_path / kernels[-1].name)
    (tmp_path / "train-test.json").write_text(json.dumps(_train_records()))
    (tmp_path / "step-old.json").write_text(json.dumps([{**records[0], "date": "2000-01-01T00:00:00+00:00",
                                                          "provider": "stale"}]))  # fmt: skip
    (tmp_path / "broken.json").write_text("{not json")
    assert report.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Optimizer step" in text and "LiMuon #2 r=8 exact" in text and "stale" not in text
    assert "## Training" in text and "2.5000" in text and "equal steps: holds" in text
    assert ("## Kernels" in text) == bool(kernels)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "step.png").stat().st_size > 0 and (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "kernels.png").exists() == bool(kernels)


def test_report_without_results(tmp_path):
    assert report.main(["--results", str(tmp_path)]) == 0
    assert "No results found." in (tmp_path / "REPORT.md").read_text()
