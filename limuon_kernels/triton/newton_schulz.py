"""Batched Newton–Schulz orthogonalisation in Triton: every matrix of ``G: (..., m, n)`` in one launch
per GEMM stage.

Per iteration ``(a, b, c)``, on ``X: (B, p, q)`` with ``p = min(m, n)`` (``X = Gᵀ`` when m > n, by
strides, never copied):
    _gram_kernel       A = X Xᵀ                 upper-triangle tiles only, each also stored mirrored
    _sym_poly_kernel   B = b·A + c·A·A          A·A is symmetric too: upper-triangle tiles + mirror,
                                                b·A in the epilogue
    _ns_update_kernel  X ← a·X + B·X            matmul with the axpy epilogue
Frobenius normalisation: ``_sumsq_kernel`` writes per-matrix partial sums of squares of G (a small,
deterministic reduction over fixed chunks; no atomics). The first ``_gram_kernel`` and the first
``_ns_update_kernel`` reduce those partials to the per-matrix scale ``s = 1/max(norm_scale·‖G‖_F, eps)``
themselves and multiply every tile of G they load by it in fp32, before the cast to the dot dtype
(``A = (sG)(sG)ᵀ``, ``X₁ = a·sG + B·sG``), so no normalised copy of X is ever written and an fp16
compute dtype never sees G's own scale. The last iteration writes the result in G's dtype and layout, or, in
``newton_schulz_apply_``, applies the parameter update ``W ← W(1 − lr·wd) − lr·scale·X`` instead.

Matmul operands are in ``compute_dtype`` (the dtype of the A/B/X buffers), accumulation in fp32;
coefficients, eps and lr are runtime arguments (no recompiles when they change). Offsets within one
matrix are int32 (m·n < 2³¹), batch offsets int64. compute_dtype=float64 runs the reference.

Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) every loaded value is upcast to fp32
first, and the matmuls run in fp32 on operands rounded to compute_dtype as a GPU's cast would round
them: the interpreter holds bf16 as raw uint16, so bf16 arithmetic and ``tl.dot`` on bf16 would be
silently wrong there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from limuon_kernels import reference
from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget

# -- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # interpreter: bf16 is held as raw uint16, upcast before any arithmetic
        x = x.to(tl.float32)
    return x


@triton.jit
def _rne_bf16(x):
    # fp32 x rounded to the nearest bf16 (ties to even), still as fp32
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast_out(x, dst_ty: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST and dst_ty == tl.bfloat16:
        # the interpreter converts fp32 → bf16 by truncation (biased, twice the rounding error of a
        # GPU); round to nearest even here so that the tests see the errors a GPU makes
        x = _rne_bf16(x)
    return x.to(dst_ty)


@triton.jit
def _round_as(x, dst_ty: tl.constexpr):
    # the value x takes in dst_ty, held in fp32: what the interpreter uses in place of a cast
    if dst_ty == tl.bfloat16:
        return _rne_bf16(x)
    elif dst_ty == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _mma(a, b, acc, DOT_TY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        # fp32 operands rounded as a GPU would cast them: tests then see the same rounding errors
        a = _round_as(a, DOT_TY)
        b = _round_as(b, DOT_TY)
    else:
        a = a.to(DOT_TY)
        b = b.to(DOT_TY)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _upper_tile(pid):
    # pid enumerates the tile pairs (i, j), i <= j, column by column: pid = j(j+1)/2 + i. The fp32
    # square root is exact enough for any realistic tile count; the two fix-ups make it exact.
    j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    return pid - j * (j + 1) // 2, j


@triton.jit
def _inv_norm(partial_ptr, bid, n_part, norm_scale, eps, BLOCK_P: tl.constexpr):
    # 1 / max(norm_scale·‖G‖_F, eps) from the partial sums of squares written by _sumsq_kernel
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    base = partial_ptr + bid * n_part
    for start in range(0, n_part, BLOCK_P):
        acc += tl.load(base + start + offs, mask=start + offs < n_part, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0)) * norm_scale
    return tl.div_rn(1.0, tl.maximum(norm, eps))


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
    B_ptr, X_ptr, Y_ptr, partial_ptr, P, Q, n_part, norm_scale, eps, coef_a, lr, weight_decay, update_scale,
    stride_xb, stride_xr, stride_xc, stride_yb, stride_yr, stride_yc,
    NORMALIZE: tl.constexpr, APPLY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Y[b] = coef_a·X[b] + B[b]·X[b] (times s when NORMALIZE); with APPLY, Y holds the parameter W and
    # becomes W·(1 − lr·wd) − lr·update_scale·(that). B contiguous (B, P, P); X, Y: (B, P, Q) by strides.
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
    if APPLY:
        w = _load(y_ptrs, mask, UPCAST).to(tl.float32)
        out = w * (1.0 - lr * weight_decay) - (lr * update_scale) * out
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


@functools.cache
def _tuned(kernel: str, arch: int, restore_y: bool = False):
    """The autotuned wrapper of one kernel for one arch family; built on first use (no driver
    queries at import)."""
    if kernel == "update":
        configs = [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in _RECT[arch]
        ]
        # APPLY writes W in place: the benchmark runs must not apply the update more than once
        return triton.autotune(configs, key=["P", "Q"], restore_value=["Y_ptr"] if restore_y else None)(
            _ns_update_kernel
        )
    configs = [
        triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s) for bm, bk, w, s in _SQUARE[arch]
    ]
    if kernel == "gram":
        return triton.autotune(configs, key=["P", "Q"])(_gram_kernel)
    return triton.autotune(configs, key=["P"])(_sym_poly_kernel)


# -- launchers -------------------------------------------------------------------------------------


def _triangle_grid(P: int, batch: int):
    def grid(meta):
        t = triton.cdiv(P, meta["BLOCK_M"])
        return (t * (t + 1) // 2, batch)

    return grid


def _run_ns(
    G: Tensor,
    coefficients: Sequence[float],
    eps: float,
    norm_scale: float,
    compute_dtype: torch.dtype | None,
    W: Tensor | None = None,
    lr: float = 0.0,
    weight_decay: float = 0.0,
    update_scale: float = 0.0,
    blocks: tuple[int, int, int] | None = None,
) -> Tensor:
    """Shared body of both launchers. ``W`` given: the last iteration updates W in place (must be a
    contiguous tensor of G's shape) and W is returned. ``blocks=(BLOCK_M, BLOCK_N, BLOCK_K)`` fixes
    the tiles of all three matmul kernels instead of autotuning (tests; the interpreter default)."""
    coefficients = [float(x) for x in coefficients]
    torch._check(
        len(coefficients) >= 3 and len(coefficients) % 3 == 0,
        lambda: f"coefficients must be a flat list [a1, b1, c1, a2, ...] of 3·steps floats, got {len(coefficients)}",
    )
    torch._check(G.dim() >= 2, lambda: f"G must have shape (..., m, n), got {tuple(G.shape)}")
    m, n = G.shape[-2], G.shape[-1]
    torch._check(m * n < 2**31, lambda: f"G's matrices must have fewer than 2^31 elements, got {m}×{n}")
    dtype = compute_dtype or G.dtype
    if W is not None:
        torch._check(W.shape == G.shape, lambda: f"W must have G's shape {tuple(G.shape)}, got {tuple(W.shape)}")
        torch._check(W.is_contiguous(), lambda: "W must be contiguous (it is updated in place)")
        torch._check(W.device == G.device, lambda: f"W must be on G's device {G.device}, got {W.device}")
        torch._check(
            W.untyped_storage().data_ptr() != G.untyped_storage().data_ptr(), lambda: "W must not share memory with G"
        )
    if dtype == torch.float64:
        # tl.dot has no fast fp64 path worth shipping; fp64 is a verification setting, not a GPU one
        X = reference.newton_schulz(G, coefficients, eps, norm_scale, dtype)
        if W is None:
            return X
        W.mul_(1.0 - lr * weight_decay).add_(X.to(W.dtype), alpha=-lr * update_scale)
        return W
    if G.numel() == 0:
        return torch.empty_like(G, memory_format=torch.contiguous_format) if W is None else W

    G3 = G.reshape(-1, m, n)
    if not G3.is_contiguous():
        G3 = G3.contiguous()
    batch = G3.shape[0]
    torch._check(batch <= 65535, lambda: f"at most 65535 matrices per launch (grid axis 1), got {batch}")
    transposed = m > n
    P, Q = (n, m) if transposed else (m, n)
    X0 = G3.mT if transposed else G3
    out = torch.empty((batch, m, n), dtype=G.dtype, device=G.device) if W is None else W.view(batch, m, n)
    Y_last = out.mT if transposed else out

    interpret = _interpreted()
    torch._check(
        interpret or G.device.type == "cuda",
        lambda: f"the Triton Newton–Schulz kernels need CUDA tensors (or TRITON_INTERPRET=1), got {G.device}",
    )
    if blocks is None and interpret:
        blocks = _INTERPRET_BLOCKS
    precision = "ieee" if (dtype == torch.float32 or interpret) else "tf32"
    flags = dict(UPCAST=interpret, PRECISION=precision)
    if blocks is None:
        arch = _arch_key(G.device)
        gram, poly = _tuned("gram", arch), _tuned("poly", arch)
        update, update_last = _tuned("update", arch), _tuned("update", arch, restore_y=W is not None)
        sq_meta, rect_meta = {}, {}
    else:
        gram, poly, update, update_last = _gram_kernel, _sym_poly_kernel, _ns_update_kernel, _ns_update_kernel
        bm, bn, bk = blocks
        sq_meta, rect_meta = dict(BLOCK_M=bm, BLOCK_K=bk), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)

    # per-matrix Σ G², in fixed chunks (deterministic)
    numel = m * n
    chunk = _SUMSQ["BLOCK"] * _SUMSQ["ITERS"]
    n_part = triton.cdiv(numel, chunk)
    partial = torch.empty((batch, n_part), dtype=torch.float32, device=G.device)
    _sumsq_kernel[(n_part, batch)](G3, partial, numel, n_part, UPCAST=interpret, **_SUMSQ, num_warps=_SUMSQ_WARPS)

    A = torch.empty((batch, P, P), dtype=dtype, device=G.device)
    Bm = torch.empty_like(A)
    steps = len(coefficients) // 3
    bufs = [torch.empty((batch, P, Q), dtype=dtype, device=G.device) for _ in range(min(steps - 1, 2))]
    tri_grid = _triangle_grid(P, batch)

    def rect_grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]), batch)

    src = X0
    for it in range(steps):
        a, b, c = coefficients[3 * it : 3 * it + 3]
        last = it == steps - 1
        first = it == 0
        dst = Y_last if last else bufs[it % 2]
        gram[tri_grid](
            src, A, partial, P, Q, n_part, norm_scale, eps, *src.stride(),
            NORMALIZE=first, **flags, **sq_meta,
        )  # fmt: skip
        poly[tri_grid](A, Bm, P, b, c, **flags, **sq_meta)
        kernel = update_last if last else update
        kernel[rect_grid](
            Bm, src, dst, partial, P, Q, n_part, norm_scale, eps, a, lr, weight_decay, update_scale,
            *src.stride(), *dst.stride(),
            NORMALIZE=first, APPLY=last and W is not None, **flags, **rect_meta,
        )  # fmt: skip
        src = dst
    return out.view(G.shape) if W is None else W


def newton_schulz(
    G: Tensor,
    coefficients: Sequence[float],
    eps: float,
    norm_scale: float,
    compute_dtype: torch.dtype | None,
) -> Tensor:
    """``limuon::newton_schulz`` on CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``).

    Same contract as ``reference.newton_schulz``: ``coefficients`` is the flat list
    ``[a1, b1, c1, a2, ...]``; X ← G/max(norm_scale·‖G‖_F, eps) per matrix; per triple A = X Xᵀ,
    B = b·A + c·A·A, X ← a·X + B·X on the side that makes A min(m, n)²; matmuls in
    ``compute_dtype`` (None: G's dtype) with fp32 accumulation. All matrices of the batch share
    each launch. Returns a contiguous tensor of G's shape and dtype.
    """
    return _run_ns(G, coefficients, eps, norm_scale, compute_dtype)


def newton_schulz_apply_(
    G: Tensor,
    W: Tensor,
    coefficients: Sequence[float],
    eps: float,
    norm_scale: float,
    compute_dtype: torch.dtype | None,
    lr: float,
    weight_decay: float,
    scale: float,
) -> Tensor:
    """``W ← W·(1 − lr·weight_decay) − lr·scale·NS(G)`` in place, the last NS iteration's epilogue
    writing W directly (the orthogonalised update is never stored). ``W``: contiguous, G's shape,
    any float dtype (the update is computed in fp32). Returns W.
    """
    return _run_ns(G, coefficients, eps, norm_scale, compute_dtype, W, float(lr), float(weight_decay), float(scale))


# -- ahead-of-time compile targets (python -m limuon_kernels.compile_check) ------------------------


def _compile_targets() -> list[KernelTarget]:
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
    gpu = dict(UPCAST=False, PRECISION="tf32")  # bf16 operands on the GPU
    # model shapes are multiples of 16, and the JIT specialises such sizes and strides as divisible:
    # that is what lets the loads vectorise and the K loop pipeline (cp.async/TMA need >= 4 bytes)
    div16 = ("P", "Q", "stride_xb", "stride_xr", "stride_xc", "stride_yb", "stride_yr", "stride_yc")
    scalars = dict(P="i32", Q="i32", n_part="i32", norm_scale="fp32", eps="fp32")
    # X row-major (stride_xc == 1), or G read transposed (stride_xr == 1) when m > n
    x_rows = dict(stride_xb="i32", stride_xr="i32", stride_xc=1)
    x_cols = dict(stride_xb="i32", stride_xr=1, stride_xc="i32")
    y_rows = dict(stride_yb="i32", stride_yr="i32", stride_yc=1)
    y_cols = dict(stride_yb="i32", stride_yr=1, stride_yc="i32")

    def gram(name, x_dtype, strides, normalize):
        sig = dict(X_ptr=f"*{x_dtype}", A_ptr="*bf16", partial_ptr="*fp32", **scalars, **strides)
        return KernelTarget(name, _gram_kernel, sig, square, dict(NORMALIZE=normalize, **gpu), div16)

    def update(name, x_dtype, y_dtype, x_strides, y_strides, normalize, apply):
        sig = dict(
            B_ptr="*bf16", X_ptr=f"*{x_dtype}", Y_ptr=f"*{y_dtype}", partial_ptr="*fp32", **scalars,
            coef_a="fp32", lr="fp32", weight_decay="fp32", update_scale="fp32", **x_strides, **y_strides,
        )  # fmt: skip
        return KernelTarget(name, _ns_update_kernel, sig, rect, dict(NORMALIZE=normalize, APPLY=apply, **gpu), div16)

    return [
        KernelTarget(
            "sumsq",
            _sumsq_kernel,
            dict(X_ptr="*bf16", partial_ptr="*fp32", numel="i32", n_part="i32"),
            [KernelConfig(dict(_SUMSQ), num_warps=_SUMSQ_WARPS, num_stages=1)],
            dict(UPCAST=False),
        ),
        gram("gram", "bf16", x_rows, False),
        gram("gram[first]", "bf16", x_rows, True),
        gram("gram[first,fp32 G,transposed]", "fp32", x_cols, True),
        KernelTarget(
            "sym_poly",
            _sym_poly_kernel,
            dict(A_ptr="*bf16", B_ptr="*bf16", P="i32", coef_b="fp32", coef_c="fp32"),
            square,
            gpu,
            div16,
        ),
        update("update", "bf16", "bf16", x_rows, y_rows, False, False),
        update("update[first]", "bf16", "bf16", x_rows, y_rows, True, False),
        update("update[first,fp32 G,transposed]", "fp32", "bf16", x_cols, y_rows, True, False),
        update("update[last,transposed]", "bf16", "bf16", x_rows, y_cols, False, False),
        update("update[last,apply fp32 W]", "bf16", "fp32", x_rows, y_rows, False, True),
    ]


COMPILE_TARGETS = _compile_targets()
