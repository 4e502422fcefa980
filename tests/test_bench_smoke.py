"""Smoke tests of the benchmarks: bench/bench_step.py on a tiny parameter set (every provider, the
record fields, the optimizer-state accounting of docs/ALGORITHM.md §5), the time budgets of
bench/_common.py (on a fake clock: a slow call is timed once and the record says so; a case too slow
to start is extrapolated from a smaller one), the plans the scripts print, and bench/report.py
rendering a results folder (time-boxed rows marked). Timings are not checked: speed is measured by
the benchmarks, never asserted.
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

import _common  # noqa: E402
import bench_kernels  # noqa: E402
import bench_step  # noqa: E402
import plan  # noqa: E402
import report  # noqa: E402

M, N = 24, 40
SPECS = [
    bench_step.ParamSpec("a", (M, N), "matrix"),
    bench_step.ParamSpec("b", (M, N), "matrix"),  # same shape as a: one stacked bucket in limuon
    bench_step.ParamSpec("c", (N, M), "matrix"),
    bench_step.ParamSpec("bias", (N,), "vector"),
    bench_step.ParamSpec("emb", (10, 8), "embedding"),
]
TINY_REPS = bench_step.Reps(min_n=2, max_n=2, budget_s=600.0, warmup=2)  # tiny steps: never near the budget
F32, BF16, STEP = 4, 2, 4  # bytes per fp32 word, per bf16 word, per step counter (0-d fp32 tensor)


def expected_matrix_state(provider: str, m: int, n: int, r: int = bench_step.RANK) -> int:
    """docs/ALGORITHM.md §5 per m×n matrix, in bytes, plus the step counter where the optimizer keeps one."""
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
    assert rec["warmup_steps"] == 2 and not rec["timeboxed"] and not rec["extrapolated"]
    assert rec["n_tensors"] == len(SPECS) and rec["n_matrices"] == 3
    matrices = sum(expected_matrix_state(provider, *s.shape) for s in SPECS if s.role == "matrix")
    # AdamW everywhere; exact mode (exact_restore="all") also keeps a bf16 last update of each of them.
    restore = BF16 if provider.endswith("exact") else 0
    others = sum((2 * F32 + restore) * math.prod(s.shape) + STEP for s in SPECS if s.role != "matrix")
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


def test_step_main_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_step, "gpt2_specs", lambda layers: SPECS)
    monkeypatch.setattr(bench_step, "QUICK_REPS", TINY_REPS)
    out = tmp_path / "step-test.json"
    assert bench_step.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    # The plan, printed as it starts: the sum of the budgets, 8 optimizers x 600 s.
    assert "# plan: step takes at most about 80.0 min on this device (8 optimizers, each within 600 s)" in (
        capsys.readouterr().out)
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


# -- time budgets (bench/_common.py) ----------------------------------------------------------------

CPU = torch.device("cpu")


class FakeClock:
    """Stands in for bench/_common.py's ``time``: only the fake calls below advance it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def call(self, seconds: float, made: list[float]):
        """A call that takes ``seconds`` on this clock, returns them and notes itself in ``made``."""

        def fn() -> float:
            self.now += seconds
            made.append(seconds)
            return seconds

        return fn


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(_common, "time", fake)
    return fake


@pytest.mark.parametrize(("budget", "n_made", "warmup_calls", "calls", "timeboxed"), [
    (5.0, 1, 0, 1, True),  # the first call alone is over the budget: that one call is the sample
    (45.0, 4, 2, 2, True),  # both warm-up calls fit, then only 2 of the 3 planned timed calls
    (1000.0, 12, 2, 10, False),  # as planned: 2 warm-up calls, then max_calls timed ones
])  # fmt: skip
def test_sample_calls_keeps_to_its_budget(clock, budget, n_made, warmup_calls, calls, timeboxed):
    made: list[float] = []
    t = _common.sample_calls(clock.call(10.0, made), budget, warmup=2, min_calls=3, max_calls=10)
    assert len(made) == n_made
    assert (t.warmup_calls, t.calls, t.timeboxed, t.extrapolated) == (warmup_calls, calls, timeboxed, False)
    assert t.median_ms == t.p20_ms == t.p80_ms == 10_000.0 and t.budget_s == budget
    assert clock.now <= max(budget, 10.0)  # no call started that would end past the budget


def test_measure_within_extrapolates_a_case_too_slow_to_start(clock):
    small: list[float] = []
    full: list[float] = []
    smaller = _common.Smaller(clock.call(1.0, small), scale=100.0, what="one small matrix")
    t = _common.measure_within(clock.call(100.0, full), 10.0, cuda=False, quick=True, smaller=smaller)
    assert small == [1.0] and full == []  # the case itself never started
    rec = t.fields()
    assert rec["extrapolated"] and rec["timeboxed"] and rec["calls"] == 0 and rec["budget_s"] == 10.0
    assert rec["measured_case"] == "one small matrix" and rec["measured_ms"] == 1000.0 and rec["scale"] == 100.0
    assert rec["median_ms"] == rec["p20_ms"] == rec["p80_ms"] == 100_000.0  # 1 s x 100, in ms
    assert "extrapolated" in _common.timing_note(rec)


def test_measure_within_runs_a_case_the_smaller_one_says_fits(clock):
    small: list[float] = []
    full: list[float] = []
    smaller = _common.Smaller(clock.call(0.5, small), scale=4.0, what="a quarter")
    t = _common.measure_within(clock.call(2.0, full), 30.0, cuda=False, quick=True, smaller=smaller)
    assert len(small) == 1 and len(full) == 11  # warm-up + max_calls (10 with quick): 22.5 s of 30
    assert (t.calls, t.warmup_calls, t.timeboxed, t.extrapolated) == (10, 1, False, False)
    assert t.median_ms == 2000.0 and _common.timing_note(t.fields()) == ""


def test_measure_within_fast_call_uses_autorange():
    t = _common.measure_within(lambda: None, 2.0, cuda=False, quick=True)
    assert t.calls > 100 and t.warmup_calls == 1 and not t.timeboxed and t.median_ms >= 0


def test_measure_within_cuda_path_without_a_gpu(clock, monkeypatch):
    """The CUDA path, faked: the first call (compiling kernels) is outside the budget; do_bench times the rest."""
    testing = pytest.importorskip("triton.testing")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    asked = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        asked.update(rep=rep, quantiles=quantiles)
        return [1.0, 0.9, 1.2]

    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    durations = iter([5.0, 0.01])  # a 5 s first call (compilation), then 10 ms calls
    made: list[float] = []
    t = _common.measure_within(lambda: clock.call(next(durations), made)(), 0.5, cuda=True, quick=True)
    assert made == [5.0, 0.01] and asked == {"rep": 50, "quantiles": [0.5, 0.2, 0.8]}
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.calls, t.timeboxed) == (1.0, 0.9, 1.2, None, False)
    # A call too slow for do_bench within the budget: timed by single calls, here just the one.
    made.clear()
    t = _common.measure_within(clock.call(0.3, made), 0.5, cuda=True, quick=True)
    assert len(made) == 2 and (t.calls, t.warmup_calls, t.timeboxed) == (1, 0, True)
    assert t.median_ms == pytest.approx(300.0)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_matmul_native_follows_limuon_kernels(monkeypatch, native):
    """The CPU answer is limuon_kernels' own (the one that picks its Newton–Schulz dtype); CUDA has bf16 units."""
    from limuon_kernels import cpu_features

    monkeypatch.setattr(cpu_features, "has_native_bf16_matmul", lambda: native)
    assert _common.bf16_matmul_native(CPU) is native
    assert _common.bf16_matmul_native(torch.device("cuda")) is True
    assert _common.bf16_matmul_native(torch.device("meta")) is False


def ns_flops(m: int, n: int) -> int:
    """One Newton–Schulz iteration on an m×n matrix, s ≤ l its sides: X Xᵀ 2s²l, A·A 2s³, B·X 2s²l."""
    s, l = min(m, n), max(m, n)
    return 2 * s * s * l + 2 * s**3 + 2 * s * s * l


def test_step_bf16_on_a_cpu_without_bf16_units(monkeypatch):
    monkeypatch.setattr(bench_step, "bf16_matmul_native", lambda dev: False)
    monkeypatch.setattr(bench_step, "PROBE_SHAPE", (8, 8))
    no_time = bench_step.Reps(min_n=2, max_n=2, budget_s=0.0, warmup=2)
    # torch's Muon (bf16 Newton–Schulz): not run; a step on one 8x8 matrix, scaled by Newton–Schulz FLOPs
    rec = bench_step.bench_provider("torch-muon", SPECS, CPU, reps=no_time)
    scale = sum(ns_flops(*s.shape) for s in SPECS if s.role == "matrix") / ns_flops(8, 8)
    assert rec["extrapolated"] and rec["timeboxed"] and rec["timed_steps"] == 0 and rec["budget_s"] == 0.0
    assert rec["scale"] == pytest.approx(scale) and rec["measured_case"].startswith("a step on one 8x8 matrix")
    assert rec["median_ms"] == pytest.approx(rec["measured_ms"] * scale)
    assert rec["state_bytes"] is None and rec["matrix_state_bytes"] is None  # no step ran: no state
    # Without bf16 Newton–Schulz nothing is probed: over the budget, the first step is the one timed call
    rec = bench_step.bench_provider("adamw", SPECS, CPU, reps=no_time)
    assert not rec["extrapolated"] and rec["timeboxed"] and (rec["timed_steps"], rec["warmup_steps"]) == (1, 0)
    assert rec["state_bytes"] > 0
    # with time in the budget the bf16 step runs as planned
    rec = bench_step.bench_provider("torch-muon", SPECS, CPU, reps=TINY_REPS)
    assert not rec["extrapolated"] and not rec["timeboxed"] and rec["timed_steps"] == 2 and rec["state_bytes"] > 0


def test_kernels_plan_counts_every_measurement(monkeypatch):
    monkeypatch.setattr(bench_kernels, "QUICK_CPU_SHAPES", [(16, 32)])
    args = bench_kernels.parse_args(["--quick", "--device", "cpu", "--ops", "storm_update_,newton_schulz"])
    seconds, how = bench_kernels.plan(args)
    muon = bench_kernels.muon_ns is not None
    n = 2 * len(bench_kernels.providers(CPU)) + 1 + muon  # each backend per op; the eager 3-op STORM; Muon
    roofs = {"copy", str(bench_kernels.lk.get_ns_compute_dtype(CPU))} | ({"torch.bfloat16"} if muon else set())
    assert seconds == (n + len(roofs)) * bench_kernels.BUDGET_S[True]
    assert how == f"{n} measurements and {len(roofs)} roofs, each within 2 s"


@pytest.mark.skipif(bench_kernels.muon_ns is None, reason="no torch.optim.Muon in this torch")
def test_kernels_main_timeboxes_and_extrapolates(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_kernels, "QUICK_CPU_SHAPES", [(3, 32, 48)])
    monkeypatch.setattr(bench_kernels, "BUDGET_S", {True: 1e-9, False: 1e-9})  # nothing fits
    monkeypatch.setattr(bench_kernels, "bf16_matmul_native", lambda dev: False)
    out = tmp_path / "kernels-test.json"
    assert bench_kernels.main(["--quick", "--device", "cpu", "--ops", "newton_schulz", "--out", str(out)]) == 0
    assert "# plan: kernels takes at most about" in capsys.readouterr().out
    records = json.loads(out.read_text())
    bf16 = [r for r in records if r["compute_dtype"] == "bfloat16"]  # Muon's; limuon's too where bf16 is its default
    assert "torch.optim.Muon" in [r["provider"] for r in bf16]
    for r in bf16:  # not run: one 8x12 matrix timed, scaled by the work
        assert r["extrapolated"] and r["calls"] == 0 and r["measured_case"].startswith("8x12")
        assert r["scale"] == pytest.approx(3 * ns_flops(32, 48) / ns_flops(8, 12))
        assert r["median_ms"] == pytest.approx(r["measured_ms"] * r["scale"])
    others = [r for r in records if r["compute_dtype"] != "bfloat16"]
    assert all(r["timeboxed"] and r["calls"] == 1 and not r["extrapolated"] for r in others)


def _step_record(provider_id: str, **timing) -> dict:
    base = {"bench": "step", "device": "test cpu", "date": "2026-01-01T00:00:00+00:00", "case": "tiny",
            "provider_id": provider_id, "provider": bench_step.PROVIDERS[provider_id], "grad_evals": 1,
            "median_ms": 100.0, "p20_ms": 90.0, "p80_ms": 110.0, "state_bytes": 4 * MB, "matrix_state_bytes": MB,
            "peak_bytes": None, "calls": 5, "warmup_calls": 2, "budget_s": 12.0, "timeboxed": False,
            "extrapolated": False, "measured_case": None, "measured_ms": None}  # fmt: skip
    return {**base, **timing}


MB = 2**20


def test_report_marks_timeboxed_and_extrapolated_rows(tmp_path):
    records = [
        _step_record("adamw"),
        _step_record("muon", timeboxed=True, calls=1, warmup_calls=0, median_ms=20_000.0, p20_ms=20_000.0,
                     p80_ms=20_000.0),
        _step_record("torch-muon", timeboxed=True, extrapolated=True, calls=0, warmup_calls=0, median_ms=282_000.0,
                     p20_ms=282_000.0, p80_ms=282_000.0, measured_case="a step on one 384x384 matrix",
                     measured_ms=1900.0, state_bytes=None, matrix_state_bytes=None),
    ]  # fmt: skip
    (tmp_path / "step-test.json").write_text(json.dumps(records))
    assert report.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| tiny |")}
    assert "†" not in rows["torch.optim.AdamW"] and "‡" not in rows["torch.optim.AdamW"]
    assert "| 20000 † |" in rows["limuon.Muon"]
    assert "| 282000 ‡ |" in rows["torch.optim.Muon+AdamW"]
    assert "- † tiny limuon.Muon: time-boxed: 1 timed call(s) (the first call, so one-time costs included) " \
           "within its 12 s budget" in text
    assert "- ‡ tiny torch.optim.Muon+AdamW: not run, it would exceed its 12 s budget; extrapolated from " \
           "a step on one 384x384 matrix (1900 ms, timed once)" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "step.png").stat().st_size > 0  # the step not run (no state) is drawn too


def test_plan_shortens_training_only_when_the_suite_would_not_fit(monkeypatch, tmp_path, capsys):
    train_lm = plan.train_lm
    monkeypatch.setattr(train_lm, "load_corpus", lambda: (None, None, {}))
    monkeypatch.setattr(train_lm, "cpu_threads", lambda threads, dev: None)
    monkeypatch.setattr(train_lm, "run_seconds", lambda cfg, names, *a, **k: {key: 10.0 for key in names})
    full = sum(10.0 * len(train_lm.LRS_QUICK[spec.sweep]) for spec in train_lm.SPECS.values())
    assert plan.train_plan(CPU, budget_s=full) == (full, [], "the full lr sweep")
    # Over the budget: one lr per kind, the best of the newest recorded quick run (AdamW: 2e-3, not 1e-3).
    def best(label, lr, date):
        return {"record": "best", "quick": True, "provider": label, "date": date, "equal_steps": {"lr": lr}}

    recs = [best("AdamW", 1e-3, "2026-01-01"), best("Muon", 0.04, "2026-01-01"),
            best("LiMuon#1 exact", 0.005, "2026-01-01"), best("AdamW", 2e-3, "2026-02-01")]  # fmt: skip
    shortened = {**best("Muon", 0.02, "2026-03-01"), "case": {"lr_sweep": {"adamw": [2e-3], "matrix": [0.02]}}}
    (tmp_path / "train-a.json").write_text(json.dumps(recs[:3]))
    (tmp_path / "train-b.json").write_text(json.dumps(recs[3:]))
    (tmp_path / "train-c.json").write_text(json.dumps([shortened]))  # newer, but one lr: not a sweep's best
    monkeypatch.setattr(plan, "RESULTS_DIR", tmp_path)
    seconds, args, how = plan.train_plan(CPU, budget_s=full - 1)
    assert seconds == 10.0 * len(train_lm.SPECS)
    assert args == ["--adamw-lrs", "0.002", "--matrix-lrs", "0.04", "--exact-lrs", "0.005"]
    assert how.startswith("one lr per optimizer, best of the quick run of 2026-02-01")
    # Still over: one lr, and only the optimizers of the paper's ordering.
    seconds, args3, how = plan.train_plan(CPU, budget_s=10.0 * len(train_lm.SPECS) - 1)
    assert seconds == 30.0 and args3 == [*args, "--optimizers", "adamw,muon,limuon1-exact"]
    assert how.startswith("one lr, AdamW, Muon, LiMuon#1 exact only")
    # The whole plan, before step 1 of scripts/bench.sh: on stderr; stdout: train_lm.py's arguments.
    assert plan.main(["--ops", "storm_update_"]) == 0
    out, err = capsys.readouterr()
    assert "# quick benchmark plan on" in err and "kernels ≤" in err and "train ≈" in err
    assert out.split() in ([], args, args3)
