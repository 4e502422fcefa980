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
compute dtype never sees G's own scale. The last iteration writes the result in G's dtype and layout, or,
in ``ns_update.newton_schulz_update_``, applies the parameter update instead (its own final kernel).

Matmul operands are in ``compute_dtype`` (the dtype of the A/B/X buffers), accumulation in fp32;
coefficients, eps and lr are runtime arguments (no recompiles when they change). Offsets within one
matrix are int32 (m·n < 2³¹), batch offsets int64. compute_dtype=float64 runs the reference.

Under the interpreter (``TRITON_INTERPRET=1``, CPU tensors) every loaded value is upcast to fp32
first, and the matmuls run in fp32 on operands rounded to compute_dtype as a GPU's cast would round
them: the interpreter holds bf16 as raw uint16, so bf16 arithmetic and ``tl.dot`` on bf16 would be
silently wrong there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from limuon_kernels import reference
from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget

# The kernels, their configurations and tile helpers live in _ns_kernels / _ns_tiles; every name is also
# importable from here, as before the split (gram_newton_schulz, ns_update and the tests use them).
from limuon_kernels.triton._ns_kernels import (  # noqa: F401
    _INTERPRET_BLOCKS,
    _RECT,
    _SQUARE,
    _SUMSQ,
    _SUMSQ_WARPS,
    _arch_key,
    _autotune,
    _gram_kernel,
    _interpreted,
    _ns_update_kernel,
    _sumsq_kernel,
    _sym_poly_kernel,
    _target_configs,
    _tuned,
)
from limuon_kernels.triton._ns_tiles import (  # noqa: F401
    _cast_out,
    _inv_norm,
    _load,
    _mma,
    _rne_bf16,
    _round_as,
    _upper_tile,
)

# -- launch helpers (shared with gram_newton_schulz.py) --------------------------------------------


def _triangle_grid(P: int, batch: int):
    def grid(meta):
        t = triton.cdiv(P, meta["BLOCK_M"])
        return (t * (t + 1) // 2, batch)

    return grid


def _batched(G: Tensor) -> Tensor:
    """``G: (..., m, n)`` as a contiguous ``(B, m, n)`` (a view when it already is one); B ≤ 65535."""
    m, n = G.shape[-2], G.shape[-1]
    G3 = G.reshape(-1, m, n)
    if not G3.is_contiguous():
        G3 = G3.contiguous()
    torch._check(G3.shape[0] <= 65535, lambda: f"at most 65535 matrices per launch (grid axis 1), got {G3.shape[0]}")
    return G3


def _sum_squares(G3: Tensor, interpret: bool) -> Tensor:
    """``partial: (B, n_part)`` fp32, ``partial[b, k] = Σ G3[b]²`` over the k-th fixed chunk of
    ``_SUMSQ["BLOCK"]·_SUMSQ["ITERS"]`` elements of matrix b (deterministic: no atomics)."""
    batch, numel = G3.shape[0], G3.shape[1] * G3.shape[2]
    n_part = triton.cdiv(numel, _SUMSQ["BLOCK"] * _SUMSQ["ITERS"])
    partial = torch.empty((batch, n_part), dtype=torch.float32, device=G3.device)
    _sumsq_kernel[(n_part, batch)](G3, partial, numel, n_part, UPCAST=interpret, **_SUMSQ, num_warps=_SUMSQ_WARPS)
    return partial


# -- launchers -------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """One call's kernels (autotuned wrappers, or the plain kernels with fixed tiles in the metas)."""

    gram: Callable
    poly: Callable
    update: Callable
    sq_meta: dict  # tiles of the two symmetric kernels ({} when autotuned)
    rect_meta: dict  # tiles of the update matmul ({} when autotuned)
    flags: dict  # UPCAST, PRECISION
    interpret: bool


def _check_args(G: Tensor, coefficients: Sequence[float]) -> list[float]:
    coefficients = [float(x) for x in coefficients]
    torch._check(
        len(coefficients) >= 3 and len(coefficients) % 3 == 0,
        lambda: f"coefficients must be a flat list [a1, b1, c1, a2, ...] of 3·steps floats, got {len(coefficients)}",
    )
    torch._check(G.dim() >= 2, lambda: f"G must have shape (..., m, n), got {tuple(G.shape)}")
    m, n = G.shape[-2], G.shape[-1]
    torch._check(m * n < 2**31, lambda: f"G's matrices must have fewer than 2^31 elements, got {m}×{n}")
    return coefficients


def _plan(device: torch.device, dtype: torch.dtype, blocks: tuple[int, int, int] | None) -> _Plan:
    """The kernels and flags for matmuls in ``dtype`` on ``device``: autotuned per arch on a GPU, fixed
    ``blocks`` when given (``_INTERPRET_BLOCKS`` under the interpreter)."""
    interpret = _interpreted()
    torch._check(
        interpret or device.type == "cuda",
        lambda: f"the Triton Newton–Schulz kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}",
    )
    if blocks is None and interpret:
        blocks = _INTERPRET_BLOCKS
    precision = "ieee" if (dtype == torch.float32 or interpret) else "tf32"
    flags = dict(UPCAST=interpret, PRECISION=precision)
    if blocks is None:
        arch = _arch_key(device)
        return _Plan(_tuned("gram", arch), _tuned("poly", arch), _tuned("update", arch), {}, {}, flags, interpret)
    bm, bn, bk = blocks
    sq_meta, rect_meta = dict(BLOCK_M=bm, BLOCK_K=bk), dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return _Plan(_gram_kernel, _sym_poly_kernel, _ns_update_kernel, sq_meta, rect_meta, flags, interpret)


def _iterate(plan: _Plan, src: Tensor, Y_last: Tensor | None, partial: Tensor, coefficients: list[float],
             dtype: torch.dtype, eps: float, norm_scale: float, final: Callable[..., None] | None) -> None:  # fmt: skip
    """Every iteration on ``src: (B, P, Q)`` (by strides); the last one writes ``Y_last`` (same shape),
    or calls ``final`` in place of its update matmul (see ``_run_ns``)."""
    batch, P, Q = src.shape
    n_part = partial.shape[1]
    A = torch.empty((batch, P, P), dtype=dtype, device=src.device)
    Bm = torch.empty_like(A)
    steps = len(coefficients) // 3
    bufs = [torch.empty((batch, P, Q), dtype=dtype, device=src.device) for _ in range(min(steps - 1, 2))]
    tri_grid = _triangle_grid(P, batch)

    def rect_grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(Q, meta["BLOCK_N"]), batch)

    for it in range(steps):
        a, b, c = coefficients[3 * it : 3 * it + 3]
        last = it == steps - 1
        first = it == 0
        plan.gram[tri_grid](
            src, A, partial, P, Q, n_part, norm_scale, eps, *src.stride(),
            NORMALIZE=first, **plan.flags, **plan.sq_meta,
        )  # fmt: skip
        plan.poly[tri_grid](A, Bm, P, b, c, **plan.flags, **plan.sq_meta)
        if last and final is not None:
            final(Bm, src, a, first, plan.flags, partial)
            return
        dst = Y_last if last else bufs[it % 2]
        plan.update[rect_grid](
            Bm, src, dst, partial, P, Q, n_part, norm_scale, eps, a, *src.stride(), *dst.stride(),
            NORMALIZE=first, **plan.flags, **plan.rect_meta,
        )  # fmt: skip
        src = dst


def _run_ns(
    G: Tensor,
    coefficients: Sequence[float],
    eps: float,
    norm_scale: float,
    compute_dtype: torch.dtype | None,
    blocks: tuple[int, int, int] | None = None,
    partial: Tensor | None = None,
    final: Callable[..., None] | None = None,
) -> Tensor | None:
    """Shared body of ``newton_schulz`` and ``ns_update.newton_schulz_update_``.

    ``blocks=(BLOCK_M, BLOCK_N, BLOCK_K)`` fixes the tiles of all three matmul kernels instead of
    autotuning (tests; the interpreter default). ``partial: (B, n_part)`` fp32 given: the per-matrix
    sums of squares of G (no sum-of-squares pass). ``final`` given: the last iteration's update
    matmul is replaced by ``final(Bm, src, coef_a, normalize, flags, partial)`` (Bm the last B,
    src the last X) and nothing is returned; else the result in G's shape and dtype is returned.
    """
    coefficients = _check_args(G, coefficients)
    dtype = compute_dtype or G.dtype
    if dtype == torch.float64:
        # tl.dot has no fast fp64 path worth shipping; fp64 is a verification setting, not a GPU one
        torch._check(final is None, lambda: "fp64 compute: the caller runs the reference")
        return reference.newton_schulz(G, coefficients, eps, norm_scale, dtype)
    if G.numel() == 0:
        return torch.empty_like(G, memory_format=torch.contiguous_format)
    G3 = _batched(G)
    m, n = G.shape[-2], G.shape[-1]
    transposed = m > n  # then X = Gᵀ by strides: A = X Xᵀ is min(m, n)²
    out = torch.empty((G3.shape[0], m, n), dtype=G.dtype, device=G.device) if final is None else None
    plan = _plan(G.device, dtype, blocks)
    if partial is None:  # per-matrix Σ G², in fixed chunks (deterministic)
        partial = _sum_squares(G3, plan.interpret)
    Y_last = None if out is None else (out.mT if transposed else out)
    _iterate(plan, G3.mT if transposed else G3, Y_last, partial, coefficients, dtype, eps, norm_scale, final)
    return None if out is None else out.view(G.shape)


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


# -- ahead-of-time compile targets (python -m limuon_kernels.compile_check) ------------------------


def _compile_targets() -> list[KernelTarget]:
    square, rect = _target_configs()
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

    def update(name, x_dtype, y_dtype, x_strides, y_strides, normalize):
        sig = dict(
            B_ptr="*bf16", X_ptr=f"*{x_dtype}", Y_ptr=f"*{y_dtype}", partial_ptr="*fp32", **scalars,
            coef_a="fp32", **x_strides, **y_strides,
        )  # fmt: skip
        return KernelTarget(name, _ns_update_kernel, sig, rect, dict(NORMALIZE=normalize, **gpu), div16)

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
        update("update", "bf16", "bf16", x_rows, y_rows, False),
        update("update[first]", "bf16", "bf16", x_rows, y_rows, True),
        update("update[first,fp32 G,transposed]", "fp32", "bf16", x_cols, y_rows, True),
        update("update[last,transposed]", "bf16", "bf16", x_rows, y_cols, False),
    ]


COMPILE_TARGETS = _compile_targets()
