"""``matrix_view="batch"``: a parameter ``(E, m, n)`` (mixture-of-experts weights) is ``E`` independent
``m×n`` matrices. The peer is the same training with ``E`` separate ``(m, n)`` parameters: every mode and
option of LiMuon, and Muon, in one bucket with a plain ``(m, n)`` matrix of the same group, across a
state_dict resume; plus the RSVD seeds, the Newton–Schulz launches, the default ``"flatten"`` view and the
refusals. FSDP2 and DDP: ``test_distributed_*`` below (tests/matrix_view_worker.py).
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import limuon
import limuon_kernels as lk

E, M, N = 4, 16, 24
STEPS = 4
#: LiMuon configurations: every variance-reduction mode × Option #1 (dense) and Option #2 (rank 3). The
#: sketch width rank + oversample ≥ min(m, n), so the RSVD is the exact truncated SVD whatever the seeds.
MODES = ("exact", "approx", "none")
RANK = dict(rank=3, oversample=30)
CONFIGS = {
    **{f"limuon-{mode}-dense": ("LiMuon", dict(variance_reduction=mode)) for mode in MODES},
    **{f"limuon-{mode}-r3": ("LiMuon", dict(variance_reduction=mode, **RANK)) for mode in MODES},
    "muon": ("Muon", {}),
    "muon-plain": ("Muon", dict(nesterov=False)),
}
# Option #2 in fp64 (parameters and Newton–Schulz): the factors are fp32 whatever the parameters, and
# two seeds give truncated SVDs that differ by fp32 rounding (measured: 1.3e-6 of the displacement after
# 4 steps, also between two runs of separate parameters with different group seeds; 1.5e-6 batch against
# separate). A wrong view, order or scale of the experts is off by O(1).
RTOL_LOWRANK = 1e-5


class Problem:
    """``E`` expert matrices and one plain matrix, all ``M×N``, with a least-squares loss per matrix
    (full-rank gradients): ``Σ_k mean((W_k X_k − Y_k)²)``. ``batch``: the experts are one ``(E, M, N)``
    parameter (``lead`` reshapes it, e.g. ``(2, 2)``), in a group with ``matrix_view="batch"``."""

    def __init__(self, batch: bool, dtype: torch.dtype = torch.float32, lead: tuple[int, ...] = (E,)) -> None:
        gen = torch.Generator().manual_seed(0)
        W0 = 0.1 * torch.randn(E, M, N, generator=gen, dtype=torch.float64)
        P0 = 0.1 * torch.randn(M, N, generator=gen, dtype=torch.float64)
        self.X = torch.randn(E + 1, N, 32, generator=gen, dtype=torch.float64).to(dtype)
        self.Y = torch.randn(E + 1, M, 32, generator=gen, dtype=torch.float64).to(dtype)
        self.batch, self.lead = batch, lead
        self.plain = nn.Parameter(P0.to(dtype))
        if batch:
            self.experts = [nn.Parameter(W0.to(dtype).reshape(*lead, M, N))]
        else:
            self.experts = [nn.Parameter(W0[e].to(dtype)) for e in range(E)]
        self.params = [*self.experts, self.plain]

    def groups(self, **group) -> list[dict]:
        return [{"params": self.params, **({"matrix_view": "batch"} if self.batch else {}), **group}]

    def matrices(self) -> list[Tensor]:
        """The E expert matrices and the plain one, in order (views of the parameters)."""
        experts = self.experts[0].reshape(E, M, N).unbind(0) if self.batch else self.experts
        return [*experts, self.plain]

    def result(self) -> Tensor:
        return torch.stack([w.detach().clone() for w in self.matrices()])

    def closure(self, opt: torch.optim.Optimizer):
        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = sum(((w @ x - y) ** 2).mean() for w, x, y in zip(self.matrices(), self.X, self.Y))
            loss.backward()
            return loss.detach()

        return closure


def make_optimizer(config: str, groups: list[dict], dtype: torch.dtype = torch.float32, **extra):
    cls, kwargs = CONFIGS[config]
    # match_rms_adamw: s(m, n) = 0.2·sqrt(max(m, n)) tells the 16×24 view from the 4×384 one.
    kw = dict(lr=0.02, weight_decay=0.01, adjust_lr_fn="match_rms_adamw", ns_compute_dtype=dtype, **kwargs, **extra)
    return getattr(limuon, cls)(groups, **kw)


def train(config: str, batch: bool, steps: int = STEPS, dtype=torch.float32, lead=(E,), **extra):
    problem = Problem(batch, dtype, lead)
    opt = make_optimizer(config, problem.groups(), dtype, **extra)
    for _ in range(steps):
        opt.step(problem.closure(opt))
    return problem, opt


def dtype_of(config: str) -> torch.dtype:
    return torch.float64 if "-r3" in config else torch.float32


def assert_same_training(config: str, got: Tensor, want: Tensor, start: Tensor) -> None:
    if "-r3" in config:
        err = ((got - want).norm() / (want - start).norm()).item()
        assert err <= RTOL_LOWRANK, f"{config}: {err:.3g} of the displacement"
    else:  # the same operations on the same numbers: the same bits
        assert torch.equal(got, want), f"{config}: max |diff| {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("config", CONFIGS)
def test_batch_equals_separate_parameters(config):
    dtype = dtype_of(config)
    batched, opt = train(config, batch=True, dtype=dtype)
    separate, _ = train(config, batch=False, dtype=dtype)
    assert_same_training(config, batched.result(), separate.result(), Problem(False, dtype).result())
    if "-r3" in config:  # stored per matrix, with the parameter's leading dimension
        st = opt.state[batched.experts[0]]
        assert (st["U"].shape, st["S"].shape, st["V"].shape) == ((E, M, 3), (E, 3), (E, N, 3))
        assert "momentum_buffer" not in st
    else:
        assert opt.state[batched.experts[0]]["momentum_buffer"].shape == (E, M, N)


@pytest.mark.parametrize("config", ["muon", "limuon-approx-r3"])
def test_four_dimensional_parameter_is_four_matrices(config):
    """(2, 2, m, n): every leading dimension indexes matrices (factors stored as (2, 2, m, r))."""
    dtype = dtype_of(config)
    four_d, opt = train(config, batch=True, dtype=dtype, lead=(2, 2))
    separate, _ = train(config, batch=False, dtype=dtype)
    assert_same_training(config, four_d.result(), separate.result(), Problem(False, dtype).result())
    if "-r3" in config:
        assert opt.state[four_d.experts[0]]["U"].shape == (2, 2, M, 3)


@pytest.mark.parametrize("config", ["muon", "limuon-exact-r3", "limuon-approx-dense"])
def test_one_newton_schulz_launch_for_experts_and_plain_matrix(config, monkeypatch):
    shapes = []
    real = lk.newton_schulz_update_
    monkeypatch.setattr(lk, "newton_schulz_update_",
                        lambda X, *a, **k: shapes.append(tuple(X.shape)) or real(X, *a, **k))
    train(config, batch=True, steps=3, dtype=dtype_of(config))
    assert shapes == [(E + 1, M, N)] * 3


def test_each_expert_gets_its_own_seed(monkeypatch):
    """Matrix e of batch parameter i at step t: derive_seed(seed, i, e, t); a parameter that is one matrix
    (here the plain one, index 1) keeps derive_seed(seed, i, t). (The kernels get each matrix's key and its
    step counter and finish the seed on the device; here both are read back to check the seeds.)"""
    from limuon_kernels.seeds import step_seed

    seeds = []
    real = lk.rsvd_update_

    def spy(U, S, V, M, oversample, power_iters, keys, step, skip):
        seeds.append([step_seed(k, t) for k, t in zip(keys.tolist(), step.tolist())])
        return real(U, S, V, M, oversample, power_iters, keys, step, skip)

    monkeypatch.setattr(lk, "rsvd_update_", spy)
    train("limuon-none-r3", batch=True, steps=2, dtype=torch.float64, seed=11)
    want = [[lk.derive_seed(11, 0, e, t) for e in range(E)] + [lk.derive_seed(11, 1, t)] for t in (1, 2)]
    assert seeds == want
    assert len({s for step in seeds for s in step}) == 2 * (E + 1)


def test_flatten_is_the_default_and_sees_one_matrix():
    """Without matrix_view, (E, m, n) is the single matrix (E, m·n), as a conv weight: the same training
    as a 2-D parameter holding that matrix."""
    gen = torch.Generator().manual_seed(3)
    W0, grads = torch.randn(E, M, N, generator=gen), [torch.randn(E, M, N, generator=gen) for _ in range(3)]
    for cls, kw in ((limuon.Muon, {}), (limuon.LiMuon, dict(variance_reduction="none", rank=2))):
        three_d, two_d = nn.Parameter(W0.clone()), nn.Parameter(W0.reshape(E, M * N).clone())
        opts = [cls([p], lr=0.02, **kw) for p in (three_d, two_d)]
        assert opts[0].param_groups[0]["matrix_view"] == "flatten"
        for g in grads:
            three_d.grad, two_d.grad = g.clone(), g.reshape(E, M * N).clone()
            for o in opts:
                o.step()
        assert torch.equal(three_d.detach().reshape(E, M * N), two_d.detach()), cls.__name__


@pytest.mark.parametrize("config", ["limuon-exact-r3", "limuon-approx-r3", "limuon-none-dense", "limuon-exact-dense",
                                    "muon"])
def test_state_dict_resume_equals_uninterrupted(config):
    """Save after 2 steps (through torch.save), load into a fresh optimizer on fresh parameters holding the
    same values, 2 more steps: the same bits as 4 uninterrupted steps."""
    dtype = dtype_of(config)
    straight, _ = train(config, batch=True, dtype=dtype)
    first, opt = train(config, batch=True, steps=2, dtype=dtype)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = Problem(batch=True, dtype=dtype)
    with torch.no_grad():
        for p, q in zip(resumed.params, first.params):
            p.copy_(q)
    fresh = make_optimizer(config, resumed.groups(), dtype)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    for _ in range(2):
        fresh.step(resumed.closure(fresh))
    assert torch.equal(resumed.result(), straight.result())


@pytest.mark.parametrize("cls", [limuon.LiMuon, limuon.Muon], ids=lambda c: c.__name__)
def test_bad_matrix_view_is_refused(cls):
    w = nn.Parameter(torch.randn(E, M, N))
    message = r"Invalid matrix_view: 'rows'; expected one of \('flatten', 'batch'\)"
    with pytest.raises(ValueError, match=message):
        cls([w], matrix_view="rows")
    # None is the default: "flatten" (with a warning where the shape looks like stacked matrices)
    assert cls([{"params": [w], "matrix_view": None}], adamw_lr=1e-3).param_groups[0]["matrix_view"] == "flatten"
    opt = cls([{"params": [w], "matrix_view": "batch"}], lr=0.02)
    w.grad = torch.randn(E, M, N)
    opt.step()
    before, state = w.detach().clone(), copy.deepcopy(opt.state[w])
    opt.param_groups[0]["matrix_view"] = "rows"  # changed later: refused by the step, nothing changes
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(w, before) and all(torch.equal(v, state[k]) for k, v in opt.state[w].items())


def test_changing_the_view_of_low_rank_state_is_refused():
    """Factors stored per expert (E, m, r) cannot serve the flattened matrix: refused, nothing changes."""
    w, plain = nn.Parameter(torch.randn(E, M, N)), nn.Parameter(torch.randn(M, N))
    opt = limuon.LiMuon([{"params": [plain, w], "matrix_view": "batch"}], lr=0.02, rank=2, variance_reduction="none")
    w.grad, plain.grad = torch.randn(E, M, N), torch.randn(M, N)
    opt.step()
    before = [p.detach().clone() for p in (plain, w)]
    opt.param_groups[0]["matrix_view"] = "flatten"
    with pytest.raises(ValueError, match=r"Invalid matrix_view: 'flatten' for parameter 1 of group 0 "
                                         r"\(shape \(4, 16, 24\)\): its low-rank factor U has shape \(4, 16, 2\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (plain, w)))
    assert opt.state[w]["U"].shape == (E, M, 2)


def test_adamw_group_ignores_the_view():
    """matrix_view applies to the matrix update only: an AdamW group's (E, m, n) tensor is elementwise."""
    w, ref = nn.Parameter(torch.randn(E, M, N)), nn.Parameter(torch.randn(E, M, N))
    with torch.no_grad():
        ref.copy_(w)
    opt = limuon.Muon([{"params": [w], "algorithm": "adamw", "matrix_view": "batch"}], lr=0.02, adamw_lr=1e-3,
                      adamw_weight_decay=0.0)
    peer = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    w.grad = ref.grad = torch.randn(E, M, N)
    opt.step()
    peer.step()
    torch.testing.assert_close(w.detach(), ref.detach())


# -- FSDP2 (expert dim sharded) and DDP, 2 CPU processes (gloo) -------------------------------------


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world,engines", [(2, ["fsdp", "ddp-mesh"]), (3, ["fsdp"])])
def test_distributed_equals_one_process(world, engines, tmp_path):
    """Every rank's parameters after training under each engine equal one process's, in every mode and
    option. Under FSDP2 each rank holds whole experts (3 ranks: 2, 2 and none) and orthogonalises (and
    compresses, with the seeds of the experts' global indices) only its own, with no all-to-all."""
    import matrix_view_worker as w

    w.spawn(w.train_all, world, engines, str(tmp_path))
    results = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for config in w.CONFIGS:
        expected, single_shapes = w.single_process(config)
        for engine in engines:
            runs = [result[engine][config] for result in results]
            for rank, (got, _) in enumerate(runs):
                for name, value in expected.items():
                    torch.testing.assert_close(got[name], value, **w.tolerance(config),
                                               msg=lambda m, c=config, e=engine, n=name, r=rank: f"{c} {e} {r} {n} {m}")
            # Each matrix is orthogonalised once, by one rank.
            assert sum(s[0] for _, shapes in runs for s in shapes) == sum(s[0] for s in single_shapes)
            if engine == "fsdp":  # the experts where they are held: (2, M, N) on each rank that holds 2
                for rank, (_, shapes) in enumerate(runs):
                    held = w.experts_held(rank, world)
                    assert not held or shapes.count((held, M, N)) == w.STEPS, (config, rank, shapes)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_checkpoint_of_expert_factors(tmp_path):
    """FSDP2, Option #2, exact mode: the experts' factors are DTensors sharded like the parameter. Saved
    with torch.distributed.checkpoint after 2 steps on 2 ranks, loaded on 2 and on 3 ranks; from each
    rank's own state_dict() on 2 ranks; from a single process's state dict on 3 ranks: 2 more steps equal
    4 uninterrupted steps in one process."""
    import matrix_view_worker as w

    config = "limuon-exact-r3"
    w.spawn(w.checkpoint_runs, 2, config, str(tmp_path), True, ["dcp", "per-rank"])
    w.spawn(w.checkpoint_runs, 3, config, str(tmp_path), False, ["dcp", "single"])
    expected, _ = w.single_process(config)
    for world, how in ((2, "dcp"), (2, "per-rank"), (3, "dcp"), (3, "single")):
        for rank in range(world):
            got = torch.load(tmp_path / f"{how}{world}" / f"rank{rank}.pt", weights_only=False)
            assert got["U_type"] == "DTensor" and got["U_shape"] == (w.E, w.M, 3), got
            for name, value in expected.items():
                torch.testing.assert_close(got["params"][name], value, **w.tolerance(config),
                                           msg=lambda m, n=name, r=rank, h=how, ws=world: f"{h} {ws} rank {r} {n}: {m}")
