"""Triton RSVD (``limuon_kernels.triton.rsvd``): the in-kernel Gaussian sketch and the full RSVD.

Its Ω (Philox) differs from the reference's (CPU mt19937), so results are compared with the
mathematics (Eckart–Young, exact recovery, orthonormality), not with ``reference.rsvd``.
"""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does the same)

import pytest

pytest.importorskip("triton")

import triton

from limuon_kernels import reference
from limuon_kernels.triton import rsvd as trsvd
from limuon_kernels.triton._utils import is_interpreted

DEVICE = torch.device("cpu" if is_interpreted(trsvd._sketch_kernel) else "cuda")


def spectrum_matrix(m, n, sigma, gen):
    """A matrix with singular values ``sigma`` and random singular vectors (fp32)."""
    k = len(sigma)
    P = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return ((P * sigma.double()) @ Q.T).float().to(DEVICE)


def low_rank_error(M, U, S, V):
    return torch.linalg.matrix_norm(M.double() - (U.double() * S.double().unsqueeze(-2)) @ V.double().mT)


def omega(n, k, seed, dtype=torch.float32):
    """Ω itself: the sketch of the identity."""
    eye = torch.eye(n, dtype=dtype, device=DEVICE).unsqueeze(0)
    return trsvd.gaussian_sketch(eye, torch.tensor([seed]), k)[0]


# -- the sketch ------------------------------------------------------------------------------------


def test_omega_is_standard_normal():
    O = omega(64, 64, seed=7).cpu().double()
    assert abs(O.mean().item()) < 0.05
    assert abs(O.std().item() - 1) < 0.05
    assert abs((O**4).mean().item() - 3) < 0.4  # Gaussian kurtosis
    corr = torch.corrcoef(O.T).fill_diagonal_(0)
    assert corr.abs().max().item() < 0.5


def test_omega_depends_only_on_seed_row_column():
    """A wider sketch appends columns; more rows append rows; the dtype of M changes nothing."""
    O = omega(40, 13, seed=123)
    assert torch.equal(omega(40, 37, seed=123)[:, :13], O)
    assert torch.equal(omega(64, 13, seed=123)[:40], O)
    assert torch.equal(omega(40, 13, seed=123, dtype=torch.bfloat16), O)
    assert not torch.equal(omega(40, 13, seed=124), O)


def test_omega_independent_of_tiling():
    """Every block configuration, shipped or not, draws the same Ω (the sketch is exact for M = I)."""
    n, k = 40, 20
    eye = torch.eye(n, device=DEVICE).unsqueeze(0)
    seeds = torch.tensor([2**62 + 12345], device=DEVICE)  # 63-bit seeds use both Philox key words
    blocks = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in trsvd._CONFIGS] + [(16, 64), (32, 32)]
    results = []
    for block_m, block_n in blocks:
        for block_k in (16, 32):
            Y = torch.empty(1, n, k, device=DEVICE)
            grid = (triton.cdiv(n, block_m) * triton.cdiv(k, block_k),)
            trsvd._sketch_kernel[grid](
                eye, seeds, Y, n, n, k, *eye.stride(), BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_N=block_n
            )
            results.append(Y)
    for Y in results[1:]:
        assert torch.equal(Y, results[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 123), (33, 64), (64, 33), (3, 33, 64)], ids=lambda s: "x".join(map(str, s)))
def test_sketch_matches_explicit_product(shape, dtype, gen):
    M = torch.randn(shape, generator=gen).to(dtype).to(DEVICE).reshape(-1, *shape[-2:])
    seeds = torch.arange(M.shape[0], dtype=torch.int64) * 1000 + 3
    Y = trsvd.gaussian_sketch(M, seeds, 13)
    for i in range(M.shape[0]):
        ref = M[i].double() @ omega(shape[-1], 13, int(seeds[i])).double()
        torch.testing.assert_close(Y[i].double(), ref, rtol=1e-5, atol=1e-5)


def test_sketch_non_contiguous_input(gen):
    M = torch.randn(3, 64, 33, generator=gen).to(DEVICE)
    seeds = torch.tensor([1, 2, 3])
    Y = trsvd.gaussian_sketch(M.mT, seeds, 10)
    torch.testing.assert_close(Y, trsvd.gaussian_sketch(M.mT.contiguous(), seeds, 10), rtol=1e-6, atol=1e-6)


# -- the RSVD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("power_iters, factor", [(0, 3.0), (1, 1.1)])
def test_error_near_eckart_young(power_iters, factor, gen):
    sigma = 0.8 ** torch.arange(40, dtype=torch.float64)
    M = spectrum_matrix(64, 48, sigma, gen)
    rank = 8
    U, S, V = trsvd.rsvd(M, rank, 5, power_iters, [11])
    optimum = sigma[rank:].norm().item()
    assert low_rank_error(M, U, S, V).item() <= factor * optimum
    torch.testing.assert_close(S.double().cpu(), sigma[:rank], rtol=0.1 if power_iters == 0 else 1e-3, atol=0)


@pytest.mark.parametrize("shape", [(5, 123), (64, 33), (3, 33, 64)], ids=lambda s: "x".join(map(str, s)))
def test_exact_on_exactly_low_rank_input(shape, gen):
    *lead, m, n = shape
    r = min(4, m)
    M = (torch.randn(*lead, m, r, generator=gen) @ torch.randn(*lead, r, n, generator=gen)).to(DEVICE)
    U, S, V = trsvd.rsvd(M, r, 5, 0, list(range(M[..., 0, 0].numel())))
    rel = low_rank_error(M, U, S, V) / torch.linalg.matrix_norm(M.double())
    assert rel.max().item() < 1e-5


@pytest.mark.parametrize(
    "shape", [(5, 123), (64, 33), (3, 33, 64), (2, 2, 17, 40)], ids=lambda s: "x".join(map(str, s))
)
def test_output_contract(shape, gen):
    *lead, m, n = shape
    rank = 3
    M = torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    U, S, V = trsvd.rsvd(M, rank, 2, 1, list(range(M[..., 0, 0].numel())))
    assert U.shape == (*lead, m, rank) and S.shape == (*lead, rank) and V.shape == (*lead, n, rank)
    for t in (U, S, V):
        assert t.dtype == torch.float32 and t.is_contiguous()
    eye = torch.eye(rank, device=DEVICE)
    torch.testing.assert_close(U.mT @ U, eye.expand_as(U.mT @ U), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.mT @ V, eye.expand_as(V.mT @ V), atol=1e-5, rtol=0)
    assert bool((S[..., :-1] >= S[..., 1:]).all()) and bool((S >= 0).all())
    # sign convention: the largest-magnitude entry of each U column is positive
    assert bool((U.gather(-2, U.abs().argmax(dim=-2, keepdim=True)) > 0).all())


def test_deterministic_for_a_seed(gen):
    M = torch.randn(3, 33, 64, generator=gen).to(DEVICE)
    first = trsvd.rsvd(M, 4, 5, 1, [5, 6, 7])
    again = trsvd.rsvd(M, 4, 5, 1, [5, 6, 7])
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = trsvd.rsvd(M, 4, 5, 0, [8, 6, 7])
    assert not torch.equal(first[0][0], other[0][0])


def test_batch_independent_of_grouping(gen):
    """Matrix i with seed s gives the same factors alone or inside a batch."""
    M = torch.randn(3, 33, 64, generator=gen).to(DEVICE)
    seeds = [2**63 - 1, 0, 987654321]
    U, S, V = trsvd.rsvd(M, 4, 5, 1, seeds)
    for i, seed in enumerate(seeds):
        Ui, Si, Vi = trsvd.rsvd(M[i], 4, 5, 1, [seed])
        torch.testing.assert_close(Si, S[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(Ui, U[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(Vi, V[i], rtol=1e-4, atol=1e-5)


def test_seeds_as_tensor(gen):
    M = torch.randn(2, 17, 40, generator=gen).to(DEVICE)
    a = trsvd.rsvd(M, 3, 4, 0, [10, 20])
    b = trsvd.rsvd(M, 3, 4, 0, torch.tensor([10, 20]))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_orthonormalize_falls_back_on_rank_deficient_input(gen):
    """Duplicate columns break the Cholesky factorisation; that matrix alone goes to Householder QR."""
    good = torch.randn(33, 6, generator=gen)
    bad = torch.randn(33, 3, generator=gen).repeat(1, 2)
    Y = torch.stack([good, bad]).to(DEVICE)
    Q = trsvd.orthonormalize(Y)
    eye = torch.eye(6, device=DEVICE).expand(2, 6, 6)
    torch.testing.assert_close(Q.mT @ Q, eye, atol=1e-5, rtol=0)
    # Q spans Y: projecting Y on Q changes nothing
    torch.testing.assert_close(Q @ (Q.mT @ Y), Y, atol=1e-4, rtol=0)
    torch.testing.assert_close(Q[0], trsvd.orthonormalize(Y[:1])[0])


def test_rank_errors(gen):
    M = torch.randn(5, 123, generator=gen).to(DEVICE)
    with pytest.raises(RuntimeError, match="rank must be"):
        trsvd.rsvd(M, 6, 2, 0, [1])
    with pytest.raises(RuntimeError, match="seeds for a batch"):
        trsvd.rsvd(M, 2, 2, 0, [1, 2])


@pytest.mark.parametrize("name", ["rsvd"])
def test_launcher_signature_is_the_reference_one(name):
    """The dispatcher swaps ``reference.<op>(*args)`` for the launcher: same parameters, same order."""
    assert list(inspect.signature(getattr(trsvd, name)).parameters) == list(
        inspect.signature(getattr(reference, name)).parameters
    )
