"""Design properties of the optimizers that the numerical tests do not see: one kernel launch per
same-shape bucket (state kept in one stacked tensor), and the RSVD seed as a per-group setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import limuon
import limuon_kernels as lk


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Three 16×16 matrices (one bucket), one 16×8 and one 4×16 (buckets of one), biases (AdamW).
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))


def _closure(model, opt):
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    return closure


def test_momentum_pass_runs_once_per_bucket(monkeypatch):
    model = _model()
    opt = limuon.LiMuon(model.parameters(), lr=0.01, adamw_lr=0.01, variance_reduction="exact")
    calls = []
    real = lk.momentum_ns_input_
    def spy(m, g, g_old, *a):
        calls.append((tuple(m.shape), g_old is not None))
        return real(m, g, g_old, *a)

    monkeypatch.setattr(lk, "momentum_ns_input_", spy)
    closure = _closure(model, opt)
    for _ in range(3):
        opt.step(closure)
    # Step 1 has no correction term (no g_old); steps 2 and 3 have it; 3 buckets, one call apiece.
    shapes = [(3, 16, 16), (1, 16, 8), (1, 4, 16)]
    assert sorted(calls) == sorted([(s, False) for s in shapes] + [(s, True) for s in shapes] * 2)


@pytest.mark.parametrize("opt_cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_bucket_state_is_one_stacked_tensor_also_after_resume(opt_cls):
    model = _model()
    kwargs = {"variance_reduction": "approx"} if opt_cls is limuon.LiMuon else {}
    opt = opt_cls(model.parameters(), lr=0.01, adamw_lr=0.01, **kwargs)
    closure = _closure(model, opt)
    opt.step(closure)
    opt.step(closure)
    square = [model[i].weight for i in (1, 2, 3)]

    def storages(o):
        return {o.state[p]["momentum_buffer"].untyped_storage().data_ptr() for p in square}

    assert len(storages(opt)) == 1
    fresh = opt_cls(model.parameters(), lr=0.01, adamw_lr=0.01, **kwargs)
    fresh.load_state_dict(opt.state_dict())  # without a save/load the tensors are the old optimizer's
    fresh.step(_closure(model, fresh))
    assert len(storages(fresh)) == 1
    assert storages(fresh).isdisjoint(storages(opt)), "the resumed optimizer must not write into the old state"


def _lowrank_run(**group_extra) -> list[torch.Tensor]:
    model = _model()
    opt = limuon.LiMuon([{"params": model.parameters(), **group_extra}], lr=0.01, rank=2, oversample=1,
                        variance_reduction="none", adamw_lr=0.01)
    closure = _closure(model, opt)
    for _ in range(3):
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def test_seed_is_a_per_group_setting():
    base = _lowrank_run()
    other = _lowrank_run(seed=3)
    assert any(not torch.equal(a, b) for a, b in zip(base, other)), "the group seed must change the sketch"
    model = _model()
    opt = limuon.LiMuon(model.parameters(), lr=0.01, rank=2, oversample=1, variance_reduction="none", seed=3,
                        adamw_lr=0.01)
    closure = _closure(model, opt)
    for _ in range(3):
        opt.step(closure)
    assert all(torch.equal(a, b.detach()) for a, b in zip(other, model.parameters()))


def test_changing_rank_between_steps_converts_the_state_and_frees_the_old_one():
    model = _model()
    opt = limuon.LiMuon(model.parameters(), lr=0.01, variance_reduction="none", adamw_lr=0.01)
    closure = _closure(model, opt)
    square = [model[i].weight for i in (1, 2, 3)]
    opt.step(closure)
    opt.param_groups[0]["rank"] = 2
    opt.step(closure)
    assert all("momentum_buffer" not in opt.state[p] and opt.state[p]["U"].shape == (16, 2) for p in square)
    assert not [k for k in opt._stacks if k[0] == "momentum_buffer"], "the dense stack must be released"
    opt.param_groups[0]["rank"] = None
    opt.step(closure)
    assert all("U" not in opt.state[p] and opt.state[p]["momentum_buffer"].shape == (16, 16) for p in square)
    assert not [k for k in opt._stacks if k[0] in ("U", "S", "V")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exact_mode_second_call_sees_the_same_random_draws():
    # Dropout masks (any torch RNG use) must repeat in the second closure call: the same sample ξ.
    model = _model()
    opt = limuon.LiMuon(model.parameters(), lr=0.01, adamw_lr=0.01, variance_reduction="exact")
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    draws = []

    def closure():
        opt.zero_grad()
        noise = torch.rand(10, 16)
        draws.append(noise)
        loss = (model(x) * 0 + nn.functional.dropout(model[0](x), 0.5).sum() + noise.sum()).square().mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert len(draws) == 5
    assert torch.equal(draws[1], draws[2]) and torch.equal(draws[3], draws[4])
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[2], draws[3]), "steps draw anew"


def test_backend_failure_changes_nothing(monkeypatch):
    model = _model()
    opt = limuon.LiMuon(model.parameters(), lr=0.01, adamw_lr=0.01, variance_reduction="approx")
    closure = _closure(model, opt)
    opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]

    def broken(device):
        raise RuntimeError("backend misconfigured")

    monkeypatch.setattr(lk.backend, "resolve", broken)
    with pytest.raises(RuntimeError, match="misconfigured"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = [opt.state[p] for p in model.parameters()]
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(state, after))


def test_rank_change_with_a_skipping_matrix_keeps_working():
    model = _model()
    opt = limuon.LiMuon(model.parameters(), lr=0.01, rank=2, variance_reduction="none", adamw_lr=0.01)
    closure = _closure(model, opt)
    opt.step(closure)
    opt.param_groups[0]["rank"] = 3
    model[2].weight.requires_grad_(False)  # skips this step: keeps its rank-2 factors
    opt.step(closure)
    model[2].weight.requires_grad_(True)
    opt.step(closure)  # rank-2 and rank-3 factors of one shape: separate buckets, no crash
    assert all(opt.state[model[i].weight]["U"].shape == (16, 3) for i in (1, 2, 3))


def test_scheduler_scales_adamw_lr_too():
    model = _model()
    opt = limuon.Muon(model.parameters(), lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    assert sched.get_last_lr()[0] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    closure = _closure(model, opt)
    opt.step(closure)
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert not any(moved), "lr 0 from the scheduler must freeze the AdamW-routed parameters too"


def test_leaving_exact_mode_drops_the_restore_buffer_and_adamw_groups_need_no_closure():
    model = _model()
    opt = limuon.LiMuon(model.parameters(), lr=0.01, adamw_lr=0.01, variance_reduction="exact")
    opt.step(_closure(model, opt))
    # exact_restore="all": the AdamW-routed bias keeps one too
    assert "last_update" in opt.state[model[1].weight] and "last_update" in opt.state[model[1].bias]
    opt.param_groups[0]["variance_reduction"] = "approx"
    opt.step(_closure(model, opt))
    assert all("last_update" not in st for st in opt.state.values())
    only_adamw = limuon.LiMuon([{"params": model[4].parameters(), "algorithm": "adamw"}], lr=0.01, adamw_lr=0.01,
                               variance_reduction="exact")
    model.zero_grad()
    model(torch.randn(3, 8)).sum().backward()
    only_adamw.step()  # exact mode, but there is no matrix to run it on
