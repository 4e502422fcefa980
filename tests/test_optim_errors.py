"""Bad input to limuon.LiMuon and limuon.Muon: invalid hyperparameters, non-finite, sparse and complex
gradients, exact mode without a closure. A refused step must leave parameters and state untouched."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from optim_helpers import (
    equal_nested,
    make_batch,
    make_closure,
    make_model,
    snapshot,
)
from torch import nn

import limuon


def _params():
    return [nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6))]


LIMUON_BAD = [
    ("lr", -1e-3),
    ("momentum", 0.0),
    ("momentum", 1.0),
    ("momentum", -0.5),
    ("momentum", 1.5),
    ("rank", 0),
    ("rank", -2),
    ("oversample", -1),
    ("power_iters", -1),
    ("variance_reduction", "storm"),
    ("gamma", -0.25),
    ("gamma", 1.5),
    ("orthogonalizer", "qr"),
    ("ns_steps", 0),
    ("ns_coefficients", "bogus"),
    ("eps", -1e-7),
    ("weight_decay", -0.1),
    ("adjust_lr_fn", "sqrt"),
    ("adamw_lr", -0.5),
    ("adamw_betas", (1.0, 0.95)),
    ("adamw_betas", (0.9, -0.25)),
    ("adamw_eps", -1e-8),
    ("adamw_weight_decay", -0.75),
]

MUON_BAD = [
    ("lr", -1e-3),
    ("weight_decay", -0.1),
    ("momentum", -0.5),
    ("ns_steps", 0),
    ("eps", -1e-7),
    ("adjust_lr_fn", "sqrt"),
    ("adamw_lr", -0.5),
    ("adamw_betas", (0.9, 1.5)),
    ("adamw_eps", -1e-8),
    ("adamw_weight_decay", -0.75),
]


def _bad_value_token(value) -> str:
    """The part of the value the message must show: the offending entry of a pair."""
    if isinstance(value, tuple):
        value = next(v for v in value if not 0.0 <= v < 1.0)
    return str(value)


def _check_message(exc: Exception, name: str, value) -> None:
    msg = str(exc)
    assert name in msg, f"message does not name {name!r}: {msg}"
    assert _bad_value_token(value) in msg, f"message does not show the value {value!r}: {msg}"


@pytest.mark.parametrize("name,value", LIMUON_BAD, ids=lambda v: str(v))
def test_limuon_rejects_bad_hyperparameter(name, value):
    with pytest.raises(ValueError) as info:
        limuon.LiMuon(_params(), **{name: value})
    _check_message(info.value, name, value)


@pytest.mark.parametrize("name,value", LIMUON_BAD, ids=lambda v: str(v))
def test_limuon_rejects_bad_hyperparameter_in_group(name, value):
    with pytest.raises(ValueError) as info:
        limuon.LiMuon([{"params": _params()[:1]}, {"params": _params()[1:], name: value}])
    _check_message(info.value, name, value)


@pytest.mark.parametrize("name,value", MUON_BAD, ids=lambda v: str(v))
def test_muon_rejects_bad_hyperparameter(name, value):
    with pytest.raises(ValueError) as info:
        limuon.Muon(_params(), **{name: value})
    _check_message(info.value, name, value)


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_adamw_lr_required_for_adamw_routed_params(cls):
    """adamw_lr has no default where a group routes parameters to AdamW (a matrix lr such as 0.02 is far
    too large for AdamW), unless adjust_lr_fn="match_rms_adamw" scales the matrix lr to AdamW's. It is
    checked after the other hyperparameters, and again before every step."""
    with pytest.raises(ValueError, match=r"Invalid adamw_lr: None; parameter 1 of group 0 \(shape \(6,\)\) goes to "
                                         r"AdamW \(it has ndim < 2\).*adamw_lr=.*match_rms_adamw.*Pass the model "
                                         r"itself \(limuon.LiMuon\(model, ...\)\) rather than model.parameters\(\)"):
        cls(_params())
    matrix = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"Invalid adamw_lr: None; parameter 0 of group 1 \(shape \(4, 6\)\) goes to "
                                         r"AdamW \(the group has algorithm='adamw'\)"):
        cls([{"params": _params(), "adamw_lr": 1e-3}, {"params": [matrix], "algorithm": "adamw"}])
    with pytest.raises(ValueError, match=r"Invalid lr: -1\.0"):
        cls(_params(), lr=-1.0)
    cls(_params(), adjust_lr_fn="match_rms_adamw")  # lr serves both
    opt = cls(_params()[:1])  # only a matrix: nothing goes to AdamW
    with pytest.raises(ValueError, match=r"Invalid adamw_lr: None; parameter 0 of group 1 \(shape \(6,\)\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(6))]})
    assert len(opt.param_groups) == 1

    params = _params()
    opt = cls(params, adamw_lr=1e-3)
    opt.param_groups[0]["adamw_lr"] = None
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"Invalid adamw_lr: None"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before)) and not opt.state


def test_exact_mode_without_closure():
    # Exact mode needs step(closure) from the first step on (only a step with lr = 0 in every exact
    # group and no state yet may go without: tests/test_exact_restore.py). A missing closure fails
    # with nothing changed, on the first step as on a later one; the message names the way out.
    params = _params()
    opt = limuon.LiMuon(params, variance_reduction="exact", adamw_lr=1e-3)

    def closure():
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = sum((p * p).sum() for p in params)
            loss.backward()
        return loss.detach()

    for step in range(2):
        closure()  # gradients in .grad, as a loop that forgot to pass the closure would leave them
        before = [p.detach().clone() for p in params]
        state_before = copy.deepcopy(opt.state_dict())
        with pytest.raises(RuntimeError, match=r"closure") as info:
            opt.step()
        assert "approx" in str(info.value)
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before)), f"step {step}: params changed"
        assert equal_nested(opt.state_dict(), state_before), f"step {step}: state changed"
        assert step > 0 or not opt.state
        opt.step(closure)
        assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))


# -- non-finite gradients -------------------------------------------------------------------------


def _poison(model, name: str, value: float):
    """A closure whose gradients of ``name`` get one non-finite entry (on every call)."""
    closure = make_closure(model, make_batch())

    def poisoned():
        loss = closure()
        dict(model.named_parameters())[name].grad.view(-1)[3] = value
        return loss

    return poisoned


def _message_names(exc: Exception, index: int, shape) -> None:
    msg = str(exc)
    assert re.search(rf"(?<!\d){index}(?!\d)", msg), f"message does not give index {index}: {msg}"
    assert re.search(r"\D+".join(str(s) for s in shape), msg), f"message does not give shape {shape}: {msg}"
    assert re.search(r"finite", msg, re.I), f"message does not say the gradient is not finite: {msg}"


# (name, index in model.parameters(), shape): a matrix, a conv weight, a vector (AdamW)
POISON_TARGETS = [("img.weight", 9, (16, 96)), ("conv.weight", 7, (24, 2, 3, 3)), ("conv.bias", 8, (24,))]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("target", POISON_TARGETS, ids=lambda t: t[0])
@pytest.mark.parametrize("optimizer", ["limuon-exact", "limuon-approx", "limuon-none", "muon"])
def test_non_finite_gradient_changes_nothing(optimizer, target, value):
    name, index, shape = target
    model = make_model()
    assert [n for n, _ in model.named_parameters()].index(name) == index
    if optimizer == "muon":
        opt = limuon.Muon(model.parameters(), lr=0.05, adamw_lr=0.05)
    else:
        mode = optimizer.split("-")[1]
        opt = limuon.LiMuon(model.parameters(), lr=0.05, variance_reduction=mode, rank=3, adamw_lr=0.05)
    closure = make_closure(model, make_batch())
    for _ in range(2):
        opt.step(closure)
    params = snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(Exception) as info:
        opt.step(_poison(model, name, value))
    _message_names(info.value, index, shape)
    assert all(torch.equal(p.detach(), params[n]) for n, p in model.named_parameters()), "params changed"
    assert equal_nested(opt.state_dict(), state), "optimizer state changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_huge_finite_gradients_are_not_refused(cls, dtype):
    # The finiteness check sums each gradient first (fast); a sum that overflows is not a NaN/Inf
    # in the gradient, and such gradients are checked exactly before anything is refused.
    big = torch.finfo(dtype).max / 2
    params = [torch.nn.Parameter(torch.randn(4, 6).to(dtype)), torch.nn.Parameter(torch.randn(6).to(dtype))]
    for p in params:
        p.grad = torch.full_like(p, big)
    opt = cls(params, lr=0.01, adamw_lr=0.01, **({"variance_reduction": "approx"} if cls is limuon.LiMuon else {}))
    opt.step()  # no NonFiniteGradientError (what the update makes of such values is another matter)
    assert len(opt.state) == len(params)  # both parameters were stepped


@pytest.mark.parametrize("rank", [None, 3])
def test_non_finite_only_at_previous_iterate(rank):
    """Exact mode: the gradient at W_k is finite, the one at W_{k−1} (second closure call) is not.
    The step must be refused with W_k and the state intact, and training then continues exactly as a
    twin run that never saw the bad batch: bitwise, in parameters and optimizer state. (What the property
    says; a comparison with the fp64 reference would test the trajectory's conditioning instead: on one
    fixed batch exact mode's correction is rounding noise that the polar factor amplifies.)"""
    kw = dict(lr=0.05, momentum=0.9, variance_reduction="exact", orthogonalizer="svd", rank=rank, oversample=15,
              adamw_lr=0.05)
    model, twin = make_model(), make_model()
    opt, twin_opt = limuon.LiMuon(model.parameters(), **kw), limuon.LiMuon(twin.parameters(), **kw)
    calls = [0]
    batch = make_batch()
    closure, twin_closure = make_closure(model, batch, calls), make_closure(twin, batch)
    for _ in range(2):
        opt.step(closure)
        twin_opt.step(twin_closure)

    def second_call_poisoned():
        loss = closure()
        if calls[0] == 5:  # 1 call in step 1, 2 in step 2; this step's second call is the 5th
            model.mix.weight.grad[0, 0] = float("nan")
        return loss

    params = snapshot(model)
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(Exception) as info:
        opt.step(second_call_poisoned)
    assert calls[0] == 5, f"{calls[0]} closure calls"
    _message_names(info.value, 5, (16, 123))
    assert all(torch.equal(p.detach(), params[n]) for n, p in model.named_parameters()), "params changed"
    assert equal_nested(opt.state_dict(), state), "optimizer state changed"
    for step in range(2):
        opt.step(closure)
        twin_opt.step(twin_closure)
        assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(model.parameters(), twin.parameters())), \
            f"step {step} after the refused one: parameters differ from the twin's"
        assert equal_nested(opt.state_dict(), twin_opt.state_dict()), f"step {step}: state differs from the twin's"


# -- sparse and complex ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["limuon", "muon"])
def test_sparse_gradient_rejected(optimizer):
    emb = nn.Embedding(10, 4, sparse=True)
    cls = limuon.LiMuon if optimizer == "limuon" else limuon.Muon
    kw = {"variance_reduction": "approx"} if optimizer == "limuon" else {}
    before = emb.weight.detach().clone()
    with pytest.raises((RuntimeError, ValueError, TypeError), match=r"(?i)sparse"):
        opt = cls(emb.parameters(), **kw)
        emb(torch.tensor([1, 2, 3])).sum().backward()
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("optimizer", ["limuon", "muon"])
@pytest.mark.parametrize("shape", [(3, 4), (5,)], ids=str)
def test_complex_rejected(optimizer, shape):
    p = nn.Parameter(torch.randn(*shape, dtype=torch.complex64))
    cls = limuon.LiMuon if optimizer == "limuon" else limuon.Muon
    kw = {"variance_reduction": "approx"} if optimizer == "limuon" else {}
    kw["adamw_lr"] = 1e-3  # (required for the vector: without it that error would come first)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=r"(?i)complex"):
        opt = cls([p], **kw)
        p.grad = torch.ones_like(p)
        opt.step()
