"""What one optimizer step dispatches: a handful of fused ops per bucket, and no host read.

* Op counts on GPT-2 small's parameter set (bench/_op_count.py: 48 matrices in 4 shapes, embeddings and
  98 vectors on AdamW, at a tiny width): the limits of issue #11. Before the fused step, LiMuon approx
  dispatched 624 ops with ~100 host reads.
* ``nonfinite="skip"``: a whole step of Muon and of LiMuon in every mode and option runs on ``meta``-device
  parameters, where every read of a value raises: the step makes no host read (on a GPU: no stall).
* ``nonfinite="skip"`` semantics: a non-finite gradient skips the step on the device (parameters and state
  bitwise unchanged, ``skipped_steps`` counts it) and training goes on as if the step had not happened.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from optim_helpers import equal_nested

import limuon
import limuon_kernels as lk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _op_count
import bench_step

needs_cpp = pytest.mark.skipif(not lk.HAS_C_EXT, reason="counts the C++ kernels' ops (one op per limuon:: op)")

# (provider of bench_step.build, most ops one step may dispatch)
OP_LIMITS = {"muon": 60, "limuon1-approx": 60, "limuon2-approx": 90, "limuon1-exact": 80, "limuon2-exact": 80}


@needs_cpp
@pytest.mark.parametrize("provider", list(OP_LIMITS))
def test_ops_per_step(provider):
    counter = _op_count.count_step(bench_step.build, provider, rank=8)
    assert counter.total <= OP_LIMITS[provider], counter.ops.most_common()
    assert counter.host_reads == 1, counter.ops  # nonfinite="raise": the one read that may raise
    limuon_ops = sum(n for op, n in counter.ops.items() if op.startswith("limuon."))
    assert limuon_ops >= 8, counter.ops  # 4 buckets: a momentum pass and a Newton–Schulz update each


@needs_cpp
@pytest.mark.parametrize("provider", ["muon", "limuon2-approx", "limuon1-exact"])
def test_skip_mode_reads_nothing_back(provider):
    def build(*args):
        setup = bench_step.build(*args)
        for opt in setup.optimizers:
            opt.nonfinite = "skip"
        return setup

    counter = _op_count.count_step(build, provider, rank=8)
    assert counter.host_reads == 0, counter.ops


# -- meta device ----------------------------------------------------------------------------------

MATRIX_SHAPES = [(16, 48), (16, 48), (64, 16), (12, 12)]
CONFIGS = {
    "muon": (limuon.Muon, {}),
    "muon-batch": (limuon.Muon, dict(matrix_view="batch")),
    **{f"{mode}-{opt}": (limuon.LiMuon, dict(variance_reduction=mode, rank=None if opt == "dense" else 3))
       for mode in ("exact", "approx", "none") for opt in ("dense", "r3")},
    "approx-r3-gram": (limuon.LiMuon, dict(rank=3, ns_method="gram")),
    "exact-r3-batch-matrices": (limuon.LiMuon, dict(variance_reduction="exact", rank=3, matrix_view="batch",
                                                   exact_restore="matrices")),
    "none-svd": (limuon.LiMuon, dict(variance_reduction="none", orthogonalizer="svd")),
    "approx-polar-fp32": (limuon.LiMuon, dict(ns_coefficients="polar_express", ns_compute_dtype=torch.float32)),
}


def _params(device: str) -> list[torch.nn.Parameter]:
    shapes = [*MATRIX_SHAPES, (2, 8, 12), (16,), (4, 3, 2, 2)]
    return [torch.nn.Parameter(torch.empty(s, device=device)) for s in shapes]


def _run(cls, kw: dict, params: list, steps: int, grads=None, nonfinite: str = "skip"):
    opt = cls(params, lr=0.02, adamw_lr=0.01, nonfinite=nonfinite, **kw)
    calls = [0]

    def closure():
        for j, p in enumerate(params):
            p.grad = torch.empty_like(p) if grads is None else grads[calls[0] % len(grads)][j].clone()
        calls[0] += 1
        return torch.zeros((), device=params[0].device)

    for _ in range(steps):
        closure()
        opt.step(closure)
    return opt


@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_on_meta_device_makes_no_host_read(config):
    cls, kw = CONFIGS[config]
    opt = _run(cls, kw, _params("meta"), steps=3)
    assert all(len(st) > 0 for st in opt.state.values())
    assert opt.skipped_steps.device.type == "meta"


def test_raise_mode_reads_the_flag_once_which_meta_refuses():
    # The meta test can fail: the one host read of nonfinite="raise" is refused there.
    with pytest.raises(RuntimeError, match="meta"):
        _run(limuon.LiMuon, {}, _params("meta"), steps=2, nonfinite="raise")


# -- skip semantics -------------------------------------------------------------------------------


def _grads(gen: torch.Generator, params: list) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).float() for p in params]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_skip_mode_skips_a_non_finite_step_on_the_device(config):
    """Steps A, B(NaN), C with nonfinite="skip" end exactly where steps A, C end; the bad step changes no
    parameter and no state, and is counted."""
    cls, kw = CONFIGS[config]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(p.shape, generator=gen) for p in _params("cpu")]
    good = [_grads(gen, init) for _ in range(4)]  # two steps' worth (two closure calls each in exact mode)
    bad = [list(g) for g in good[:2]]
    bad[1][0] = bad[1][0].clone()
    bad[1][0][1, 2] = float("nan")
    ours, twin = ([torch.nn.Parameter(t.clone()) for t in init] for _ in range(2))
    opt = _run(cls, kw, ours, steps=1, grads=good[:2])
    ref = _run(cls, kw, twin, steps=1, grads=good[:2])
    before, state = [p.detach().clone() for p in ours], copy.deepcopy(opt.state_dict())
    for j, p in enumerate(ours):
        p.grad = bad[1][j].clone()
    opt.step(lambda: [setattr(p, "grad", g.clone()) for p, g in zip(ours, bad[1])] and None)
    assert all(torch.equal(p, b) for p, b in zip(ours, before)), "a skipped step changed a parameter"
    assert equal_nested(opt.state_dict(), state), "a skipped step changed the optimizer state"
    assert float(opt.skipped_steps) == 1.0
    for o, grads in ((opt, good[2:]), (ref, good[2:])):
        params = ours if o is opt else twin
        for j, p in enumerate(params):
            p.grad = grads[0][j].clone()
        o.step(lambda ps=params, gs=grads: [setattr(p, "grad", g.clone()) for p, g in zip(ps, gs[1])] and None)
    assert all(torch.equal(p, q) for p, q in zip(ours, twin)), "the step after a skipped one differs"
    assert float(ref.skipped_steps) == 0.0


def test_nonfinite_argument_is_checked():
    with pytest.raises(ValueError, match="nonfinite"):
        limuon.LiMuon(_params("cpu"), lr=0.02, adamw_lr=0.01, nonfinite="ignore")


def test_nonfinite_survives_a_copy():
    opt = limuon.Muon(_params("cpu"), lr=0.02, adamw_lr=0.01, nonfinite="skip")
    assert copy.deepcopy(opt).nonfinite == "skip"
    assert limuon.Muon(_params("cpu"), lr=0.02, adamw_lr=0.01).nonfinite == "raise"


@pytest.mark.parametrize("config", ["muon", "exact-r3", "approx-dense", "none-r3"])
def test_raise_on_the_first_step_leaves_no_state(config):
    """The state is created on the first step: "raise" reads the flag before creating it, so a NaN there
    leaves the optimizer as it was built (no state) and the parameters untouched."""
    cls, kw = CONFIGS[config]
    params = [torch.nn.Parameter(torch.randn(p.shape)) for p in _params("cpu")]
    before = [p.detach().clone() for p in params]
    opt = cls(params, lr=0.02, adamw_lr=0.01, **kw)
    grads = [torch.randn(p.shape) for p in params]
    grads[-1][0, 0, 0, 0] = float("inf")

    def closure():
        for p, g in zip(params, grads):
            p.grad = g.clone()

    closure()
    with pytest.raises(limuon.NonFiniteGradientError, match=r"parameter 6 of group 0 \(shape \(4, 3, 2, 2\)\)"):
        opt.step(closure)
    assert not any(opt.state.get(p) for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_tensor_lr_is_never_read_back():
    """A 0-d tensor lr (what a capturable schedule keeps) reaches the kernels as it is: no host read in a
    "skip" step, and the same result as the float lr."""
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(p.shape, generator=gen) for p in _params("cpu")]
    grads = [_grads(gen, init) for _ in range(3)]
    runs = []
    for lr in (0.02, torch.tensor(0.02)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = limuon.LiMuon(params, lr=lr, adamw_lr=0.01, rank=3, nonfinite="skip")
        for t, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            if t == 2:
                with _op_count.OpCounter() as counter:
                    opt.step()
                assert counter.host_reads == 0, counter.ops
            else:
                opt.step()
        runs.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*runs))


@pytest.mark.parametrize("change", ["rank", "exact"])
def test_raise_when_the_state_changes_form_leaves_it_as_it_was(change):
    """A step that replaces state (the group's rank changed; exact mode turned on, which creates restore
    buffers) with a NaN gradient raises with every state entry and parameter unchanged."""
    params = [torch.nn.Parameter(torch.randn(p.shape)) for p in _params("cpu")]
    # two groups: turning exact mode on in the second also gives the first restore buffers (exact_restore="all")
    opt = limuon.LiMuon([{"params": params[:3]}, {"params": params[3:]}], lr=0.02, adamw_lr=0.01, rank=4)
    grads = [torch.randn(p.shape) for p in params]

    def closure(bad=False):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if bad:
            params[0].grad[0, 0] = float("nan")

    for _ in range(2):
        closure()
        opt.step()
    state, before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    if change == "rank":
        opt.param_groups[0]["rank"] = 3
    else:
        opt.param_groups[1]["variance_reduction"] = "exact"
    closure(bad=True)
    with pytest.raises(limuon.NonFiniteGradientError):
        opt.step(lambda: closure(bad=True))
    assert equal_nested(opt.state_dict()["state"], state["state"])
    assert all(torch.equal(p, b) for p, b in zip(params, before))
