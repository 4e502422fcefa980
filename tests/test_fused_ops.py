"""The fused step ops' C++ CPU kernels (csrc/cpu/fused_momentum.cpp, fused_ns_update.cpp), two ways each:

* against an fp64 formula written here from the ops' docstrings (``fused_ops.py``), within the
  per-dtype elementwise tolerances (``ELEMENTWISE_TOL``) or, for Newton–Schulz, bounds derived below;
* against ``reference_fused`` (the ops' ground truth) called directly, where ``torch.ops.limuon.*``
  dispatches to the C++ kernel: bit for bit for every elementwise output and for the Newton–Schulz
  update (same ATen matmuls), within summation-order tolerance for ``sqnorm`` and the low-rank product.
"""

from __future__ import annotations

import pytest
import torch

import limuon_kernels as lk
from limuon_kernels import _extension, reference_fused

f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
MU, GAMMA = 0.9, 0.025
MODES = {  # [α, β, δ, ρ, σ] of every LiMuon/Muon mode (reference_fused.momentum_ns_input_)
    "exact": [MU, 1.0, -MU, 1.0, 0.0],
    "approx": [MU, (1 - GAMMA) * (1 - MU) / MU, 0.0, MU, GAMMA],
    "none": [MU, 1 - MU, 0.0, 1.0, 0.0],
    "first": [0.0, 1.0, 0.0, 1.0, 0.0],
    "first-approx": [0.0, (1 - GAMMA) / MU, 0.0, 0.0, 1.0],
}
TOL = {f64: {"rtol": 1e-10, "atol": 1e-12}, f32: {"rtol": 1e-5, "atol": 1e-6}, bf16: {"rtol": 4.5e-3, "atol": 1e-5}}
# ‖X‖² summed in another order than the reference's: a few ulps of the accumulation dtype per term count
SQNORM_RTOL = {f32: 2e-6, bf16: 2e-6, f64: 1e-13}
KELLER = [3.4445, -4.7750, 2.0315] * 5
ops = torch.ops.limuon


def randn(*shape, dtype=f32, gen):
    return torch.randn(*shape, generator=gen, dtype=f64).to(dtype)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other column of a wider tensor)."""
    out = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)[..., ::2]
    return out.copy_(t)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major (a non-contiguous ``mT`` view)."""
    return t.mT.contiguous().mT


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal values, dtype and shape; NaN where the other has NaN."""
    assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{what}: {got.dtype} {got.shape} vs {want.shape}"
    same_nan = torch.equal(got.isnan(), want.isnan())
    assert same_nan and torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), (
        f"{what}: differs from the reference in {int((got != want).sum())} elements")


def momentum64(prev, g, g_old, c):
    """new = α·prev + β·g + δ·g_old (α·prev only for α ≠ 0, δ·g_old only with g_old);  X = ρ·new + σ·g."""
    alpha, beta, delta, rho, sigma = c
    new = beta * g.double()
    if alpha != 0:
        new = new + alpha * prev.double()
    if g_old is not None:
        new = new + delta * g_old.double()
    return new, rho * new + sigma * g.double()


def test_c_extension_lists_the_fused_kernels():
    if not _extension.HAS_C_EXT:
        pytest.skip(f"limuon_kernels._C not loaded: {_extension.LOAD_ERROR}")
    names = set(lk._C.kernels())
    for name in ("momentum_ns_input_", "lowrank_momentum_ns_input", "newton_schulz_update_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"limuon::{name}", "CPU"), name
    assert {"momentum_ns_input_", "lowrank_momentum_ns_input", "newton_schulz_update_"} <= names


# -- momentum_ns_input_ ---------------------------------------------------------------------------


def momentum_inputs(lead, m, n, dtype, layout, mode, gen):
    buf, g, g_old = (randn(*lead, m, n, dtype=dtype, gen=gen) for _ in range(3))
    if MODES[mode][0] == 0:
        buf.fill_(float("nan"))  # α = 0: the kernel must not read buf
    if layout == "strided":
        buf, g, g_old = strided(buf), transposed(g), strided(g_old)
    return buf, g, g_old if mode == "exact" else None


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [f32, bf16, f64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("lead", [(), (1,), (3,)], ids=["2d", "b1", "b3"])
@pytest.mark.parametrize(("m", "n"), [(33, 70), (70, 33)], ids=["wide", "tall"])
def test_momentum_ns_input(mode, dtype, layout, lead, m, n, gen):
    buf, g, g_old = momentum_inputs(lead, m, n, dtype, layout, mode, gen)
    c = MODES[mode]
    x_dtype = bf16 if dtype == f32 else dtype
    new64, X64 = momentum64(buf, g, g_old, c)
    ref_buf = buf.clone()
    X_ref, sq_ref = reference_fused.momentum_ns_input_(ref_buf, g, g_old, c, x_dtype, None)
    X, sq = ops.momentum_ns_input_(buf, g, g_old, c, x_dtype, None)

    assert X.dtype == x_dtype and X.shape == g.shape and X.is_contiguous()
    assert sq.shape == g.shape[:-2] and sq.dtype == (f64 if dtype == f64 else f32)
    assert_bitwise(buf, ref_buf, "buf")
    assert_bitwise(X, X_ref, "X")
    torch.testing.assert_close(sq, sq_ref, rtol=SQNORM_RTOL[dtype], atol=0)
    assert not buf.isnan().any() and not X.isnan().any()
    torch.testing.assert_close(buf.double(), new64, **TOL[dtype])
    torch.testing.assert_close(X.double(), X64, **TOL[x_dtype])
    # sqnorm is of X before its rounding to x_dtype
    torch.testing.assert_close(sq.double(), X64.square().sum((-2, -1)), **TOL[f32 if dtype == bf16 else dtype])


@pytest.mark.parametrize(("buf_dtype", "g_dtype", "old_dtype", "x_dtype"), [
    (f32, bf16, bf16, f32), (bf16, f32, bf16, bf16), (f32, torch.float16, f32, torch.float16),
    (f32, f32, f64, f32), (f64, f32, f32, bf16), (f32, f32, f32, f64)])
def test_momentum_mixed_dtypes(buf_dtype, g_dtype, old_dtype, x_dtype, gen):
    # fp64 next to narrower operands: the reference rounds some products in fp32 (the kernel's ATen path)
    buf, g, g_old = randn(2, 40, 24, dtype=buf_dtype, gen=gen), randn(2, 40, 24, dtype=g_dtype, gen=gen), randn(
        2, 40, 24, dtype=old_dtype, gen=gen)
    ref_buf = buf.clone()
    X_ref, sq_ref = reference_fused.momentum_ns_input_(ref_buf, g, g_old, MODES["exact"], x_dtype, None)
    X, sq = ops.momentum_ns_input_(buf, g, g_old, MODES["exact"], x_dtype, None)
    assert_bitwise(buf, ref_buf, "buf")
    assert_bitwise(X, X_ref, "X")
    torch.testing.assert_close(sq, sq_ref, rtol=SQNORM_RTOL[sq_ref.dtype], atol=0)


@pytest.mark.parametrize("mode", ["exact", "approx", "first"])
def test_momentum_skip_leaves_buf(mode, gen):
    buf, g, g_old = momentum_inputs((2,), 24, 40, f32, "strided", mode, gen)
    before = buf.clone()
    X_ref, sq_ref = reference_fused.momentum_ns_input_(buf.clone(), g, g_old, MODES[mode], bf16, None)
    X, sq = ops.momentum_ns_input_(buf, g, g_old, MODES[mode], bf16, torch.tensor(1))
    assert_bitwise(buf, before, "buf with skip set")
    assert_bitwise(X, X_ref, "X with skip set")  # the outputs are still computed
    torch.testing.assert_close(sq, sq_ref, rtol=SQNORM_RTOL[f32], atol=0)
    ops.momentum_ns_input_(buf, g, g_old, MODES[mode], bf16, torch.tensor(0.0))
    assert not buf.isnan().any(), "skip = 0 writes buf"


def test_sqnorm_independent_of_threads(threads, gen):
    # several chunks per matrix (65536 elements each), so threads split matrices
    g, buf = randn(3, 300, 500, gen=gen), randn(3, 300, 500, gen=gen)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(ops.momentum_ns_input_(buf.clone(), g, None, MODES["approx"], bf16, None)[1])
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0], reference_fused.momentum_ns_input_(
        buf.clone(), g, None, MODES["approx"], bf16, None)[1], rtol=SQNORM_RTOL[f32], atol=0)


# -- lowrank_momentum_ns_input --------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [f32, bf16, f64], ids=str)
@pytest.mark.parametrize(("lead", "m", "n"), [((), 130, 33), ((1,), 33, 70), ((3,), 70, 33)], ids=["2d", "b1", "b3"])
def test_lowrank_momentum_ns_input(mode, dtype, lead, m, n, gen):
    r = 4
    fdtype = f64 if dtype == f64 else f32
    U, V = randn(*lead, m, r, dtype=fdtype, gen=gen), randn(*lead, n, r, dtype=fdtype, gen=gen)
    S = torch.rand(*lead, r, generator=gen, dtype=f64).to(fdtype)
    g, g_old = transposed(randn(*lead, m, n, dtype=dtype, gen=gen)), strided(randn(*lead, m, n, dtype=dtype, gen=gen))
    g_old = g_old if mode == "exact" else None
    c = MODES[mode]
    x_dtype = bf16 if dtype == f32 else dtype
    prev64 = (U.double() * S.double().unsqueeze(-2)) @ V.double().mT
    new64, X64 = momentum64(prev64, g, g_old, c)
    buf_ref, X_ref, sq_ref = reference_fused.lowrank_momentum_ns_input(U, S, V, g, g_old, c, x_dtype)
    buf, X, sq = ops.lowrank_momentum_ns_input(U, S, V, g, g_old, c, x_dtype)

    assert (buf.dtype, X.dtype, sq.dtype) == (dtype, x_dtype, fdtype)
    assert buf.is_contiguous() and X.is_contiguous() and sq.shape == g.shape[:-2]
    # the product's rows come from per-block matmuls: equal to the reference's up to its rounding
    torch.testing.assert_close(buf, buf_ref, **TOL[dtype])
    torch.testing.assert_close(X, X_ref, **TOL[x_dtype])
    torch.testing.assert_close(sq, sq_ref, rtol=SQNORM_RTOL[dtype] * 10, atol=0)
    torch.testing.assert_close(buf.double(), new64, **TOL[dtype])
    torch.testing.assert_close(X.double(), X64, **TOL[x_dtype])
    torch.testing.assert_close(sq.double(), X64.square().sum((-2, -1)), **TOL[fdtype])
    if c[0] == 0:  # the product is not used: the elementwise outputs are the reference's, bit for bit
        assert_bitwise(buf, buf_ref, "buf")
        assert_bitwise(X, X_ref, "X")


# -- newton_schulz_update_ ------------------------------------------------------------------------


def ns64(X, coefficients):
    """Plain Newton–Schulz in fp64 on X (B, m, n) already normalised: X ← a·X + (b·A + c·A²)·X, A = X Xᵀ,
    on the side with the smaller Gram matrix (Gram NS is the same iteration rewritten)."""
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    for i in range(0, len(coefficients), 3):
        a, b, c = coefficients[i:i + 3]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def ns_params(B, m, n, dtype, gen):
    """W: B = 1 → one (m, n) matrix; else a (2, m, n) parameter, a non-contiguous (m, n) one, then (B−3, m, n)."""
    if B == 1:
        return [randn(m, n, dtype=dtype, gen=gen)]
    return [randn(2, m, n, dtype=dtype, gen=gen), transposed(randn(m, n, dtype=dtype, gen=gen)),
            randn(B - 3, m, n, dtype=dtype, gen=gen)]


def ns_case(B, m, n, dtype, gen):
    X = randn(B, m, n, dtype=dtype, gen=gen)
    sqnorm = X.to(torch.promote_types(dtype, f32)).square().sum((-2, -1))
    return strided(X), sqnorm, ns_params(B, m, n, dtype, gen)


NS_DTYPES = [(f32, f32), (f32, bf16), (bf16, bf16), (f64, f64)]  # (X and W dtype, compute dtype)
# max |W − W64| / (lr·scale): O's error against fp64 after 5 iterations, about 5-10x the largest measured
# on these cases (fp64 2.7e-15, fp32 1.1e-6, bf16 matmuls 1.2e-2)
NS_TOL = {f64: 1e-13, f32: 1e-5, bf16: 0.05}


@pytest.mark.parametrize(("dtype", "compute"), NS_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("B", "m", "n"), [(1, 24, 40), (4, 40, 24), (5, 24, 40)], ids=["b1-wide", "b4-tall", "b5"])
@pytest.mark.parametrize("restarts", [None, [2]], ids=["standard", "gram"])
@pytest.mark.parametrize("with_delta", [False, True], ids=["", "delta"])
def test_newton_schulz_update(dtype, compute, B, m, n, restarts, with_delta, gen):
    X, sqnorm, W = ns_case(B, m, n, dtype, gen)
    lr, wd, scale, eps, norm_scale = torch.tensor(0.5), 0.1, 1.3, 1e-7, 1.02
    acc = torch.promote_types(dtype, f32)
    W_ref = [w.clone() for w in W]
    delta = torch.full((B, m, n), float("nan"), dtype=dtype) if with_delta else None
    delta_ref = None if delta is None else delta.clone()
    W0 = torch.cat([w.double().reshape(-1, m, n) for w in W])

    reference_fused.newton_schulz_update_(X, sqnorm, W_ref, lr, wd, scale, KELLER, eps, norm_scale, compute,
                                          restarts, None, delta_ref)
    ops.newton_schulz_update_(X, sqnorm, W, lr, wd, scale, KELLER, eps, norm_scale, compute, restarts, None, delta)
    for j, (w, w_ref) in enumerate(zip(W, W_ref)):
        assert_bitwise(w, w_ref, f"W[{j}]")
    if delta is not None:
        assert_bitwise(delta, delta_ref, "delta")

    Xn = X.double() / (norm_scale * sqnorm.double().sqrt()).clamp_min(eps).reshape(-1, 1, 1)
    O64 = ns64(Xn.to(compute).double() if compute == bf16 else Xn, KELLER)
    lr64 = lr.to(acc).double()
    W64 = W0 * (1 - lr64 * wd) - lr64 * scale * O64
    got = torch.cat([w.double().reshape(-1, m, n) for w in W])
    # W's own rounding (bf16 storage) plus O's error scaled by lr·scale
    bound = NS_TOL[compute] * float(lr64 * scale) + (2 ** -8 if dtype == bf16 else 0) * W64.abs()
    assert ((got - W64).abs() <= bound).all(), float((got - W64).abs().max())
    if delta is not None:
        d64 = W0 * lr64 * wd + lr64 * scale * O64
        assert ((delta.double() - d64).abs() <= bound).all(), "delta vs fp64"
        if dtype != bf16:  # delta = W_k − W_{k+1} up to W's rounding
            torch.testing.assert_close(delta.double(), W0 - got, **TOL[dtype])


def test_newton_schulz_update_skip_writes_nothing(gen):
    X, sqnorm, W = ns_case(4, 24, 40, f32, gen)
    delta = randn(4, 24, 40, gen=gen)
    before = [w.clone() for w in [*W, delta]]
    # a NaN sqnorm would poison every output if the kernel did any work before looking at skip
    ops.newton_schulz_update_(X, torch.full_like(sqnorm, float("nan")), W, torch.tensor(0.1), 0.1, 1.0, KELLER,
                              1e-7, 1.0, None, [2], torch.tensor([True]), delta)
    for got, want in zip([*W, delta], before):
        assert_bitwise(got, want, "skip set: every output unchanged")
    ops.newton_schulz_update_(X, sqnorm, W, torch.tensor(0.1), 0.1, 1.0, KELLER, 1e-7, 1.0, None, None,
                              torch.tensor(0), delta)
    assert not torch.equal(W[0], before[0]) and not torch.equal(delta, before[-1]), "skip = 0 writes"


@pytest.mark.parametrize("lr_dtype", [f32, f64], ids=str)
def test_newton_schulz_update_lr_tensor(lr_dtype, gen):
    # lr read from the tensor each call (a schedule changes it in place), rounded to O's dtype
    X, sqnorm, W = ns_case(3, 40, 24, f32, gen)
    lr = torch.tensor(0.0, dtype=lr_dtype)
    W_ref = [w.clone() for w in W]
    for value in (1 / 3, 0.07):
        lr.fill_(value)
        reference_fused.newton_schulz_update_(X, sqnorm, W_ref, lr, 0.01, 0.7, KELLER, 1e-7, 1.0, f32, None, None,
                                              None)
        ops.newton_schulz_update_(X, sqnorm, W, lr, 0.01, 0.7, KELLER, 1e-7, 1.0, f32, None, None, None)
        for w, w_ref in zip(W, W_ref):
            assert_bitwise(w, w_ref, f"W after lr = {value}")
