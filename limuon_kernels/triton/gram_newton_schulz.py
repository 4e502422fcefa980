"""Gram Newton–Schulz in Triton: the iteration of ``reference.gram_newton_schulz`` on ``p×p`` matrices.

For ``X: (B, p, q)``, p = min(m, n) (``X = Gᵀ`` by strides when m > n), per matrix of the batch:
    _xxt_kernel      R = (sG)(sG)ᵀ                 s = 1/max(norm_scale·‖G‖_F, eps), applied to each
                                                   loaded tile in fp32 before the cast to compute_dtype
    per iteration (a, b, c), with _sym_mm_kernel (C = c·A·B + b·A + a·I; every matrix here is a
    polynomial in R_0, so symmetric, and all but Q are computed on upper-triangle tiles, each stored
    mirrored; Q ← P·Q on every tile, see the launcher):
                     P = a·I + b·R + c·R·R;  Q ← P·Q (Q = P after the first);  R ← R·(P·P)
    _apply_q_kernel  X ← Q·X                       at a restart (then R ← X Xᵀ, Q ← I) and at the end,
                                                   where it writes the result in G's dtype and layout

R, P and Q are fp32 (the state dtype). Their products are ``tl.dot`` on fp32 operands: tf32 when
compute_dtype is bf16, full fp32 (``"ieee"``) for fp32 and fp16; R = X Xᵀ and Q·X take their
operands in compute_dtype (Q rounded to it) with fp32 accumulation. compute_dtype=float64 runs the
reference. Under the interpreter every operand is rounded as a GPU's cast (or tf32 conversion)
would round it, so the tests see the GPU's rounding errors (see ``newton_schulz.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from limuon_kernels import reference
from limuon_kernels.triton._compile_targets import KernelTarget
from limuon_kernels.triton._ns_kernels import _arch_key, _autotune, _interpreted, _target_configs
from limuon_kernels.triton._ns_tiles import _cast_out, _inv_norm, _load, _mma, _upper_tile
from limuon_kernels.triton.newton_schulz import _batched, _sum_squares, _triangle_grid

# -- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _round_tf32(x):
    # fp32 x rounded to tf32's 10 mantissa bits, to nearest with ties away (PTX cvt.rna.tf32.f32)
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mma_state(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # product of two fp32 state tiles; the interpreter ignores input_precision, so round for it
    if UPCAST and PRECISION == "tf32":
        return tl.dot(_round_tf32(a), _round_tf32(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _xxt_kernel(
    X_ptr, R_ptr, partial_ptr, p, q, n_part, norm_scale, eps,
    stride_xb, stride_xr, stride_xc,
    NORMALIZE: tl.constexpr, DOT_TY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # R[b] = X[b] X[b]ᵀ (X scaled by s first when NORMALIZE), operands in DOT_TY; R contiguous (B, p, p)
    ti, tj = _upper_tile(tl.program_id(0))
    bid = tl.program_id(1).to(tl.int64)
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past p are wrapped instead of masked: they only feed output rows that are never stored
    x_base = X_ptr + bid * stride_xb
    xi_ptrs = x_base + (offs_i % p)[:, None] * stride_xr + offs_k[None, :] * stride_xc
    xj_ptrs = x_base + (offs_j % p)[:, None] * stride_xr + offs_k[None, :] * stride_xc
    if NORMALIZE:
        s = _inv_norm(partial_ptr, bid, n_part, norm_scale, eps, 128)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k in range(0, q, BLOCK_K):
        k_mask = offs_k[None, :] < q - k
        xi = _load(xi_ptrs, k_mask, UPCAST)
        xj = _load(xj_ptrs, k_mask, UPCAST)
        if NORMALIZE:  # in fp32 before the cast: an fp16 compute dtype never sees G's own scale
            xi = xi.to(tl.float32) * s
            xj = xj.to(tl.float32) * s
        acc = _mma(xi, tl.trans(xj), acc, DOT_TY, UPCAST, PRECISION)
        xi_ptrs += BLOCK_K * stride_xc
        xj_ptrs += BLOCK_K * stride_xc
    r_base = R_ptr + bid * p * p
    mask = (offs_i[:, None] < p) & (offs_j[None, :] < p)
    tl.store(r_base + offs_i[:, None] * p + offs_j[None, :], acc, mask=mask)
    if ti != tj:
        tl.store(r_base + offs_j[:, None] * p + offs_i[None, :], tl.trans(acc), mask=tl.trans(mask))


@triton.jit
def _sym_mm_kernel(
    A_ptr, B_ptr, C_ptr, p, coef_a, coef_b, coef_c,
    MIRROR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # C[b] = coef_c·A[b]·B[b] + coef_b·A[b] + coef_a·I for commuting symmetric A, B; A, B, C contiguous
    # fp32 (B, p, p). MIRROR: upper-triangle tiles only, each also stored transposed (C symmetric);
    # else every tile (grid: tiles², row-major)
    if MIRROR:
        ti, tj = _upper_tile(tl.program_id(0))
    else:
        tiles = tl.cdiv(p, BLOCK_M)
        ti, tj = tl.program_id(0) // tiles, tl.program_id(0) % tiles
    bid = tl.program_id(1).to(tl.int64)
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A_ptr + bid * p * p
    l_ptrs = a_base + (offs_i % p)[:, None] * p + offs_k[None, :]
    r_ptrs = B_ptr + bid * p * p + offs_k[:, None] * p + (offs_j % p)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k in range(0, p, BLOCK_K):
        left = tl.load(l_ptrs, mask=offs_k[None, :] < p - k, other=0.0)
        right = tl.load(r_ptrs, mask=offs_k[:, None] < p - k, other=0.0)
        acc = _mma_state(left, right, acc, UPCAST, PRECISION)
        l_ptrs += BLOCK_K
        r_ptrs += BLOCK_K * p
    mask = (offs_i[:, None] < p) & (offs_j[None, :] < p)
    a_ij = tl.load(a_base + offs_i[:, None] * p + offs_j[None, :], mask=mask, other=0.0)
    out = coef_c * acc + coef_b * a_ij + tl.where(offs_i[:, None] == offs_j[None, :], coef_a, 0.0)
    c_base = C_ptr + bid * p * p
    tl.store(c_base + offs_i[:, None] * p + offs_j[None, :], out, mask=mask)
    if MIRROR and ti != tj:
        tl.store(c_base + offs_j[:, None] * p + offs_i[None, :], tl.trans(out), mask=tl.trans(mask))


@triton.jit
def _apply_q_kernel(
    Q_ptr, X_ptr, Y_ptr, partial_ptr, p, q, n_part, norm_scale, eps,
    stride_xb, stride_xr, stride_xc, stride_yb, stride_yr, stride_yc,
    NORMALIZE: tl.constexpr, DOT_TY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Y[b] = Q[b]·X[b] (X scaled by s first when NORMALIZE), operands in DOT_TY, stored in Y's dtype;
    # Q contiguous fp32 (B, p, p); X, Y: (B, p, q) by strides
    tiles_m = tl.cdiv(p, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % tiles_m  # consecutive programs share one column block of X
    pid_n = pid // tiles_m
    bid = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    q_ptrs = Q_ptr + bid * p * p + (offs_m % p)[:, None] * p + offs_k[None, :]
    x_ptrs = X_ptr + bid * stride_xb + offs_k[:, None] * stride_xr + (offs_n % q)[None, :] * stride_xc
    if NORMALIZE:
        s = _inv_norm(partial_ptr, bid, n_part, norm_scale, eps, 128)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, p, BLOCK_K):
        qt = tl.load(q_ptrs, mask=offs_k[None, :] < p - k, other=0.0)
        xt = _load(x_ptrs, offs_k[:, None] < p - k, UPCAST)
        if NORMALIZE:
            xt = xt.to(tl.float32) * s
        acc = _mma(qt, xt, acc, DOT_TY, UPCAST, PRECISION)
        q_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_xr
    mask = (offs_m[:, None] < p) & (offs_n[None, :] < q)
    y_ptrs = Y_ptr + bid * stride_yb + offs_m[:, None] * stride_yr + offs_n[None, :] * stride_yc
    tl.store(y_ptrs, _cast_out(acc, Y_ptr.dtype.element_ty, UPCAST), mask=mask)


# -- configurations (the standard kernels' tiles: same shapes of work) -------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.cache
def _tuned(kernel: str, arch: int):
    """The autotuned wrapper of one kernel for one arch family; built on first use (no driver
    queries at import)."""
    if kernel == "apply_q":
        return _autotune(_apply_q_kernel, arch, True, ["p", "q"])
    if kernel == "xxt":
        return _autotune(_xxt_kernel, arch, False, ["p", "q"])
    return _autotune(_sym_mm_kernel, arch, False, ["p"])


# -- launcher --------------------------------------------------------------------------------------


class _Launch:
    """One call's kernels (autotuned on a GPU, fixed tiles otherwise), grids, flags and the per-matrix
    partial sums of squares of G, with one method per kernel."""

    def __init__(self, G3: Tensor, p: int, q: int, dtype: torch.dtype, blocks: tuple[int, int, int] | None,
                 partial: Tensor | None = None):  # fmt: skip
        interpret = _interpreted()
        batch, device = G3.shape[0], G3.device
        if blocks is None and interpret:
            blocks = (32, 32, 32)  # several tiles already at test sizes: the mirrored stores get tested
        if blocks is None:
            arch = _arch_key(device)
            self.kernels = _tuned("xxt", arch), _tuned("sym", arch), _tuned("apply_q", arch)
            self.sq_meta, self.rect_meta = {}, {}
        else:
            self.kernels = _xxt_kernel, _sym_mm_kernel, _apply_q_kernel
            bm, bn, bk = blocks
            self.sq_meta, self.rect_meta = dict(BLOCK_M=bm, BLOCK_K=bk), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        self.tri_grid = _triangle_grid(p, batch)
        self.full_grid = lambda meta: (triton.cdiv(p, meta["BLOCK_M"]) ** 2, batch)
        self.rect_grid = lambda meta: (triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(q, meta["BLOCK_N"]), batch)
        self.p, self.q, self.batch, self.device, self.interpret = p, q, batch, device, interpret
        self.dtype = dtype
        self.dot = dict(DOT_TY=_TL_DTYPE[dtype], UPCAST=interpret,
                        PRECISION="ieee" if (dtype == torch.float32 or interpret) else "tf32")  # fmt: skip
        # tf32 state products where bf16's own rounding (2⁻⁹) dominates tf32's (2⁻¹¹); fp16 rounds like
        # tf32, and with tf32 state its Gram error was 10× the fp32-state one (the condition is squared)
        self.state_precision = "tf32" if dtype == torch.bfloat16 else "ieee"
        if partial is None:  # the per-matrix Σ G² (else given: (B, n_part) fp32)
            partial = _sum_squares(G3, interpret)
        self.partial, self.n_part = partial, partial.shape[1]

    def square(self) -> Tensor:
        return torch.empty((self.batch, self.p, self.p), dtype=torch.float32, device=self.device)

    def xxt(self, src: Tensor, R: Tensor, normalize: bool, norm_scale: float, eps: float) -> None:
        self.kernels[0][self.tri_grid](
            src, R, self.partial, self.p, self.q, self.n_part, norm_scale, eps, *src.stride(),
            NORMALIZE=normalize, **self.dot, **self.sq_meta,
        )  # fmt: skip

    def sym(self, A: Tensor, B: Tensor, C: Tensor, a: float, b: float, c: float, mirror: bool = True) -> None:
        self.kernels[1][self.tri_grid if mirror else self.full_grid](
            A, B, C, self.p, a, b, c,
            MIRROR=mirror, UPCAST=self.interpret, PRECISION=self.state_precision, **self.sq_meta,
        )  # fmt: skip

    def apply_q(self, Qm: Tensor, src: Tensor, dst: Tensor, normalize: bool, norm_scale: float, eps: float) -> None:
        self.kernels[2][self.rect_grid](
            Qm, src, dst, self.partial, self.p, self.q, self.n_part, norm_scale, eps, *src.stride(), *dst.stride(),
            NORMALIZE=normalize, **self.dot, **self.rect_meta,
        )  # fmt: skip


def _check_args(G: Tensor, coefficients: Sequence[float], restarts: Sequence[int]) -> tuple[list, list]:
    coefficients = [float(x) for x in coefficients]
    steps = len(coefficients) // 3
    torch._check(
        steps >= 1 and len(coefficients) % 3 == 0,
        lambda: f"coefficients must be a flat list [a1, b1, c1, a2, ...] of 3·steps floats, got {len(coefficients)}",
    )
    restarts = [int(r) for r in restarts]
    torch._check(
        all(0 < r < steps for r in restarts) and restarts == sorted(set(restarts)),
        lambda: f"restarts must be increasing iteration counts in [1, {steps - 1}], got {restarts}",
    )
    torch._check(G.dim() >= 2 and G.numel() > 0, lambda: f"G must be a non-empty (..., m, n) tensor, got {G.shape}")
    m, n = G.shape[-2], G.shape[-1]
    torch._check(m * n < 2**31, lambda: f"G's matrices must have fewer than 2^31 elements, got {m}×{n}")
    torch._check(
        _interpreted() or G.device.type == "cuda",
        lambda: f"the Triton Newton–Schulz kernels need CUDA tensors (or TRITON_INTERPRET=1), got {G.device}",
    )
    return coefficients, restarts


def gram_newton_schulz(
    G: Tensor,
    coefficients: Sequence[float],
    eps: float,
    norm_scale: float,
    compute_dtype: torch.dtype | None,
    restarts: Sequence[int],
    blocks: tuple[int, int, int] | None = None,
) -> Tensor:
    """``limuon::gram_newton_schulz`` on CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``).

    Same contract as ``reference.gram_newton_schulz``: ``coefficients`` is ``[a1, b1, c1, a2, ...]``;
    X = G/max(norm_scale·‖G‖_F, eps) per matrix; R = X Xᵀ, Q = I; per triple P = a·I + b·R + c·R²,
    Q ← P·Q, R ← R·P²; after the iteration counts in ``restarts`` X ← Q·X, R ← X Xᵀ, Q ← I; the
    result Q·X in G's shape and dtype (contiguous). ``blocks=(BLOCK_M, BLOCK_N, BLOCK_K)`` fixes
    the tiles instead of autotuning (tests; the interpreter default).
    """
    coefficients, restarts = _check_args(G, coefficients, restarts)
    dtype = compute_dtype or G.dtype
    if dtype == torch.float64:
        # tl.dot has no fast fp64 path worth shipping; fp64 is a verification setting, not a GPU one
        return reference.gram_newton_schulz(G, coefficients, eps, norm_scale, dtype, restarts)
    m, n = G.shape[-2], G.shape[-1]
    G3 = _batched(G)
    transposed = m > n
    p, q = (n, m) if transposed else (m, n)
    run = _Launch(G3, p, q, dtype, blocks)
    out = torch.empty((G3.shape[0], m, n), dtype=G.dtype, device=G.device)
    Qm, src, normalize = iterate(run, G3.mT if transposed else G3, coefficients, restarts, eps, norm_scale)
    run.apply_q(Qm, src, out.mT if transposed else out, normalize, norm_scale, eps)
    return out.view(G.shape)


def iterate(run: _Launch, src: Tensor, coefficients: list[float], restarts: list[int], eps: float,
            norm_scale: float) -> tuple[Tensor, Tensor, bool]:  # fmt: skip
    """Every iteration but the last product: returns ``(Q, X, normalize)`` with the result ``Q·X``
    (``X`` still to be scaled by s when ``normalize``: no restart happened)."""
    norm = (norm_scale, eps)
    steps = len(coefficients) // 3
    # fresh p×p buffers per product: the ones dropped are reused by the caching allocator
    normalized = False
    R = run.square()
    run.xxt(src, R, True, *norm)
    Qm = None  # the identity
    for it in range(steps):
        a, b, c = coefficients[3 * it : 3 * it + 3]
        P = run.square()
        run.sym(R, R, P, a, b, c)  # P = a·I + b·R + c·R²
        if Qm is None:
            Qm = P
        else:
            # Q ← P·Q on every tile: mirroring its upper triangle (P and Q commute only up to rounding)
            # made the error 2–5× larger, where mirroring R·P² (below) made it up to 2× smaller
            Qm, Q_old = run.square(), Qm
            run.sym(P, Q_old, Qm, 0.0, 0.0, 1.0, mirror=False)
        if it + 1 in restarts:
            X_new = torch.empty((run.batch, run.p, run.q), dtype=run.dtype, device=run.device)  # Q·X, never over X
            run.apply_q(Qm, src, X_new, not normalized, *norm)
            src, normalized, Qm = X_new, True, None
            run.xxt(src, R, False, *norm)
        elif it + 1 < steps:
            P2, R_new = run.square(), run.square()
            run.sym(P, P, P2, 0.0, 0.0, 1.0)  # P²
            run.sym(R, P2, R_new, 0.0, 0.0, 1.0)  # R ← R·P²
            R = R_new
    return Qm, src, not normalized


# -- ahead-of-time compile targets (python -m limuon_kernels.compile_check) ------------------------


def _compile_targets() -> list[KernelTarget]:
    square, rect = _target_configs()
    bf16 = dict(UPCAST=False, PRECISION="tf32", DOT_TY=tl.bfloat16)  # the GPU default: bf16 operands
    # model shapes are multiples of 16 (see newton_schulz.py): sizes and strides specialised as such
    div16 = ("p", "q", "stride_xb", "stride_xr", "stride_xc", "stride_yb", "stride_yr", "stride_yc")
    scalars = dict(p="i32", q="i32", n_part="i32", norm_scale="fp32", eps="fp32")
    x_rows = dict(stride_xb="i32", stride_xr="i32", stride_xc=1)
    x_cols = dict(stride_xb="i32", stride_xr=1, stride_xc="i32")  # G read transposed (m > n)
    y_rows = dict(stride_yb="i32", stride_yr="i32", stride_yc=1)
    y_cols = dict(stride_yb="i32", stride_yr=1, stride_yc="i32")

    def xxt(name, x_dtype, strides, normalize):
        sig = dict(X_ptr=f"*{x_dtype}", R_ptr="*fp32", partial_ptr="*fp32", **scalars, **strides)
        return KernelTarget(name, _xxt_kernel, sig, square, dict(NORMALIZE=normalize, **bf16), div16)

    def apply_q(name, x_dtype, y_dtype, x_strides, y_strides, normalize):
        sig = dict(Q_ptr="*fp32", X_ptr=f"*{x_dtype}", Y_ptr=f"*{y_dtype}", partial_ptr="*fp32", **scalars,
                   **x_strides, **y_strides)  # fmt: skip
        return KernelTarget(name, _apply_q_kernel, sig, rect, dict(NORMALIZE=normalize, **bf16), div16)

    def sym(name, precision, mirror):
        sig = dict(A_ptr="*fp32", B_ptr="*fp32", C_ptr="*fp32", p="i32", coef_a="fp32", coef_b="fp32", coef_c="fp32")
        flags = dict(MIRROR=mirror, UPCAST=False, PRECISION=precision)
        return KernelTarget(name, _sym_mm_kernel, sig, square, flags, ("p",))

    return [
        xxt("xxt[first]", "bf16", x_rows, True),
        xxt("xxt[first,fp32 G,transposed]", "fp32", x_cols, True),
        xxt("xxt[restart]", "bf16", x_rows, False),
        sym("sym_mm[tf32]", "tf32", True),
        sym("sym_mm[tf32,all tiles]", "tf32", False),
        sym("sym_mm[fp32/fp16 compute]", "ieee", True),
        sym("sym_mm[fp32/fp16 compute,all tiles]", "ieee", False),
        apply_q("apply_q[restart]", "bf16", "bf16", x_rows, y_rows, True),
        apply_q("apply_q[restart,fp32 G,transposed]", "fp32", "bf16", x_cols, y_rows, True),
        apply_q("apply_q[last]", "bf16", "bf16", x_rows, y_rows, False),
        apply_q("apply_q[last,fp32 out,transposed]", "bf16", "fp32", x_rows, y_cols, False),
    ]


COMPILE_TARGETS = _compile_targets()
