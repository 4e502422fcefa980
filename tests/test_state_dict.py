"""Checkpoint and resume: train, save model and optimizer, rebuild both from scratch, load, continue.
The resumed run must equal the uninterrupted one bit for bit (torch.equal)."""

from __future__ import annotations

import io

import pytest
import torch
from optim_helpers import make_batch, make_closure, make_model

import limuon


def _groups(model, grouped: bool):
    if not grouped:
        return list(model.parameters())
    m = model
    return [
        {"params": [m.mix.weight, m.h1.weight, m.h2.weight, m.down.weight], "lr": 0.03, "momentum": 0.9},
        {"params": [m.up.weight, m.conv.weight, m.img.weight], "weight_decay": 0.0},
        {"params": [m.head.weight, m.head.bias], "algorithm": "adamw", "adamw_lr": 0.01},
        {"params": [m.down.bias, m.norm.weight, m.norm.bias, m.mix.bias, m.conv.bias, m.h1.bias, m.h2.bias]},
    ]


def _run(make_opt, grouped: bool, total: int, resume_at: int | None):
    model = make_model()
    batch = make_batch()
    opt = make_opt(_groups(model, grouped))
    for k in range(total):
        if k == resume_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            model = make_model(seed=123)  # different init: everything must come from the checkpoint
            model.load_state_dict(saved["model"])
            opt = make_opt(_groups(model, grouped))
            opt.load_state_dict(saved["opt"])
        opt.step(make_closure(model, batch))
    return model, opt


def _assert_same(model_a, model_b, opt_b):
    for name, p in model_b.named_parameters():
        st = opt_b.state[p]
        if "last_update" in st:
            assert st["last_update"].dtype == torch.bfloat16, f"{name}: last_update is no longer bf16"
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"{name}: resumed run differs by {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "groups"])
@pytest.mark.parametrize("orthogonalizer", ["newton_schulz", "svd"])
@pytest.mark.parametrize("rank", [None, 2], ids=["option1", "option2"])
@pytest.mark.parametrize("mode", ["exact", "approx", "none"])
def test_limuon_resume_is_bitwise(mode, rank, orthogonalizer, grouped):
    def make_opt(params):
        return limuon.LiMuon(
            params, lr=0.05, variance_reduction=mode, rank=rank, power_iters=1, seed=11, orthogonalizer=orthogonalizer,
            adamw_lr=0.05,
        )

    straight, _ = _run(make_opt, grouped, total=5, resume_at=None)
    resumed, opt = _run(make_opt, grouped, total=5, resume_at=3)
    _assert_same(straight, resumed, opt)
    if mode == "exact":  # exact_restore="all": every parameter, AdamW-routed ones too, kept its restore buffer
        assert all("last_update" in opt.state[p] for p in resumed.parameters())


@pytest.mark.parametrize("grouped", [False, True], ids=["one_group", "groups"])
@pytest.mark.parametrize("ns_compute_dtype", [None, torch.bfloat16], ids=["default", "bf16"])
def test_muon_resume_is_bitwise(ns_compute_dtype, grouped):
    def make_opt(params):
        return limuon.Muon(params, lr=0.05, adamw_lr=0.05, ns_compute_dtype=ns_compute_dtype)

    straight, _ = _run(make_opt, grouped, total=5, resume_at=None)
    resumed, opt = _run(make_opt, grouped, total=5, resume_at=3)
    _assert_same(straight, resumed, opt)
