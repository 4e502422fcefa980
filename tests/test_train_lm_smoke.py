"""Smoke test of bench/train_lm.py: a few steps of the training benchmark on a tiny model.

Checks the record fields, the gradient-evaluation count (exact LiMuon: 2 per step after the first),
the equal-compute bookkeeping, and that the stdlib data split is deterministic and disjoint.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_lm

TINY = train_lm.Config(n_layer=1, n_head=2, d_model=32, seq_len=16, batch_size=2, steps=5, eval_every=2,
                       eval_batches=1)
CURVE_FIELDS = {"step", "grad_evals", "train_loss", "val_loss", "median_ms", "diverged"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor, dict]:
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(30):
        (root / f"mod{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1  # module {i}\n" * 20)
    return train_lm.load_corpus(root)


def test_split_is_deterministic_disjoint_and_skips_third_party(tmp_path):
    names = ["b.py", "a.py", "pkg/c.py", "pkg/__init__.py", "site-packages/x.py", "test/t.py",
             "pkg/tests/u.py", "dist-packages/y.py", "notes.txt", *(f"m{i:02d}.py" for i in range(20))]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    files = train_lm.stdlib_files(tmp_path)
    rel = [f.relative_to(tmp_path).as_posix() for f in files]
    assert rel == sorted(rel)
    assert not any(part in r.split("/") for r in rel for part in ("site-packages", "dist-packages", "test", "tests"))
    assert "pkg/c.py" in rel and "notes.txt" not in rel
    train, val = train_lm.split_files(files)
    assert (train, val) == train_lm.split_files(train_lm.stdlib_files(tmp_path))
    assert not set(train) & set(val) and set(train) | set(val) == set(files)
    assert val == files[9::10]


def test_real_stdlib_split():
    files = train_lm.stdlib_files()
    assert files == train_lm.stdlib_files() and len(files) > 100
    train, val = train_lm.split_files(files)
    assert not set(train) & set(val) and len(val) == len(files) // 10


def test_corpus_and_batches(corpus):
    train_data, val_data, info = corpus
    assert train_data.dtype == torch.uint8 and info["files_train"] == 27 and info["files_val"] == 3
    assert int((train_data == 0).sum()) == 27 and int((val_data == 0).sum()) == 3  # one EOD per file
    starts = train_lm.train_batch_starts(train_data.numel(), TINY)
    assert starts.shape == (TINY.steps, TINY.batch_size)
    assert torch.equal(starts, train_lm.train_batch_starts(train_data.numel(), TINY))  # same order every run
    x, y = train_lm.get_batch(train_data, starts[0], TINY.seq_len, torch.device("cpu"))
    assert x.shape == (TINY.batch_size, TINY.seq_len) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("key", ["adamw", "limuon1-exact", "limuon1-exact-half"])
def test_train_records_and_grad_evals(corpus, key):
    train_data, val_data, _ = corpus
    spec = train_lm.SPECS[key]
    curve = train_lm.train(TINY, train_data, val_data, spec, 1e-3 if key == "adamw" else 0.02, 1e-3,
                           torch.device("cpu"))
    steps = TINY.steps // 2 if spec.half_steps else TINY.steps
    assert [r["step"] for r in curve] == sorted(train_lm.eval_steps(train_lm.dataclasses.replace(TINY, steps=steps)))
    for r in curve:
        assert set(r) == CURVE_FIELDS and not r["diverged"] and math.isfinite(r["val_loss"])
        expected = r["step"] if not spec.closure else max(0, 2 * r["step"] - 1)
        assert r["grad_evals"] == expected
    assert curve[0]["train_loss"] is None and curve[-1]["train_loss"] > 0
    assert curve[-1]["val_loss"] < curve[0]["val_loss"]


def test_summary_equal_grad_evals_point():
    def run(label: str, kind: str, mode: str | None, per_step: int, vals: list[float]) -> dict:
        curve = [{"step": s, "grad_evals": max(0, per_step * s - (per_step - 1)) if s else 0, "train_loss": 1.0,
                  "val_loss": v, "diverged": False} for s, v in zip([0, 2, 3, 4, 5], vals)]
        return {"spec": train_lm.Spec(label, kind, mode), "lr": 0.1, "curve": curve}

    runs = [run("AdamW", "adamw", None, 1, [5, 4, 3.5, 3.2, 3.0]),
            run("Muon", "muon", None, 1, [5, 3.8, 3.2, 3.0, 2.9]),
            run("LiMuon#1 exact", "limuon", "exact", 2, [5, 3.5, 3.1, 2.9, 2.8])]
    best, verdict = train_lm.summarize(runs, TINY)
    limuon = next(b for b in best if b["optimizer"] == "LiMuon#1 exact")
    assert limuon["equal_steps"]["val_loss"] == 2.8 and limuon["equal_steps"]["grad_evals"] == 9
    assert limuon["equal_grad_evals"]["step"] == 3 and limuon["equal_grad_evals"]["grad_evals"] == 5
    assert verdict["equal_steps_holds"] is True and verdict["equal_grad_evals_holds"] is False


def test_main_writes_records(tmp_path):
    out = tmp_path / "train.json"
    argv = ["--steps", "2", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--optimizers", "adamw,limuon2-exact",
            "--adamw-lrs", "1e-3", "--exact-lrs", "0.02", "--threads", str(torch.get_num_threads()), "--out", str(out)]
    assert train_lm.main(argv) == 0
    records = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    curves = [r for r in records if r["record"] == "curve"]
    for r in curves:
        for field in ("bench", "device", "torch", "triton", "date", "case", "provider", "step", "grad_evals",
                      "train_loss", "val_loss", "median_ms"):
            assert field in r
        assert r["bench"] == "train" and r["case"]["steps"] == 2
    assert {r["provider"] for r in curves} == {"AdamW lr=0.001", "LiMuon#2 exact r8 lr=0.02"}
    assert {r["record"] for r in records} == {"curve", "best", "verdict"}
