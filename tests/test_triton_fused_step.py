"""Triton kernels of the fused step ops (``limuon_kernels.triton.fused_step``) against their ground truth,
``limuon_kernels.reference_fused`` (and fp64 Newton–Schulz for the tolerance of the bf16 NS).

Without a GPU they run in Triton's interpreter on CPU tensors: small shapes, with small explicit tiles
so that every matrix spans several blocks/tiles. bf16 outputs may differ from the reference's by one
bf16 ulp (the interpreter truncates fp32 → bf16 where torch rounds to nearest).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does the same)

import pytest

pytest.importorskip("triton")

from limuon_kernels import reference_fused as rf
from limuon_kernels.ns_coefficients import KELLER
from limuon_kernels.triton import fused_step as fs
from limuon_kernels.triton import ns_update
from limuon_kernels.triton import rsvd as trsvd
from limuon_kernels.triton._utils import is_interpreted

DEVICE = torch.device("cpu" if is_interpreted(fs._momentum_kernel) else "cuda")
f32, bf16 = torch.float32, torch.bfloat16
MU, GAMMA = 0.9, 0.025
# [α, β, δ, ρ, σ] of each LiMuon mode (reference_fused.momentum_ns_input_), with whether g_old is passed
COEFS = {
    "storm": ([MU, 1.0, -MU, 1.0, 0.0], True),
    "mars": ([MU, (1 - GAMMA) * (1 - MU) / MU, 0.0, MU, GAMMA], False),
    "ema": ([MU, 1 - MU, 0.0, 1.0, 0.0], False),
    "first_storm": ([0.0, 1.0, 0.0, 1.0, 0.0], False),
    "first_mars": ([0.0, (1 - GAMMA) / MU, 0.0, 0.0, 1.0], False),
}
SHAPES = [(1, 40, 24), (3, 24, 40)]  # m > n and m < n, batch 1 and 3


def rnd(shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def assert_near(out, ref, rel=2.0**-7, atol=1e-6):
    """|out − ref| ≤ rel·|ref| + atol·max|ref| elementwise (rel = one bf16 ulp by default)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    bound = rel * ref.abs() + atol * (1 + ref.abs().max())
    assert out.shape == ref.shape
    assert bool(((out - ref).abs() <= bound).all()), f"max error {(out - ref).abs().max().item():.3g}"


def close_in(out, ref):
    """fp32 results: the reference's arithmetic in the same order; bf16 ones: one ulp."""
    if out.dtype == bf16 or ref.dtype == bf16:
        assert_near(out, ref)
    else:
        assert_near(out, ref, rel=1e-6)


def _momentum_inputs(shape, g_dtype, name, gen):
    coefficients, has_old = COEFS[name]
    g = rnd(shape, g_dtype, gen)
    g_old = rnd(shape, g_dtype, gen) if has_old else None
    buf = rnd(shape, f32, gen)
    if coefficients[0] == 0.0:
        buf.fill_(float("nan"))  # α = 0: buf must not be read
    return buf, g, g_old, coefficients


# -- momentum_ns_input_ ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COEFS))
@pytest.mark.parametrize("g_dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_momentum_ns_input(shape, g_dtype, name, gen):
    buf, g, g_old, coefficients = _momentum_inputs(shape, g_dtype, name, gen)
    ref_buf = buf.clone()
    ref_X, ref_sq = rf.momentum_ns_input_(ref_buf, g, g_old, coefficients, bf16, None)
    X, sq = fs.momentum_ns_input_(buf, g, g_old, coefficients, bf16, None, block=256)  # 4 blocks per matrix
    assert X.dtype == bf16 and X.shape == g.shape and X.is_contiguous()
    assert sq.dtype == f32 and sq.shape == shape[:-2]
    assert bool(torch.isfinite(buf).all())
    close_in(buf, ref_buf)
    close_in(X, ref_X)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-5, atol=0)


def test_momentum_fp32_x_lead_dims_and_determinism(gen):
    buf, g, g_old, coefficients = _momentum_inputs((2, 2, 9, 13), f32, "storm", gen)
    ref_buf = buf.clone()
    ref_X, ref_sq = rf.momentum_ns_input_(ref_buf, g, g_old, coefficients, f32, None)
    buf2 = buf.clone()
    X, sq = fs.momentum_ns_input_(buf, g, g_old, coefficients, f32, None, block=32)
    _, sq2 = fs.momentum_ns_input_(buf2, g, g_old, coefficients, f32, None, block=32)
    assert sq.shape == (2, 2) and torch.equal(sq, sq2)
    close_in(buf, ref_buf)
    close_in(X, ref_X)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-5, atol=0)


def test_fp64_operands_compute_in_fp64(gen):
    """fp64 data: fp64 arithmetic and fp64 norms, as the reference (exact coefficients: split_scalar)."""
    buf, g, g_old, coefficients = _momentum_inputs((2, 24, 40), torch.float64, "storm", gen)
    buf = buf.double()
    ref_buf = buf.clone()
    ref_X, ref_sq = rf.momentum_ns_input_(ref_buf, g, g_old, coefficients, torch.float64, None)
    X, sq = fs.momentum_ns_input_(buf, g, g_old, coefficients, torch.float64, None, block=256)
    assert sq.dtype == torch.float64
    torch.testing.assert_close(buf, ref_buf, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(X, ref_X, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-13, atol=0)
    U, V, S = rnd((2, 24, 8), torch.float64, gen), rnd((2, 40, 8), torch.float64, gen), rnd((2, 8), torch.float64, gen)
    ref = rf.lowrank_momentum_ns_input(U, S, V, g, g_old, coefficients, torch.float64)
    out = fs.lowrank_momentum_ns_input(U, S, V, g, g_old, coefficients, torch.float64, blocks=(16, 16))
    assert out[2].dtype == torch.float64
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("skip", [torch.tensor(True), torch.tensor(1.0), torch.tensor([3], dtype=torch.int32)],
                         ids=["bool", "float", "int"])  # fmt: skip
def test_momentum_skip_writes_nothing(skip, gen):
    buf, g, g_old, coefficients = _momentum_inputs((3, 24, 40), bf16, "storm", gen)
    before = buf.clone()
    ref_X, ref_sq = rf.momentum_ns_input_(buf.clone(), g, g_old, coefficients, bf16, None)
    X, sq = fs.momentum_ns_input_(buf, g, g_old, coefficients, bf16, skip.to(DEVICE), block=256)
    assert torch.equal(buf, before)
    close_in(X, ref_X)  # X and its norms are outputs, computed all the same
    torch.testing.assert_close(sq, ref_sq, rtol=1e-5, atol=0)
    fs.momentum_ns_input_(buf, g, g_old, coefficients, bf16, torch.tensor(False, device=DEVICE), block=256)
    assert not torch.equal(buf, before)


def test_momentum_non_contiguous_buf(gen):
    _, g, g_old, coefficients = _momentum_inputs((2, 24, 40), f32, "storm", gen)
    buf = rnd((2, 40, 24), f32, gen).mT
    ref_buf = buf.clone()
    ref_X, _ = rf.momentum_ns_input_(ref_buf, g, g_old, coefficients, bf16, None)
    X, _ = fs.momentum_ns_input_(buf, g, g_old, coefficients, bf16, None, block=256)
    close_in(buf, ref_buf)
    close_in(X, ref_X)
    before = buf.clone()
    fs.momentum_ns_input_(buf, g, g_old, coefficients, bf16, torch.tensor(True, device=DEVICE), block=256)
    assert torch.equal(buf, before)


# -- lowrank_momentum_ns_input ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COEFS))
@pytest.mark.parametrize("g_dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("case", [(1, 40, 24, 5), (3, 24, 40, 20), (2, 17, 48, 40)], ids=str)
def test_lowrank_momentum_ns_input(case, g_dtype, name, gen):
    """r = 20 pads the rank chunk to 32, r = 40 takes two chunks; 16×16 tiles: several per matrix."""
    B, m, n, r = case
    coefficients, has_old = COEFS[name]
    U, V, S = rnd((B, m, r), f32, gen), rnd((B, n, r), f32, gen), torch.rand(B, r, generator=gen).to(DEVICE)
    g = rnd((B, m, n), g_dtype, gen)
    g_old = rnd((B, m, n), g_dtype, gen) if has_old else None
    ref = rf.lowrank_momentum_ns_input(U, S, V, g, g_old, coefficients, bf16)
    out = fs.lowrank_momentum_ns_input(U, S, V, g, g_old, coefficients, bf16, blocks=(16, 16))
    assert out[0].dtype == g_dtype and out[1].dtype == bf16 and out[2].shape == (B,)
    close_in(out[0], ref[0])
    close_in(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=0)


def test_lowrank_momentum_strided_factors_fp32_x(gen):
    B, m, n, r = 2, 24, 40, 8
    U, V = rnd((B, r, m), f32, gen).mT, rnd((B, r, n), f32, gen).mT
    S = torch.rand(B, 2 * r, generator=gen).to(DEVICE)[:, ::2]
    g, g_old = rnd((B, m, n), f32, gen), rnd((B, m, n), f32, gen)
    coefficients = COEFS["storm"][0]
    ref = rf.lowrank_momentum_ns_input(U, S, V, g, g_old, coefficients, f32)
    out = fs.lowrank_momentum_ns_input(U, S, V, g, g_old, coefficients, f32, blocks=(16, 16))
    for a, b in zip(out[:2], ref[:2]):
        assert_near(a, b, rel=1e-5)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=0)


# -- newton_schulz_update_ -------------------------------------------------------------------------

LR, WD, SCALE = 0.02, 0.1, 0.5
BLOCKS = (32, 32, 32)  # the interpreter's cost is per program: 16-wide tiles only in the first case


def _ns_case(m, n, w_dtype, split, gen):
    """X (bf16, B = sum(split) matrices), its sqnorm, and parameters holding `split` matrices each."""
    X = rnd((sum(split), m, n), bf16, gen)
    W = [rnd((c, m, n) if c > 1 else (m, n), w_dtype, gen) for c in split]
    return X, X.float().square().sum(dim=(-2, -1)), W


def _o_error(X, sqnorm, coefficients, compute_dtype, restarts):
    """max |O_ref − O_fp64| of the reference's NS in compute_dtype (O_fp64: the same iteration in fp64)."""
    O = rf._orthogonalize_normalised(X, sqnorm, coefficients, 1e-7, 1.0, compute_dtype, restarts)
    O64 = rf._orthogonalize_normalised(X.double(), sqnorm.double(), coefficients, 1e-7, 1.0, torch.float64, restarts)
    return (O.double() - O64).abs().max().item()


# (split of the batch over the parameters, (m, n), restarts, W dtype): every axis covered twice over
NS_CASES = [
    ((2, 1), (24, 40), None, f32, (16, 16, 16)),
    ((2, 1), (40, 24), None, bf16, BLOCKS),
    ((1,), (40, 24), None, f32, BLOCKS),
    ((1,), (24, 40), [2], bf16, BLOCKS),
    ((2, 1), (40, 24), [2], f32, BLOCKS),
    ((2, 1), (24, 40), [1], bf16, BLOCKS),
]


@pytest.mark.parametrize("split, shape, restarts, w_dtype, blocks", NS_CASES, ids=str)
def test_newton_schulz_update(split, shape, restarts, w_dtype, blocks, gen):
    m, n = shape
    X, sqnorm, W = _ns_case(m, n, w_dtype, split, gen)
    coefficients = list(KELLER) * 3
    W_ref = [w.clone() for w in W]
    delta = torch.full(X.shape, 7.0, dtype=bf16, device=DEVICE)
    delta_ref = delta.clone()
    lr = torch.tensor(LR)  # a CPU 0-d tensor: moved by the launcher
    rf.newton_schulz_update_(X, sqnorm, W_ref, lr, WD, SCALE, coefficients, 1e-7, 1.0, bf16, restarts, None, delta_ref)
    ns_update.newton_schulz_update_(X, sqnorm, W, lr, WD, SCALE, coefficients, 1e-7, 1.0, bf16, restarts, None,
                                    delta, blocks=blocks)  # fmt: skip
    # the kernel's O may be off the fp64 one by 2× the reference's error plus one bf16 ulp (flash rule)
    err = _o_error(X, sqnorm, coefficients, bf16, restarts)
    o_tol = LR * SCALE * (3 * err + 2.0**-7)
    for w, w_ref in zip(W, W_ref):
        rel = 2.0**-7 if w_dtype == bf16 else 1e-6  # one bf16 ulp: the two may round either side of a tie
        assert_near(w, w_ref, rel=rel, atol=o_tol / (1 + w_ref.abs().max().item()))
    assert_near(delta, delta_ref, rel=2.0**-7, atol=o_tol)


@pytest.mark.parametrize("restarts", [None, [], [1, 2]], ids=["standard-1step", "gram-no-restart", "gram-1-2"])
def test_newton_schulz_update_first_step_normalises_and_fp32_compute(restarts, gen):
    """One NS step (or Gram NS without a restart): the final kernel normalises X itself; fp32 compute."""
    X, sqnorm, W = _ns_case(24, 40, f32, (3,), gen)
    X = X.float() * 3.0
    sqnorm = X.square().sum(dim=(-2, -1))
    coefficients = list(KELLER) * (1 if restarts is None else 3)
    W_ref = [w.clone() for w in W]
    rf.newton_schulz_update_(X, sqnorm, W_ref, torch.tensor(LR), WD, SCALE, coefficients, 1e-7, 1.0, f32, restarts,
                             None, None)  # fmt: skip
    ns_update.newton_schulz_update_(X, sqnorm, W, torch.tensor(LR), WD, SCALE, coefficients, 1e-7, 1.0, f32,
                                    restarts, None, None, blocks=BLOCKS)  # fmt: skip
    assert_near(W[0], W_ref[0], rel=1e-6, atol=LR * SCALE * 1e-4)


@pytest.mark.parametrize("restarts", [None, [2]], ids=["standard", "gram"])
def test_newton_schulz_update_skip_writes_nothing(restarts, gen):
    X, sqnorm, W = _ns_case(40, 24, bf16, (2, 1), gen)
    delta = torch.full(X.shape, 7.0, dtype=bf16, device=DEVICE)
    before = [w.clone() for w in W], delta.clone()
    skip = torch.tensor(True, device=DEVICE)
    ns_update.newton_schulz_update_(X, sqnorm, W, torch.tensor(LR), WD, SCALE, list(KELLER) * 3, 1e-7, 1.0, bf16,
                                    restarts, skip, delta, blocks=BLOCKS)  # fmt: skip
    assert all(torch.equal(w, b) for w, b in zip(W, before[0]))
    assert torch.equal(delta, before[1])


def test_pointer_table_is_cached(gen):
    _, _, W = _ns_case(24, 40, f32, (2, 1), gen)
    table = ns_update.pointer_table(W, 24 * 40, W[0].device)
    assert table is ns_update.pointer_table(W, 24 * 40, W[0].device)
    expected = [W[0].data_ptr(), W[0].data_ptr() + 24 * 40 * 4, W[1].data_ptr()]
    assert table.tolist() == expected


def test_newton_schulz_update_falls_back_to_the_reference(gen):
    """Non-contiguous, mixed-dtype parameters and fp64 compute go through reference_fused: same results."""
    X, sqnorm, _ = _ns_case(24, 40, f32, (2,), gen)
    W = [rnd((40, 24), f32, gen).mT, rnd((24, 40), bf16, gen)]
    for compute, params in ((bf16, W), (torch.float64, [w.float().contiguous() for w in W])):
        W1, W2 = [w.clone() for w in params], [w.clone() for w in params]
        args = (torch.tensor(LR), WD, SCALE, list(KELLER) * 2, 1e-7, 1.0, compute, None, None, None)
        rf.newton_schulz_update_(X, sqnorm, W1, *args)
        ns_update.newton_schulz_update_(X, sqnorm, W2, *args)
        assert all(torch.equal(a, b) for a, b in zip(W1, W2))


# -- rsvd_update_ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("step_dtype", [f32, torch.int64], ids=str)
def test_step_seeds_match_the_reference(step_dtype):
    keys = torch.tensor([0, 1, -2, 2**62 + 12345, -(2**63), 2**63 - 1, 987654321987], dtype=torch.int64)
    step = torch.tensor([0, 1, 2, 3, 1000, 16777216, 7], dtype=step_dtype)
    seeds = fs.step_seeds(keys.to(DEVICE), step.to(DEVICE))
    assert seeds.dtype == torch.int64
    assert seeds.tolist() == rf.step_seeds(keys, step)


def test_rsvd_update(gen):
    """Seeds mixed on the device: the same factors as rsvd with the reference's seeds; an exact-rank M is
    recovered as the reference recovers it; skip leaves U, S, V untouched."""
    B, m, n, r = 3, 40, 24, 4
    M = (rnd((B, m, r), f32, gen) @ rnd((B, r, n), f32, gen)).contiguous()
    keys = torch.tensor([11, -5, 2**40], dtype=torch.int64, device=DEVICE)
    step = torch.tensor([3.0, 4.0, 5.0], device=DEVICE)
    U, S, V = torch.zeros(B, m, r, device=DEVICE), torch.zeros(B, r, device=DEVICE), torch.zeros(B, n, r, device=DEVICE)
    fs.rsvd_update_(U, S, V, M, 2, 1, keys, step, None)
    expected = trsvd.rsvd(M, r, 2, 1, rf.step_seeds(keys.cpu(), step.cpu()))
    for a, b in zip((U, S, V), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    Ur, Sr, Vr = (t.clone() for t in (U, S, V))
    rf.rsvd_update_(Ur, Sr, Vr, M.cpu(), 2, 1, keys.cpu(), step.cpu(), None)
    torch.testing.assert_close(S.cpu(), Sr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(((U * S.unsqueeze(-2)) @ V.mT).cpu(), M.cpu(), rtol=1e-4, atol=1e-4)
    before = [t.clone() for t in (U, S, V)]
    fs.rsvd_update_(U, S, V, M * 2, 2, 1, keys, step + 1, torch.tensor(True, device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip((U, S, V), before))


def test_orthonormalize_is_per_matrix_and_sync_free(gen, monkeypatch):
    """The Householder fallback is selected on the device: no host read (Tensor.__bool__/item unused)."""
    Y = torch.randn(2, 30, 6, generator=gen).to(DEVICE)
    Y[1, :, 5] = Y[1, :, 0]  # rank-deficient: CholeskyQR fails for matrix 1 only
    expected0 = trsvd.orthonormalize(Y[:1])[0]

    def no_sync(*args):
        raise AssertionError("host synchronisation")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    Q = trsvd.orthonormalize(Y)
    monkeypatch.undo()
    eye = torch.eye(6, device=DEVICE)
    torch.testing.assert_close(Q.mT @ Q, eye.expand(2, 6, 6), rtol=0, atol=1e-4)
    torch.testing.assert_close(Q[0], expected0)


# -- dispatch --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["momentum_ns_input_", "lowrank_momentum_ns_input", "newton_schulz_update_",
                                  "rsvd_update_"])  # fmt: skip
def test_launcher_signature_starts_with_the_reference_one(name):
    """The dispatcher calls ``fused_step.<op>(*reference args)``: same parameters in the same order
    (a launcher may add trailing tile overrides for the tests)."""
    import inspect

    ref = list(inspect.signature(getattr(rf, name)).parameters)
    assert list(inspect.signature(getattr(fs, name)).parameters)[: len(ref)] == ref


def test_public_ops_run_these_kernels(monkeypatch, gen):
    import limuon_kernels
    from limuon_kernels import ops

    if DEVICE.type != "cpu" or "triton" not in limuon_kernels.available_backends():
        pytest.skip("the CPU-tensor path of the Triton backend needs the interpreter")
    limuon_kernels.set_backend("triton")
    called = []
    original = ops._triton_kernel
    monkeypatch.setattr(ops, "_triton_kernel", lambda name: called.append(name) or original(name))
    buf, g, g_old, coefficients = _momentum_inputs((2, 24, 40), f32, "first_storm", gen)
    X, sq = limuon_kernels.momentum_ns_input_(buf, g, g_old, coefficients, bf16)
    W = [rnd((2, 24, 40), f32, gen)]
    W_ref = [w.clone() for w in W]
    limuon_kernels.newton_schulz_update_(X, sq, W, 0.02, 0.1, 0.5, list(KELLER) * 2, compute_dtype=bf16)
    rf.newton_schulz_update_(X, sq, W_ref, torch.tensor(0.02), 0.1, 0.5, list(KELLER) * 2, 1e-7, 1.0, bf16, None,
                             None, None)  # fmt: skip
    assert called == ["momentum_ns_input_", "newton_schulz_update_"]
    assert_near(buf, g)  # α = 0, β = 1: buf ← g
    assert_near(W[0], W_ref[0], rel=1e-6, atol=0.02 * 0.5 * 0.05)
