"""Loading state: a torch.optim.Muon state dict continues as torch's own run does; load_state_dict
post-hooks may store anything in ``optimizer.state``; malformed state dicts are refused clearly with
nothing changed; copies and pickles keep or loudly refuse ``distributed_mesh``."""

from __future__ import annotations

import copy
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
from optim_helpers import RANDOM_SHAPES, random_grads, random_init
from torch import nn

import limuon

MATRICES = [i for i, s in enumerate(RANDOM_SHAPES) if len(s) == 2]
RTOL_BF16 = 5e-2  # bf16 Newton–Schulz in two implementations (as tests/test_muon.py)


def torch_muon_run(steps: int):
    params = [nn.Parameter(random_init()[i].clone()) for i in MATRICES]
    opt = torch.optim.Muon(params, lr=0.02, momentum=0.9)
    for t in range(steps):
        for p, i in zip(params, MATRICES):
            p.grad = random_grads(t)[i].clone()
        opt.step()
    return params, opt


def continue_run(opt, params, start: int, steps: int) -> None:
    for t in range(start, start + steps):
        for p, i in zip(params, MATRICES):
            p.grad = random_grads(t)[i].clone()
        opt.step()


def test_torch_muon_state_dict_continues_like_torch():
    params, theirs = torch_muon_run(3)
    saved = copy.deepcopy(theirs.state_dict())
    at_save = [p.detach().clone() for p in params]
    ours_params = [nn.Parameter(p.detach().clone()) for p in params]
    ours = limuon.Muon(ours_params, lr=0.5, momentum=0.5, ns_compute_dtype=torch.bfloat16)
    ours.load_state_dict(saved)  # lr 0.02 and momentum 0.9 come from the state dict
    assert ours.param_groups[0]["lr"] == 0.02 and ours.param_groups[0]["momentum"] == 0.9
    continue_run(theirs, params, 3, 3)
    continue_run(ours, ours_params, 3, 3)
    for p, q, w in zip(ours_params, params, at_save):
        err = ((p - q).norm() / (q - w).norm()).item()
        assert err <= RTOL_BF16, f"shape {tuple(p.shape)}: {err:.3g} of the displacement since the save"


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_post_hook_may_store_anything_in_state(cls):
    params = [nn.Parameter(random_init()[i].clone()) for i in MATRICES]
    opt = cls(params, lr=0.02)
    for p, i in zip(params, MATRICES):
        p.grad = random_grads(0)[i].clone()
    opt.step()
    opt.register_load_state_dict_post_hook(lambda o: o.state.__setitem__("hook_ran", True))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.state["hook_ran"] is True
    opt.step()
    opt.step()
    assert opt.state["hook_ran"] is True


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
@pytest.mark.parametrize("broken", ["no_state", "no_groups", "not_a_dict", "state_not_a_dict"])
def test_malformed_state_dict_is_refused_with_nothing_changed(cls, broken):
    params = [nn.Parameter(random_init()[i].clone()) for i in MATRICES]
    opt = cls(params, lr=0.02)
    for p, i in zip(params, MATRICES):
        p.grad = random_grads(0)[i].clone()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    good = opt.state_dict()
    bad = {"no_state": {"param_groups": good["param_groups"]}, "no_groups": {"state": good["state"]},
           "not_a_dict": [good], "state_not_a_dict": {**good, "state": [1, 2]}}[broken]
    with pytest.raises(ValueError, match="Invalid state_dict"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(after["state"][k][name], v, rtol=0, atol=0)


def test_loaded_groups_are_checked_before_anything_changes():
    params = [nn.Parameter(random_init()[i].clone()) for i in MATRICES]
    opt = limuon.LiMuon(params, lr=0.02)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["momentum"] = 1.5
    with pytest.raises(ValueError, match="momentum"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["momentum"] is None and opt.param_groups[0]["lr"] == 0.02


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_copies_without_a_mesh_step_like_the_original(cls):
    params = [nn.Parameter(random_init()[i].clone()) for i in MATRICES]
    opt = cls(params, lr=0.02)
    continue_run(opt, params, 0, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.__dict__["_distributed_mesh"] is None
        cparams = [p for g in clone.param_groups for p in g["params"]]
        continue_run(clone, cparams, 2, 2)
        ref = [nn.Parameter(p.detach().clone()) for p in params]
        twin = cls(ref, lr=0.02)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        continue_run(twin, ref, 2, 2)
        for a, b in zip(cparams, ref):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_copying_an_optimizer_with_a_mesh_is_refused(cls, one_process_group):
    params = [nn.Parameter(random_init()[i].clone()) for i in MATRICES]
    opt = cls(params, lr=0.02, distributed_mesh=one_process_group)
    for copier in (copy.deepcopy, pickle.dumps):
        with pytest.raises(RuntimeError, match="distributed_mesh cannot be copied or pickled"):
            copier(opt)


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_param_groups_hold_only_plain_values(cls):
    """torch.distributed.checkpoint flattens param groups and refuses a ``torch.dtype``: the compute dtype
    is kept by name, and still applied."""
    params = [nn.Parameter(random_init()[i].clone()) for i in MATRICES]
    opt = cls(params, lr=0.02, ns_compute_dtype=torch.bfloat16)
    plain = (int, float, str, bool, type(None))
    for group in opt.state_dict()["param_groups"]:
        for key, value in group.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            assert all(isinstance(v, plain) for v in values), f"{key}={value!r}"
    assert opt.param_groups[0]["ns_compute_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="ns_compute_dtype"):
        cls(params, lr=0.02, ns_compute_dtype=torch.int8)
