"""Tile helpers shared by the Newton–Schulz kernels (``newton_schulz``, ``gram_newton_schulz``, ``ns_update``).

All are ``@triton.jit`` device functions, inlined into the kernels that call them:
    _load        masked load (0 past the mask), upcast to fp32 under the interpreter
    _rne_bf16    fp32 → the nearest bf16 (ties to even), held in fp32
    _cast_out    the cast of an fp32 accumulator to the output dtype, as a GPU rounds it
    _round_as    the value an fp32 x takes in a narrower dtype, held in fp32 (the interpreter's "cast")
    _mma         acc + a·b with the operands in the dot dtype (rounded as a GPU would under the interpreter)
    _upper_tile  program id → tile pair (i, j), i ≤ j, of a symmetric p×p result
    _inv_norm    s = 1/max(norm_scale·‖G‖_F, eps) from the per-matrix partial sums of squares

Why the interpreter paths exist: it holds bf16 as raw uint16 and converts fp32 → bf16 by truncation, so
without them bf16 arithmetic would be silently wrong and the tests would not see a GPU's rounding errors.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
