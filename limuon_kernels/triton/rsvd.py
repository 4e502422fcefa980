"""Randomized SVD with the Gaussian sketch ``Y = M Ω`` computed by a Triton kernel that never stores Ω.

Each program of ``_sketch_kernel`` owns a ``BLOCK_M × BLOCK_K`` tile of ``Y_b`` for matrix ``b``
of a stacked ``(B, m, n)`` group and walks over n, drawing the matching ``BLOCK_N × BLOCK_K``
piece of ``Ω_b`` with Philox (``tl.randn4x``) as it goes. Ω entries are a function of
``(seed_b, row j, column c)`` only:

    Ω_b[j, 4g + t] = randn4x(seed_b, offset=(g << 32) | j)[t],   t = 0..3

so Y does not depend on the tiling or the autotuned config, on which matrices share a launch, or
on the sketch width (a wider sketch only appends columns). ``seed_b`` is the 63-bit per-matrix
seed itself (Philox takes a 64-bit key). The rest (CholeskyQR2 with a Householder fallback selected
on the device, power
iterations, ``B = Qᵀ M``, the small SVD) is fp32 PyTorch. Ω differs from the reference's CPU
mt19937 Ω, so results equal the reference's only up to the randomness: deterministic per backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget
from limuon_kernels.triton._utils import dtype_name, launch_tuned, next_pow2_at_least_16, ptr

MAX_BLOCK_K = 32
# Drawing Ω costs ~100 integer ops per 4 entries and is repeated for every row tile, so row tiles
# are tall and column steps short (16); BLOCK_K ≤ 32 keeps the accumulator small. 3×tf32 splits
# both operands in registers: wider column steps, or pipelining the 64- and 128-row tiles, spill on
# sm_90 or sm_80. These compile without spills on both, for 16-divisible sizes and for others.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 16}, num_warps=8, num_stages=2),
]


@triton.jit
def _omega_tile(seed, rj, g0, BLOCK_K: tl.constexpr):
    """``Ω[rj, 4·g0 : 4·g0 + BLOCK_K]`` as an fp32 ``(len(rj), BLOCK_K)`` tile (see the module docstring)."""
    g = g0 + tl.arange(0, BLOCK_K // 4).to(tl.int64)
    n1, n2, n3, n4 = tl.randn4x(seed, (g[None, :] << 32) | rj[:, None].to(tl.int64))
    # Column 4g + t holds n_{t+1}: interleave twice.
    return tl.interleave(tl.interleave(n1, n3), tl.interleave(n2, n4))


@triton.jit
def _sketch_kernel(
    m_ptr,
    seed_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_mb,
    stride_mm,
    stride_mn,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    b = pid // (tiles_m * tiles_k)
    tile = pid - b * (tiles_m * tiles_k)
    pid_m = tile // tiles_k
    pid_k = tile - pid_m * tiles_k
    b = b.to(tl.int64)
    seed = tl.load(seed_ptr + b)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rj = tl.arange(0, BLOCK_N)
    m_mask = rm < M
    # int64 offsets once, then advance the pointers: fewer 64-bit registers in the loop.
    a_ptrs = m_ptr + b * stride_mb + rm[:, None] * stride_mm + rj[None, :].to(tl.int64) * stride_mn
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        # Upcast right after the load: the interpreter holds bf16 as raw uint16 (docs/DESIGN.md §6).
        # Columns past n load as 0, so the Ω rows drawn for them contribute nothing.
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (j0 + rj < N)[None, :], other=0.0).to(tl.float32)
        omega = _omega_tile(seed, j0 + rj, pid_k.to(tl.int64) * (BLOCK_K // 4), BLOCK_K)
        # 3×tf32 on tensor cores: fp32-level accuracy (plain tf32 would round fp32 M to 10 bits, a
        # full-rank perturbation of the sketch; Triton 3.9 also fails to compile tf32 here on sm_90).
        acc = tl.dot(a, omega, acc, input_precision="tf32x3")
        a_ptrs += BLOCK_N * stride_mn
    y_offs = b * M * K + rm[:, None] * K + rc[None, :]
    tl.store(y_ptr + y_offs, acc, mask=m_mask[:, None] & (rc < K)[None, :])


_sketch_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_sketch_kernel)


# -- launchers ------------------------------------------------------------------------------------


def gaussian_sketch(M: Tensor, seeds: Tensor, k: int) -> Tensor:
    """``Y_b = M_b Ω_b`` for ``M: (B, m, n)`` (any float dtype, any strides) and ``seeds: (B,)`` int64.

    Returns ``Y: (B, m, k)`` fp32, contiguous. ``Ω_b ~ N(0, 1)^{n×k}`` is drawn in the kernel from
    ``seeds[b]`` and never stored. One pass over M per 32 sketch columns (one for k ≤ 32).
    """
    torch._check(M.dim() == 3, lambda: f"M must have shape (B, m, n), got {tuple(M.shape)}")
    batch, m, n = M.shape
    torch._check(
        seeds.shape == (batch,) and seeds.dtype == torch.int64,
        lambda: f"seeds must be an int64 tensor of shape ({batch},), got {seeds.dtype} {tuple(seeds.shape)}",
    )
    torch._check(k >= 1, lambda: f"k must be positive, got {k}")
    Y = torch.empty(batch, m, k, dtype=torch.float32, device=M.device)
    if Y.numel() == 0:
        return Y
    if n == 0:
        return Y.zero_()
    block_k = next_pow2_at_least_16(k, MAX_BLOCK_K)

    def grid(cfg):
        return (batch * triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(k, block_k),)

    launch_tuned(
        _sketch_tuned,
        grid,
        M,
        seeds.to(M.device),
        Y,
        m,
        n,
        k,
        *M.stride(),
        BLOCK_K=block_k,
    )
    return Y


def _cholesky_qr(Y: Tensor) -> tuple[Tensor, Tensor]:
    """One CholeskyQR pass: ``Q = Y R⁻¹`` with ``RᵀR = YᵀY``; also whether the Cholesky factorisation succeeded."""
    L, info = torch.linalg.cholesky_ex(Y.mT @ Y)
    return torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False), info == 0


def orthonormalize(Y: Tensor) -> Tensor:
    """Orthonormal basis ``Q: (B, m, k)`` of the columns of ``Y: (B, m, k)`` (fp32, k ≤ m).

    CholeskyQR2 (two Gram-matrix passes: only small k×k factorisations, GPU-friendly), replaced by
    Householder QR for each matrix where it fails: a Cholesky breakdown, or a result that is not
    orthonormal to 1e-4 (Y ill-conditioned, e.g. a sketch of a matrix whose rank is below k).
    Decided per matrix, so a matrix's Q does not depend on the others in the batch. The choice is a
    select on the device (the Householder QR of the whole batch is computed every time): no host
    synchronisation, so an optimizer step can run ahead of the host (and be captured in a graph).
    """
    Q1, ok1 = _cholesky_qr(Y)
    Q, ok2 = _cholesky_qr(Q1)
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    err = (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))
    good = ok1 & ok2 & (err <= 1e-4)  # NaN err compares False: not good
    return torch.where(good[:, None, None], Q, torch.linalg.qr(Y).Q)


def rsvd(
    M: Tensor, rank: int, oversample: int, power_iters: int, seeds: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD (Halko–Martinsson–Tropp) of every matrix in ``M: (..., m, n)``, in fp32.

        Ω_i from seeds[i] in the sketch kernel, k = min(rank + oversample, m, n);  Y = M Ω
        q times: Q = orth(Y);  Z = orth(Mᵀ Q);  Y = M Z               (power iterations)
        Q = orth(Y);  B = Qᵀ M;  (Ũ, Σ, Vᵀ) = svd(B);  U = Q Ũ
    Returns contiguous fp32 ``U: (..., m, rank)``, ``S: (..., rank)``, ``V: (..., n, rank)``; the sign
    of each singular pair is fixed so that the largest-magnitude entry of each U column is positive.
    ``seeds`` holds one integer in [0, 2⁶³) per matrix (or is an int64 tensor).
    """
    torch._check(M.dim() >= 2, lambda: f"M must have shape (..., m, n), got {tuple(M.shape)}")
    *lead, m, n = M.shape
    torch._check(1 <= rank <= min(m, n), lambda: f"rank must be in [1, min(m, n) = {min(m, n)}], got {rank}")
    Mb = M.reshape(-1, m, n)
    batch = Mb.shape[0]
    if isinstance(seeds, Tensor):
        seed_t = seeds.to(device=M.device, dtype=torch.int64).reshape(-1)
    else:
        seed_t = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=M.device)
    torch._check(seed_t.numel() == batch, lambda: f"got {seed_t.numel()} seeds for a batch of {batch} matrices")
    k = min(rank + oversample, m, n)

    Y = gaussian_sketch(Mb, seed_t, k)
    Mf = Mb.float()
    for _ in range(power_iters):
        Q = orthonormalize(Y)
        Z = orthonormalize(torch.bmm(Mf.mT, Q))
        Y = torch.bmm(Mf, Z)
    Q = orthonormalize(Y)
    Ub, S, Vh = torch.linalg.svd(torch.bmm(Q.mT, Mf), full_matrices=False)
    U = torch.bmm(Q, Ub[..., :rank])
    V = Vh[..., :rank, :].mT
    # Fix the sign of each singular pair (largest-magnitude entry of the U column positive): the
    # SVD's own choice can flip with last-bit differences, e.g. between batched and single calls.
    sign = torch.sign(U.gather(-2, U.abs().argmax(dim=-2, keepdim=True)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (
        (U * sign).reshape(*lead, m, rank).contiguous(),
        S[..., :rank].reshape(*lead, rank).contiguous(),
        (V * sign).reshape(*lead, n, rank).contiguous(),
    )


# -- ahead-of-time compile targets (format: limuon_kernels/triton/_compile_targets.py) ------------


def _targets() -> list[KernelTarget]:
    # A contiguous group: unit column stride (the JIT specialises integer arguments equal to 1).
    ints = {a: "i32" for a in ("M", "N", "K", "stride_mb", "stride_mm")}
    configs = [
        KernelConfig({**c.kwargs, "BLOCK_K": block_k}, c.num_warps, c.num_stages)
        for c in _CONFIGS
        for block_k in (16, MAX_BLOCK_K)
    ]
    return [
        KernelTarget(
            f"rsvd_sketch[M={dtype_name(dtype)}]",
            _sketch_kernel,
            {"m_ptr": ptr(dtype), "seed_ptr": "*i64", "y_ptr": ptr(torch.float32), **ints, "stride_mn": 1},
            configs,
        )
        for dtype in (torch.float32, torch.bfloat16)
    ]


COMPILE_TARGETS: list[KernelTarget] = _targets()
