"""Optimizer state stays exactly what the memory table says (docs/ALGORITHM.md §5), whatever the pattern
of gradients: matrices that skip steps (MoE experts, layers used on some steps only) must not keep an
old stacked tensor alive. Measured as the bytes of the distinct storages behind the state, and as what
``torch.save`` writes, against the table computed from the shapes alone."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

import limuon

M, N, COUNT, SKIPPED, STEPS, RANK = 32, 32, 16, 3, 40, 4
STEP_COUNTER = 4  # LiMuon keeps a float32 step counter per matrix

# (name, constructor, table bytes per 32×32 matrix)
CASES = [
    ("muon", lambda ps: limuon.Muon(ps, lr=0.02), 4 * M * N),
    ("limuon-approx", lambda ps: limuon.LiMuon(ps, lr=0.02, variance_reduction="approx"), 4 * M * N + STEP_COUNTER),
    ("limuon-none-r4", lambda ps: limuon.LiMuon(ps, lr=0.02, variance_reduction="none", rank=RANK),
     4 * RANK * (M + N + 1) + STEP_COUNTER),
    ("limuon-exact", lambda ps: limuon.LiMuon(ps, lr=0.02, variance_reduction="exact"),
     4 * M * N + 2 * M * N + STEP_COUNTER),  # + the bf16 restore buffer
    ("limuon-exact-r4", lambda ps: limuon.LiMuon(ps, lr=0.02, variance_reduction="exact", rank=RANK),
     4 * RANK * (M + N + 1) + 2 * M * N + STEP_COUNTER),
]


def distinct_storage_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every distinct storage any state tensor lives in (what the state keeps alive)."""
    storages = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                s = v.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def saved_bytes(state_dict: dict) -> int:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getbuffer().nbytes


def standalone(state_dict: dict) -> dict:
    """The same state dict with every tensor in a storage of its own (nothing shared, nothing extra)."""
    state = {k: {kk: vv.clone() if isinstance(vv, Tensor) else vv for kk, vv in st.items()}
             for k, st in state_dict["state"].items()}
    return {**state_dict, "state": state}


def run(make, pattern_seed: int) -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(pattern_seed)
    params = [nn.Parameter(torch.randn(M, N, generator=gen) * 0.1) for _ in range(COUNT)]
    opt = make(params)

    for _ in range(STEPS):
        skipped = set(torch.randperm(COUNT, generator=gen)[:SKIPPED].tolist())
        grads = [torch.randn(M, N, generator=gen) for _ in range(COUNT)]

        def closure(skipped=skipped, grads=grads):
            for i, p in enumerate(params):
                p.grad = None if i in skipped else grads[i].clone()
            return torch.zeros(())

        opt.step(closure)
    return opt


@pytest.mark.parametrize("pattern_seed", [1, 2])
@pytest.mark.parametrize("name,make,per_matrix", CASES, ids=[c[0] for c in CASES])
def test_state_bytes_match_the_table_under_changing_gradient_sets(name, make, per_matrix, pattern_seed):
    opt = run(make, pattern_seed)
    table = COUNT * per_matrix
    assert all(len(opt.state[p]) > 0 for g in opt.param_groups for p in g["params"]), "every matrix stepped"
    held = distinct_storage_bytes(opt)
    assert held == table, f"{name}: state keeps {held} bytes alive, the table says {table} ({held / table:.2f}x)"
    # torch.save writes every storage a saved tensor lives in: no more than the same state stored flat.
    state_dict = opt.state_dict()
    assert saved_bytes(state_dict) <= saved_bytes(standalone(state_dict)), f"{name}: torch.save writes extra storage"


def test_skipping_matrices_keep_their_own_state_values():
    """Re-stacking moves the state of matrices that skip a step without changing it: their momentum is
    what it was after their last step (compared with a run that stepped them in separate optimizers)."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(M, N, generator=gen) * 0.1 for _ in range(4)]
    grads = [[torch.randn(M, N, generator=gen) for _ in range(4)] for _ in range(6)]
    skip = [{1}, {2, 3}, set(), {0}, {1, 2}, set()]
    params = [nn.Parameter(t.clone()) for t in init]
    opt = limuon.Muon(params, lr=0.02)
    alone = [nn.Parameter(t.clone()) for t in init]
    opts = [limuon.Muon([p], lr=0.02) for p in alone]
    for t in range(6):
        for i in range(4):
            params[i].grad = None if i in skip[t] else grads[t][i].clone()
            alone[i].grad = None if i in skip[t] else grads[t][i].clone()
        opt.step()
        for i, o in enumerate(opts):
            if i not in skip[t]:
                o.step()
    for p, q, o in zip(params, alone, opts):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], o.state[q]["momentum_buffer"])


@pytest.mark.parametrize("name,make,per_matrix", CASES, ids=[c[0] for c in CASES])
def test_batch_view_state_bytes_match_the_table(name, make, per_matrix):
    """matrix_view="batch": four (4, 32, 32) expert weights are COUNT = 16 matrices of 32×32, each with the
    table's state (the low-rank factors per expert), and one step counter per parameter, whichever
    parameters skip steps."""
    experts, params_count = 4, COUNT // 4
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(experts, M, N, generator=gen) * 0.1) for _ in range(params_count)]
    opt = make([{"params": params, "matrix_view": "batch"}])
    for _ in range(12):
        skipped = set(torch.randperm(params_count, generator=gen)[:1].tolist())
        grads = [torch.randn(experts, M, N, generator=gen) for _ in range(params_count)]

        def closure(skipped=skipped, grads=grads):
            for i, p in enumerate(params):
                p.grad = None if i in skipped else grads[i].clone()
            return torch.zeros(())

        opt.step(closure)
    counters = STEP_COUNTER if name.startswith("limuon") else 0
    table = COUNT * (per_matrix - counters) + params_count * counters
    held = distinct_storage_bytes(opt)
    assert held == table, f"{name}: state keeps {held} bytes alive, the table says {table} ({held / table:.2f}x)"
    state_dict = opt.state_dict()
    assert saved_bytes(state_dict) <= saved_bytes(standalone(state_dict)), f"{name}: torch.save writes extra storage"
