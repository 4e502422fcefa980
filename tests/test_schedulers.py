"""The AdamW part of LiMuon and Muon under a learning-rate scheduler, checked against a twin
torch.optim.AdamW driven by the same schedule, starting from ``adamw_lr`` (the independent peer).

A group with ``algorithm="adamw"`` is created with ``lr = adamw_lr``: its lr is the lr its parameters use,
what LR monitors read, and schedulers act on it as on the twin's group (a value per group where the
scheduler takes absolute lrs, as for any torch optimizer whose groups have different lrs). AdamW-routed
parameters inside a matrix group (ndim < 2) share the group's lr with the matrices: they follow the shape
of its schedule, ``adamw_lr · lr / lr₀``."""

from __future__ import annotations

import copy
import warnings

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
    "one_cycle": (lambda o: lr_scheduler.OneCycleLR(o, max_lr=[LR, ADAMW_LR], total_steps=STEPS, cycle_momentum=False),
                  lambda o: lr_scheduler.OneCycleLR(o, max_lr=ADAMW_LR, total_steps=STEPS, cycle_momentum=False)),
    "lambda_warmup": (lambda o: lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 5)),
                      lambda o: lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 5))),
    "cosine": (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8),
               lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=8)),
    "exponential": (lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),  # (recursive: reads the group's lr)
                    lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8)),
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


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_the_displayed_lr_is_the_lr_used(cls, schedule):
    """What LR monitors read (a group's ``lr``, ``get_last_lr()``) is the AdamW group's lr, equal to the
    twin's at every step; the matrix group shows the matrix lr."""
    params = make_params()
    ref_params = [nn.Parameter(p.detach().clone()) for p in params[1:]]
    opt, ref = build(cls, *params), peer(*ref_params)
    assert [g["lr"] for g in opt.param_groups] == [LR, ADAMW_LR]
    ours_sched, ref_sched = (make(o) for make, o in zip(SCHEDULES[schedule], (opt, ref)))
    for t in range(STEPS):
        step_both(opt, ref, params, ref_params, t)
        ours_sched.step()
        ref_sched.step()
        assert ours_sched.get_last_lr()[1] == pytest.approx(ref_sched.get_last_lr()[0], rel=1e-12), t
        assert opt.param_groups[1]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12), t


def test_an_adamw_group_sets_its_lr_as_lr_or_adamw_lr():
    """The group's own lr is its AdamW lr (with the optimizer's adamw_lr as default); both, different: refused."""
    matrix, _, table = make_params()
    opt = limuon.LiMuon([{"params": [matrix]}, {"params": [table], "algorithm": "adamw", "lr": 5e-3}],
                        lr=LR, adamw_lr=ADAMW_LR)
    assert (opt.param_groups[1]["lr"], opt.param_groups[1]["adamw_lr"]) == (5e-3, 5e-3)
    ref_table = nn.Parameter(table.detach().clone())
    ref = torch.optim.AdamW([ref_table], lr=5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(3):
        matrix.grad, table.grad = grads_at(t, [matrix.shape, table.shape])
        ref_table.grad = table.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(table.detach(), ref_table.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"Invalid adamw_lr: 0.001 in a group with algorithm='adamw' and lr=0.005"):
        limuon.Muon([{"params": [table], "algorithm": "adamw", "lr": 5e-3, "adamw_lr": 1e-3}], lr=LR)


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_one_absolute_lr_for_every_group_is_warned_about(cls):
    """OneCycleLR(max_lr=0.02) with one value gives the AdamW group a 0.02 peak, as it would a twin
    torch.optim.AdamW's group: said once, naming the group; a value per group says nothing."""
    params = make_params()
    opt = build(cls, *params)
    lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS)
    for p, g in zip(params, grads_at(0, [p.shape for p in params])):
        p.grad = g
    with pytest.warns(UserWarning, match=r"gave param group 1 \(algorithm='adamw', created with lr=0.001\) the "
                                         r"same schedule values as group 0.*max_lr=\[0.02, 3e-4\]"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # (once)
        fresh = build(cls, *params)
        lr_scheduler.OneCycleLR(fresh, max_lr=[LR, ADAMW_LR], total_steps=STEPS)
        fresh.step()


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_vectors_in_a_matrix_group_follow_its_schedule_shape(cls):
    """A matrix group's lr is the matrix lr; its AdamW-routed vectors run at adamw_lr · lr / lr₀, also under
    a scheduler with an absolute floor given on the matrix scale (CosineAnnealingLR's eta_min)."""
    matrix, vector, _ = make_params()
    ref_vector = nn.Parameter(vector.detach().clone())
    opt = cls([matrix, vector], lr=LR, adamw_lr=ADAMW_LR, weight_decay=WD)
    ref = torch.optim.AdamW([ref_vector], lr=ADAMW_LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    ours = lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=LR / 10)
    theirs = lr_scheduler.CosineAnnealingLR(ref, T_max=8, eta_min=ADAMW_LR / 10)
    for t in range(STEPS):
        matrix.grad, vector.grad = grads_at(t, [matrix.shape, vector.shape])
        ref_vector.grad = vector.grad.clone()
        opt.step()
        ref.step()
        ours.step()
        theirs.step()
        torch.testing.assert_close(vector.detach(), ref_vector.detach(), rtol=1e-6, atol=1e-7, msg=f"step {t}")


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_scheduler_attached_after_load_state_dict(cls):
    """Resume at half the lr (state dict saved mid-decay), then attach a scheduler: the AdamW part runs at
    half its lr too, as it did before the save (torch's ``initial_lr`` would be the resumed lr)."""
    params = make_params()
    opt = build(cls, *params)
    for g in opt.param_groups:
        g["lr"] = g["lr"] / 2  # (a decay that happened before the checkpoint)
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
    with pytest.raises(ValueError, match=r"adamw_lr.*parameter 1 of group 0 \(shape \(16,\)\).*match_rms_adamw"):
        limuon.LiMuon([matrix, vector], lr=LR)
    with pytest.raises(ValueError, match=r"adamw_lr.*parameter 0 of group 1 \(shape \(10, 4\)\).*algorithm='adamw'"):
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


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_a_checkpoint_of_the_previous_convention_keeps_its_adamw_lr(cls):
    """State dicts written before an AdamW group's lr became its AdamW lr hold the matrix lr there
    (lr = lr_at_creation = 0.02, adamw_lr = 1e-3): they load and continue at adamw_lr · lr / lr₀, under
    the scheduler state saved with them, as they did."""
    params = make_params()
    opt = build(cls, *params)
    saved = copy.deepcopy(opt.state_dict())
    old = saved["param_groups"][1]
    old.update(lr=LR / 2, lr_at_creation=LR, initial_lr=LR)  # (half-way down a schedule begun at 0.02)
    resumed = build(cls, *params)
    resumed.load_state_dict(saved)
    sched = lr_scheduler.LambdaLR(resumed, lambda t: 0.5 / (1 + t))  # base_lrs from initial_lr: 0.02, 0.02
    ref_params = [nn.Parameter(p.detach().clone()) for p in params[1:]]
    ref = peer(*ref_params)
    ref_sched = lr_scheduler.LambdaLR(ref, lambda t: 0.5 / (1 + t))
    for t in range(4):
        step_both(resumed, ref, params, ref_params, t)
        sched.step()
        ref_sched.step()
        for p, q in zip(params[1:], ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=f"step {t}")
