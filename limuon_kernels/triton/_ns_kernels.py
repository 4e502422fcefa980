"""The kernels of the standard Newton–Schulz iteration and their tile configurations (the launchers and
the math are in ``newton_schulz.py``).

    _sumsq_kernel      per-matrix partial sums of squares of G, in fixed chunks (deterministic)
    _gram_kernel       A = X Xᵀ               upper-triangle tiles, each also stored mirrored
    _sym_poly_kernel   B = b·A + c·A·A        upper-triangle tiles + mirror
    _ns_update_kernel  X ← a·X + B·X          the matmul with the axpy epilogue

``_SQUARE`` / ``_RECT`` are the autotuning lists per arch family (``_arch_key``), also used by
``gram_newton_schulz.py``, ``ns_update.py`` and the compile targets; ``_tuned`` builds the autotuned
wrappers on first use.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from limuon_kernels.triton._compile_targets import KernelConfig
from limuon_kernels.triton._ns_tiles import _cast_out, _inv_norm, _load, _mma, _upper_tile

# -- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _sumsq_kernel(X_ptr, partial_ptr, numel, n_part, UPCAST: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # partial[b, chunk] = Σ x² over chunk `chunk` (BLOCK·ITERS elements) of contiguous matrix b
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    base = X_ptr + bid * numel
    offs = pid * (BLOCK * ITERS) + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(ITERS):
        x = _load(base + offs, offs < numel, UPCAST).to(tl.float32)
        acc += x * x
        offs += BLOCK
    tl.store(partial_ptr + bid * n_part + pid, tl.sum(acc, axis=0))


@triton.jit
def _gram_kernel(
    X_ptr, A_ptr, partial_ptr, P, Q, n_part, norm_scale, eps,
    stride_xb, stride_xr, stride_xc,
    NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # A[b] = X[b] X[b]ᵀ (scaled by s² when NORMALIZE); A contiguous (B, P, P)
    ti, tj = _upper_tile(tl.program_id(0))
    bid = tl.program_id(1).to(tl.int64)
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past P are wrapped instead of masked: they only feed output rows that are never stored
    x_base = X_ptr + bid * stride_xb
    xi_ptrs = x_base + (offs_i % P)[:, None] * stride_xr + offs_k[None, :] * stride_xc
    xj_ptrs = x_base + (offs_j % P)[:, None] * stride_xr + offs_k[None, :] * stride_xc
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    if NORMALIZE:
        s = _inv_norm(partial_ptr, bid, n_part, norm_scale, eps, 128)
    for k in range(0, Q, BLOCK_K):
        k_mask = offs_k[None, :] < Q - k
        xi = _load(xi_ptrs, k_mask, UPCAST)
        xj = _load(xj_ptrs, k_mask, UPCAST)
        if NORMALIZE:  # scale in fp32 before the cast to the dot dtype (fp16 G of 1e-7 is subnormal)
            xi = xi.to(tl.float32) * s
            xj = xj.to(tl.float32) * s
        acc = _mma(xi, tl.trans(xj), acc, A_ptr.dtype.element_ty, UPCAST, PRECISION)
        xi_ptrs += BLOCK_K * stride_xc
        xj_ptrs += BLOCK_K * stride_xc
    out = _cast_out(acc, A_ptr.dtype.element_ty, UPCAST)
    a_base = A_ptr + bid * P * P
    mask = (offs_i[:, None] < P) & (offs_j[None, :] < P)
    tl.store(a_base + offs_i[:, None] * P + offs_j[None, :], out, mask=mask)
    if ti != tj:
        tl.store(a_base + offs_j[:, None] * P + offs_i[None, :], tl.trans(out), mask=tl.trans(mask))


@triton.jit
def _sym_poly_kernel(
    A_ptr, B_ptr, P, coef_b, coef_c,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # B[b] = coef_b·A[b] + coef_c·A[b]·A[b] for symmetric A; A and B contiguous (B, P, P)
    ti, tj = _upper_tile(tl.program_id(0))
    bid = tl.program_id(1).to(tl.int64)
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A_ptr + bid * P * P
    l_ptrs = a_base + (offs_i % P)[:, None] * P + offs_k[None, :]
    r_ptrs = a_base + offs_k[:, None] * P + (offs_j % P)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k in range(0, P, BLOCK_K):
        left = _load(l_ptrs, offs_k[None, :] < P - k, UPCAST)
        right = _load(r_ptrs, offs_k[:, None] < P - k, UPCAST)
        acc = _mma(left, right, acc, A_ptr.dtype.element_ty, UPCAST, PRECISION)
        l_ptrs += BLOCK_K
        r_ptrs += BLOCK_K * P
    mask = (offs_i[:, None] < P) & (offs_j[None, :] < P)
    a_ij = _load(a_base + offs_i[:, None] * P + offs_j[None, :], mask, UPCAST).to(tl.float32)
    out = _cast_out(coef_c * acc + coef_b * a_ij, B_ptr.dtype.element_ty, UPCAST)
    b_base = B_ptr + bid * P * P
    tl.store(b_base + offs_i[:, None] * P + offs_j[None, :], out, mask=mask)
    if ti != tj:
        tl.store(b_base + offs_j[:, None] * P + offs_i[None, :], tl.trans(out), mask=tl.trans(mask))


@triton.jit
def _ns_update_kernel(
    B_ptr, X_ptr, Y_ptr, partial_ptr, P, Q, n_part, norm_scale, eps, coef_a,
    stride_xb, stride_xr, stride_xc, stride_yb, stride_yr, stride_yc,
    NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Y[b] = coef_a·X[b] + B[b]·X[b] (times s when NORMALIZE); B contiguous (B, P, P); X, Y: (B, P, Q)
    # by strides
    tiles_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % tiles_m  # consecutive programs share one column block of X
    pid_n = pid // tiles_m
    bid = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b_base = B_ptr + bid * P * P
    x_base = X_ptr + bid * stride_xb
    b_ptrs = b_base + (offs_m % P)[:, None] * P + offs_k[None, :]
    x_ptrs = x_base + offs_k[:, None] * stride_xr + (offs_n % Q)[None, :] * stride_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = 1.0
    if NORMALIZE:
        s = _inv_norm(partial_ptr, bid, n_part, norm_scale, eps, 128)
    for k in range(0, P, BLOCK_K):
        bt = _load(b_ptrs, offs_k[None, :] < P - k, UPCAST)
        xt = _load(x_ptrs, offs_k[:, None] < P - k, UPCAST)
        if NORMALIZE:  # scale in fp32 before the cast to the dot dtype, as in _gram_kernel
            xt = xt.to(tl.float32) * s
        acc = _mma(bt, xt, acc, B_ptr.dtype.element_ty, UPCAST, PRECISION)
        b_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_xr
    mask = (offs_m[:, None] < P) & (offs_n[None, :] < Q)
    x_ij = _load(x_base + offs_m[:, None] * stride_xr + offs_n[None, :] * stride_xc, mask, UPCAST)
    out = acc + coef_a * (x_ij.to(tl.float32) * s)
    y_ptrs = Y_ptr + bid * stride_yb + offs_m[:, None] * stride_yr + offs_n[None, :] * stride_yc
    tl.store(y_ptrs, _cast_out(out, Y_ptr.dtype.element_ty, UPCAST), mask=mask)


# -- configurations --------------------------------------------------------------------------------

# Square tiles for the two symmetric kernels: (BLOCK_M, BLOCK_K, num_warps, num_stages).
# sm_90 (H100/H200, 227 KB shared memory): 128×128 tiles on two warpgroups (wgmma), 64-deep K steps,
# 3 stages = 96 KB; the 64×64 tile keeps many programs in flight for small Gram sides or batches.
# Other archs (the sm_80 fallback, 163 KB): 32-deep K steps so 4 stages still fit.
_SQUARE = {
    90: [(128, 64, 8, 3), (64, 64, 4, 4)],
    80: [(128, 32, 8, 3), (64, 32, 4, 4)],
}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the update matmul.
_RECT = {
    90: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
    80: [(128, 128, 32, 8, 3), (64, 64, 32, 4, 4)],
}
_SUMSQ = dict(BLOCK=1024, ITERS=16)  # 16 Ki elements per partial sum
_SUMSQ_WARPS = 4
# Interpreter: one fixed config (nothing to benchmark without a GPU). Its cost is per program, so
# large tiles; the tests pass 16-wide tiles explicitly to cover the multi-tile paths.
_INTERPRET_BLOCKS = (64, 64, 64)


def _interpreted() -> bool:
    # TRITON_INTERPRET=1 when this module was imported: @triton.jit gave interpreter wrappers
    return not isinstance(_gram_kernel, triton.runtime.JITFunction)


def _arch_key(device: torch.device) -> int:
    # the sm_90 list needs up to 147 KB of shared memory: H100/H200 and B200 (major 9, 10) have 227 KB;
    # Ampere, Ada and consumer Blackwell (major 12, ~100 KB) get the lean list. A ROCm GPU reports a
    # capability too (MI300: 9.4), which says nothing about NVIDIA shared memory: refused, as is < sm_80.
    from limuon_kernels.triton import unsupported_gpu_reason

    reason = unsupported_gpu_reason(device)
    if reason is not None:
        raise RuntimeError(f"limuon: {reason}")
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major in (9, 10) else 80


def _autotune(kernel, arch: int, rect: bool, key: list[str]):
    """``kernel`` autotuned over the arch's tile list: ``_RECT`` (BLOCK_M, BLOCK_N, BLOCK_K) for the
    update-shaped matmuls when ``rect``, else ``_SQUARE`` (BLOCK_M, BLOCK_K) for the symmetric ones."""
    if rect:
        configs = [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in _RECT[arch]
        ]
    else:
        configs = [
            triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s) for bm, bk, w, s in _SQUARE[arch]
        ]
    return triton.autotune(configs, key=key)(kernel)


@functools.cache
def _tuned(kernel: str, arch: int):
    """The autotuned wrapper of one kernel for one arch family; built on first use (no driver
    queries at import)."""
    if kernel == "update":
        return _autotune(_ns_update_kernel, arch, True, ["P", "Q"])
    if kernel == "gram":
        return _autotune(_gram_kernel, arch, False, ["P", "Q"])
    return _autotune(_sym_poly_kernel, arch, False, ["P"])


def _target_configs() -> tuple[list[KernelConfig], list[KernelConfig]]:
    """(square, rect): every arch's ``_SQUARE`` and ``_RECT`` tiles as compile-check configs."""
    square = [
        KernelConfig(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s, archs=(arch,))
        for arch, cfgs in _SQUARE.items()
        for bm, bk, w, s in cfgs
    ]
    rect = [
        KernelConfig(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s, archs=(arch,))
        for arch, cfgs in _RECT.items()
        for bm, bn, bk, w, s in cfgs
    ]
    return square, rect
