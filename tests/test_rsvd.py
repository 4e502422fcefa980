"""Randomized SVD: quality against the Eckart–Young optimum, exactness, factor properties, seeding.

Quality bounds. For a target rank r and oversampling p = 5, Halko–Martinsson–Tropp Thm 10.5 bounds
the expected error of the rank-(r+p) projection by sqrt(1 + r/(p−1)) times the optimum
sqrt(Σ_{i>r} σ_i²), i.e. ≤ 1.73 for r ≤ 8 (truncating to rank r adds a little). Over 50 seeds on the
spectra used here the worst ratios were 1.45 (no power iteration), 1.04 (one) and 1.012 (two), so the
limits below (2.0, 1.15, 1.05) hold for any correct sketch and still catch a missing oversample, a
mis-seeded or degenerate sketch, or skipped power iterations.
"""

from __future__ import annotations

import pytest
import torch

import limuon_kernels as lk
from limuon_kernels import derive_seed

RATIO_LIMIT = {0: 2.0, 1: 1.15, 2: 1.05}

SPECTRA = {
    "exp0.7": lambda k: 0.7 ** torch.arange(k, dtype=torch.float64),  # fast decay
    "inv": lambda k: 1.0 / (1.0 + torch.arange(k, dtype=torch.float64)),  # slow decay: the hard case
}


def params(*cases):
    """``pytest.param`` per tuple, with the readable id ``"33x64x4"``."""
    return [pytest.param(*c, id="x".join(map(str, c))) for c in cases]


def lead_id(lead):
    return "b" + "x".join(map(str, lead)) if lead else "nobatch"


def known_spectrum(m, n, svals, gen):
    """fp64 ``m×n`` matrix with singular values ``svals`` between random orthogonal factors."""
    k = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return (Q1 * svals) @ Q2.T


def spectrum_batch(lead, m, n, spectrum, gen, scale_spread=True):
    """``(*lead, m, n)`` fp64 matrices with the given spectrum, each scaled differently."""
    count = 1
    for d in lead:
        count *= d
    mats = [known_spectrum(m, n, SPECTRA[spectrum](min(m, n)), gen) * (10.0**i if scale_spread else 1.0)
            for i in range(count)]
    return torch.stack(mats).reshape(*lead, m, n)


def reconstruct(U, S, V):
    return (U.double().cpu() * S.double().cpu().unsqueeze(-2)) @ V.double().cpu().mT


def errors_and_optimum(M, U, S, V, rank):
    """Per-matrix Frobenius error of U diag(S) Vᵀ and the Eckart–Young optimum, both in fp64."""
    M64 = M.double().cpu()
    m, n = M64.shape[-2:]
    err = torch.linalg.matrix_norm(M64 - reconstruct(U, S, V)).reshape(-1)
    sv = torch.linalg.svdvals(M64).reshape(-1, min(m, n))
    opt = sv[:, rank:].square().sum(-1).sqrt()
    return err, opt, sv


def assert_factor_properties(U, S, V, lead, m, n, rank):
    assert U.shape == (*lead, m, rank) and S.shape == (*lead, rank) and V.shape == (*lead, n, rank)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(V).all()
    eye = torch.eye(rank, dtype=torch.float64).expand(*lead, rank, rank)
    Ud, Vd = U.double().cpu(), V.double().cpu()
    torch.testing.assert_close(Ud.mT @ Ud, eye, rtol=0, atol=1e-5, msg="U columns are not orthonormal")
    torch.testing.assert_close(Vd.mT @ Vd, eye, rtol=0, atol=1e-5, msg="V columns are not orthonormal")
    assert (S >= 0).all(), "singular values must be non-negative"
    assert (S[..., :-1] >= S[..., 1:]).all(), "singular values must be in descending order"


@pytest.mark.parametrize("power_iters", [0, 1, 2])
@pytest.mark.parametrize("lead", [(), (1,), (3,)], ids=lead_id)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize(("m", "n", "rank"), params((33, 64, 4), (64, 33, 8), (48, 40, 8)))
def test_rsvd_near_eckart_young(dev, m, n, rank, spectrum, lead, power_iters, gen):
    M = spectrum_batch(lead, m, n, spectrum, gen).float().to(dev)
    U, S, V = lk.rsvd(M, rank, power_iters=power_iters, seed=3)
    assert_factor_properties(U, S, V, lead, m, n, rank)
    err, opt, _ = errors_and_optimum(M, U, S, V, rank)
    ratio = (err / opt).max().item()
    assert ratio <= RATIO_LIMIT[power_iters], f"error / Eckart–Young optimum = {ratio:.3f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
def test_rsvd_input_dtypes(dev, dtype, gen):
    M = spectrum_batch((3,), 33, 64, "inv", gen).to(device=dev, dtype=dtype)
    U, S, V = lk.rsvd(M, 6, power_iters=1)
    assert_factor_properties(U, S, V, (3,), 33, 64, 6)
    err, opt, _ = errors_and_optimum(M, U, S, V, 6)  # optimum of the matrix actually passed in
    assert (err / opt).max().item() <= RATIO_LIMIT[1]


@pytest.mark.parametrize("lead", [(), (1,), (3,)], ids=lead_id)
@pytest.mark.parametrize(
    ("m", "n", "rank"), params((5, 123, 2), (123, 5, 2), (33, 64, 4), (64, 33, 8), (1, 7, 1))
)
def test_rsvd_exact_on_rank_r_input(dev, m, n, rank, lead, gen):
    A = torch.randn(*lead, m, rank, generator=gen, dtype=torch.float64)
    B = torch.randn(*lead, rank, n, generator=gen, dtype=torch.float64)
    M = (A @ B).float().to(dev)
    U, S, V = lk.rsvd(M, rank)
    assert_factor_properties(U, S, V, lead, m, n, rank)
    M64 = M.double().cpu()
    rel = torch.linalg.matrix_norm(M64 - reconstruct(U, S, V)) / torch.linalg.matrix_norm(M64)
    assert rel.max().item() <= 1e-5


@pytest.mark.parametrize(("m", "n", "rank"), params((33, 64, 4), (64, 33, 8), (48, 40, 8)))
def test_rsvd_power_iters_do_not_hurt(dev, m, n, rank, gen):
    M = spectrum_batch((3,), m, n, "inv", gen).float().to(dev)
    errs = []
    for q in range(4):
        U, S, V = lk.rsvd(M, rank, power_iters=q, seed=5)
        errs.append(errors_and_optimum(M, U, S, V, rank)[0])
    for q in range(3):
        assert (errs[q + 1] <= errs[q] * (1 + 1e-4)).all(), f"power_iters={q + 1} worse than {q}: {errs}"
    assert (errs[3] < errs[0]).all()


@pytest.mark.parametrize(
    ("m", "n", "rank", "oversample"),
    params((33, 64, 5, 28), (64, 33, 5, 40), (123, 5, 2, 3), (5, 123, 5, 0), (40, 40, 40, 0), (1, 7, 1, 0)),
)
def test_rsvd_full_sketch_is_exact_truncated_svd(dev, m, n, rank, oversample, gen):
    # rank + oversample ≥ min(m, n): the sketch spans the whole range, so RSVD is the exact SVD.
    k = min(m, n)
    svals = torch.linspace(2.0, 0.2, k, dtype=torch.float64)  # well separated
    M64 = torch.stack([known_spectrum(m, n, svals, gen) for _ in range(3)])
    M = M64.float().to(dev)
    U, S, V = lk.rsvd(M, rank, oversample=oversample)
    assert_factor_properties(U, S, V, (3,), m, n, rank)
    U_t, S_t, Vh_t = torch.linalg.svd(M.double().cpu(), full_matrices=False)
    torch.testing.assert_close(S.double().cpu(), S_t[..., :rank], rtol=1e-5, atol=1e-6)
    best = (U_t[..., :rank] * S_t[..., None, :rank]) @ Vh_t[..., :rank, :]
    # fp32 roundoff in the singular vectors is ~eps·σ_1/gap = 1e-7·2/0.056; a sketch that missed part
    # of the range would be off by ~σ_{rank+1} ≥ 0.2.
    torch.testing.assert_close(reconstruct(U, S, V), best, rtol=0, atol=5e-5)
    # Singular vectors match up to sign.
    for got, want in ((U, U_t[..., :rank]), (V, Vh_t[..., :rank, :].mT)):
        cos = (got.double().cpu() * want).sum(-2).abs()
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)


def test_rsvd_rank_deficient_and_zero_input(dev, gen):
    # Rank 2 < sketch width and an all-zero matrix: the sketch is rank-deficient, which breaks a
    # Cholesky-based QR; the result must stay finite, orthonormal and exact.
    A = torch.randn(33, 2, generator=gen, dtype=torch.float64)
    B = torch.randn(2, 64, generator=gen, dtype=torch.float64)
    M = torch.stack([A @ B, torch.zeros(33, 64, dtype=torch.float64)]).float().to(dev)
    U, S, V = lk.rsvd(M, 6)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(V).all()
    assert_factor_properties(U, S, V, (2,), 33, 64, 6)
    torch.testing.assert_close(reconstruct(U, S, V), M.double().cpu(), rtol=0, atol=1e-4)
    assert torch.count_nonzero(S[1]) == 0
    assert S[0, 2:].abs().max().item() <= 1e-5 * S[0, 0].item()


def test_rsvd_noncontiguous_input(dev, gen):
    M = spectrum_batch((3,), 64, 33, "inv", gen).float().to(dev)
    Mt = M.contiguous().mT.contiguous().mT  # same values, column-major
    Ms = torch.zeros(3, 70, 80, device=dev)[:, 2:66, 5:71:2]  # strided slice
    Ms.copy_(M)
    ref = lk.rsvd(M.contiguous(), 5, power_iters=1, seed=9)
    for view in (Mt, Ms):
        assert not view.is_contiguous()
        got = lk.rsvd(view, 5, power_iters=1, seed=9)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reconstruct(*got), reconstruct(*ref), rtol=0, atol=1e-5)


# -- seeding ------------------------------------------------------------------------------------


def test_rsvd_same_seed_is_deterministic(dev, gen):
    M = spectrum_batch((3,), 33, 64, "inv", gen).float().to(dev)
    for kwargs in ({"seed": 17}, {"seed": [4, 5, 6], "power_iters": 2}):
        a = lk.rsvd(M, 4, **kwargs)
        b = lk.rsvd(M, 4, **kwargs)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_rsvd_different_seed_changes_the_sketch(dev, gen):
    # Slow decay and no power iteration: the result depends visibly on the sketch.
    M = spectrum_batch((), 33, 64, "inv", gen).float().to(dev)
    _, S0, _ = lk.rsvd(M, 4, seed=0)
    _, S1, _ = lk.rsvd(M, 4, seed=1)
    assert (S0 - S1).abs().max().item() > 1e-4 * S0.max().item()
    # Within a batch, an int seed gives each matrix its own sketch (derive_seed(seed, i)).
    same = M.expand(3, 33, 64)
    _, S, _ = lk.rsvd(same, 4, seed=0)
    assert (S[0] - S[1]).abs().max().item() > 1e-4 * S.max().item()
    assert (S[1] - S[2]).abs().max().item() > 1e-4 * S.max().item()


def assert_same_factorisation(a, b, atol=1e-5):
    """Equal S, equal U diag(S) Vᵀ, and equal singular vectors up to sign."""
    Ua, Sa, Va = a
    Ub, Sb, Vb = b
    torch.testing.assert_close(Sa.cpu(), Sb.cpu(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(reconstruct(*a), reconstruct(*b), rtol=0, atol=atol * max(1.0, Sa.max().item()))
    for x, y in ((Ua, Ub), (Va, Vb)):
        cos = (x.double().cpu() * y.double().cpu()).sum(-2).abs()
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-4)


def test_rsvd_batch_equals_per_matrix_calls(dev, gen):
    # Fast decay: the singular vectors are well separated, so they compare up to sign.
    M = spectrum_batch((3,), 33, 64, "exp0.7", gen).float().to(dev)
    batch_int = lk.rsvd(M, 4, seed=21)
    batch_list = lk.rsvd(M, 4, seed=[101, 202, 303])
    for i in range(3):
        single = lk.rsvd(M[i], 4, seed=[derive_seed(21, i)])
        assert_same_factorisation(tuple(t[i] for t in batch_int), single)
        single = lk.rsvd(M[i], 4, seed=[(101, 202, 303)[i]])
        assert_same_factorisation(tuple(t[i] for t in batch_list), single)
    # An unbatched matrix with an int seed is matrix 0 of a batch.
    unbatched = lk.rsvd(M[0], 4, seed=21)
    for x, y in zip(unbatched, lk.rsvd(M[0], 4, seed=[derive_seed(21, 0)])):
        assert torch.equal(x, y)
    # Multi-dimensional leading shape: seeds follow the flattened (row-major) batch index.
    M4 = spectrum_batch((2, 2), 33, 64, "exp0.7", gen).float().to(dev)
    got = lk.rsvd(M4, 4, seed=5)
    for i in range(4):
        single = lk.rsvd(M4.reshape(4, 33, 64)[i], 4, seed=[derive_seed(5, i)])
        assert_same_factorisation(tuple(t.reshape(4, *t.shape[2:])[i] for t in got), single)


def test_derive_seed():
    seeds = {derive_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000, "derive_seed collides on small keys"
    assert all(0 <= s < 1 << 63 for s in seeds)
    assert derive_seed(3, 7) == derive_seed(3, 7)
    assert derive_seed(3, 7) != derive_seed(7, 3)
    assert 0 <= derive_seed(-1, 2**70) < 1 << 63


@pytest.mark.skipif("cpp" not in lk.available_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("power_iters", [0, 2])
@pytest.mark.parametrize("lead", [(), (3,)], ids=lead_id)
@pytest.mark.parametrize(("m", "n", "rank"), params((33, 64, 4), (64, 33, 8), (5, 123, 2)))
def test_rsvd_cpp_matches_torch_for_same_seeds(m, n, rank, lead, power_iters, gen):
    # The same seed must draw the same Gaussian sketch on both backends (ops.rsvd's contract), so
    # even the sketch-dependent result of a slowly decaying spectrum agrees.
    M = spectrum_batch(lead, m, n, "exp0.7", gen).float()
    lk.set_backend("torch")
    ref = lk.rsvd(M, rank, power_iters=power_iters, seed=77)
    lk.set_backend("cpp")
    got = lk.rsvd(M, rank, power_iters=power_iters, seed=77)
    assert_same_factorisation(got, ref)


@pytest.mark.gpu
def test_rsvd_cuda_matches_cpu_for_same_seeds(gen):
    M = spectrum_batch((3,), 64, 33, "exp0.7", gen).float()
    ref = lk.rsvd(M, 6, seed=8)
    got = lk.rsvd(M.cuda(), 6, seed=8)
    assert all(t.is_cuda for t in got)
    assert_same_factorisation(got, ref, atol=1e-4)
