"""The whole optimizer on every backend (cpp, triton — interpreted on CPU) against backend="torch".

The op tests check each kernel against fp64; this checks that the optimizer wires the kernels the
same way on every backend. Option #2 uses rank + oversample ≥ min(m, n), where the randomized SVD
is the exact truncated SVD, so the backends' different random sketches (CPU mt19937 for torch/cpp,
in-kernel Philox for triton) cannot make the results differ.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import limuon
import limuon_kernels as lk


@pytest.fixture(autouse=True)
def _fp32_newton_schulz():
    """fp32 Newton–Schulz on every backend, whatever this CPU's default (bf16 where it has bf16 matrix
    instructions: two bf16 implementations differ by 1e-2 or more); conftest restores the default."""
    lk.set_ns_compute_dtype("cpu", torch.float32)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5)
    )


def _train(make_opt, backend: str, steps: int = 3) -> list[torch.Tensor]:
    lk.set_backend(backend)
    model = _model()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # A new batch every step (the same for both closure calls of an exact step): with one fixed
        # batch exact mode's correction M_{k-1} − g(W_{k-1}) would be zero up to bf16 rounding.
        x, y = torch.randn(32, 12, generator=gen), torch.randn(32, 5, generator=gen)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


CASES = {
    **{
        f"limuon-{mode}-{option}": (
            lambda params, mode=mode, rank=rank: limuon.LiMuon(
                params, lr=0.02, variance_reduction=mode, rank=rank, oversample=20, adamw_lr=0.02
            )
        )
        for mode in ("exact", "approx", "none")
        for option, rank in (("option1", None), ("option2", 4))
    },
    "muon": lambda params: limuon.Muon(params, lr=0.02, adamw_lr=0.02),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_torch_backend(backend, case):
    if backend == "torch":
        pytest.skip("the torch backend is the reference here")
    want = _train(CASES[case], "torch")
    got = _train(CASES[case], backend)
    moved = max((w - p0).abs().max().item() for w, p0 in zip(want, _model().parameters()))
    for w, g in zip(want, got):
        # fp32 kernels that sum in another order: differences of a few fp32 ulps of the update, far
        # below what a wrong coefficient or a skipped term would produce (≥ 1% of the movement).
        torch.testing.assert_close(g, w, rtol=0, atol=1e-3 * moved)
