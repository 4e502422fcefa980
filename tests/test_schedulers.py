"""The AdamW part of LiMuon and Muon follows the lr schedule's shape relative to the lr the group was
created with: its lr is ``adamw_lr · lr / lr₀``. Checked against torch.optim.AdamW driven by the same
schedule, scaled to start from ``adamw_lr`` (the independent peer)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import limuon

LR, ADAMW_LR, WD, STEPS = 0.02, 1e-3, 0.1, 12


def make_params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    matrix = nn.Parameter(torch.randn(8, 16, generator=gen) * 0.1)
    vector = nn.Parameter(torch.randn(16, generator=gen))
    table = nn.Parameter(torch.randn(10, 4, generator=gen))  # an embedding: AdamW through its group
    return matrix, vector, table


def grads_at(t: int, shapes) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen) for s in shapes]


def build(cls, matrix, vector, table):
    groups = [{"params": [matrix, vector]}, {"params": [table], "algorithm": "adamw"}]
    if cls is limuon.LiMuon:
        return cls(groups, lr=LR, adamw_lr=ADAMW_LR, weight_decay=WD, variance_reduction="approx")
    return cls(groups, lr=LR, adamw_lr=ADAMW_LR, weight_decay=WD)


def peer(vector, table):
    """torch.optim.AdamW with the hybrid's AdamW settings, on copies of the AdamW-routed parameters."""
    return torch.optim.AdamW([vector, table], lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)


SCHEDULES = {
    # name: (schedule for the hybrid, the same shape for the peer starting at ADAMW_LR)
    "one_cycle": (lambda o: lr_scheduler.OneCycleLR(o, max_lr=LR, total_steps=STEPS, cycle_momentum=False),
                  lambda o: lr_scheduler.OneCycleLR(o, max_lr=ADAMW_LR, total_steps=STEPS, cycle_momentum=False)),
    "lambda_warmup": (lambda o: lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 5)),
                      lambda o: lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 5))),
    "cosine": (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=LR / 10),
               lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=ADAMW_LR / 10)),
}


def step_both(opt, ref, params, ref_params, t: int) -> None:
    for p, g in zip(params, grads_at(t, [p.shape for p in params])):
        p.grad = g
    for p, g in zip(ref_params, grads_at(t, [p.shape for p in params])[1:]):
        p.grad = g
    opt.step()
    ref.step()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_adamw_part_follows_the_schedule_shape(cls, schedule):
    params = make_params()
    ref_params = [nn.Parameter(p.detach().clone()) for p in params[1:]]
    opt, ref = build(cls, *params), peer(*ref_params)
    ours_sched, ref_sched = (make(o) for make, o in zip(SCHEDULES[schedule], (opt, ref)))
    for t in range(STEPS):
        step_both(opt, ref, params, ref_params, t)
        ours_sched.step()
        ref_sched.step()
        for p, q in zip(params[1:], ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"{schedule}, step {t}")


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_scheduler_attached_after_load_state_dict(cls):
    """Resume at half the lr (state dict saved mid-decay), then attach a scheduler: the AdamW part runs at
    half its lr too, as it did before the save (torch's ``initial_lr`` would be the resumed lr)."""
    params = make_params()
    opt = build(cls, *params)
    for g in opt.param_groups:
        g["lr"] = LR / 2  # (a decay that happened before the checkpoint)
    for p, g in zip(params, grads_at(0, [p.shape for p in params])):
        p.grad = g
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # (the state dict shares tensors with the optimizer)

    ref_params = [nn.Parameter(p.detach().clone()) for p in params[1:]]
    ref = peer(*ref_params)
    ref.load_state_dict({"state": copy.deepcopy({i: saved["state"][i + 1] for i in range(2)}),
                         "param_groups": [{**ref.param_groups[0], "params": [0, 1]}]})
    for g in ref.param_groups:
        g["lr"] = ADAMW_LR / 2
    resumed = build(cls, *params)
    resumed.load_state_dict(copy.deepcopy(saved))
    ours_sched = lr_scheduler.LambdaLR(resumed, lambda t: 1.0 / (1 + t))
    ref_sched = lr_scheduler.LambdaLR(ref, lambda t: 1.0 / (1 + t))
    for t in range(1, 5):
        step_both(resumed, ref, params, ref_params, t)
        ours_sched.step()
        ref_sched.step()
        for p, q in zip(params[1:], ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"step {t}")


def test_match_rms_adamw_shares_the_lr_and_anything_else_needs_adamw_lr():
    matrix, vector, table = make_params()
    with pytest.raises(ValueError, match=r"adamw_lr.*parameter 1 \(shape \(16,\)\).*match_rms_adamw"):
        limuon.LiMuon([matrix, vector], lr=LR)
    with pytest.raises(ValueError, match=r"adamw_lr.*parameter 1 \(shape \(10, 4\)\).*algorithm='adamw'"):
        limuon.Muon([{"params": [matrix]}, {"params": [table], "algorithm": "adamw"}], lr=LR)
    limuon.LiMuon([matrix], lr=LR)  # matrices only: no AdamW part, nothing to ask
    opt = limuon.LiMuon([matrix, vector], lr=3e-4, adjust_lr_fn="match_rms_adamw", weight_decay=WD)
    ref_vector = nn.Parameter(vector.detach().clone())
    ref = torch.optim.AdamW([ref_vector], lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    for t in range(3):
        matrix.grad, vector.grad = grads_at(t, [matrix.shape, vector.shape])
        ref_vector.grad = vector.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(vector.detach(), ref_vector.detach(), rtol=1e-6, atol=1e-7)
