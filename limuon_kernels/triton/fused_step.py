"""Triton kernels of the fused optimizer-step ops (``limuon_kernels/fused_ops.py``; math and ground truth:
``reference_fused.py``), for CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``).

    momentum_ns_input_          _momentum_kernel: one pass, buf ← (α·buf + β·g) + δ·g_old, X = ρ·buf + σ·g,
                                X in x_dtype and one partial ‖X‖² per block (fixed blocks: deterministic)
    lowrank_momentum_ns_input   _lowrank_momentum_kernel: the same with buf = U diag(S) Vᵀ built per tile
    newton_schulz_update_       ``ns_update.py``
    rsvd_update_                _step_seed_kernel (seeds on the device) + ``rsvd.py``

``skip`` is read in the kernels (a one-byte device flag; a shared zero byte when None): nothing is stored
when it is set, and nothing is read back to the host. Coefficients are runtime floats (``split_scalar``:
exact for fp64 data), so a schedule that changes them does not recompile. α = 0 and "no g_old" are
constexpr flags, so buf (which may hold garbage on a first step) and g_old are then never loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from limuon_kernels.triton import rsvd as _rsvd
from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget
from limuon_kernels.triton._utils import (
    acc_dtype,
    cast_for_store,
    dtype_name,
    next_pow2_at_least_16,
    ptr,
    scalar_arg,
    split_scalar,
)
from limuon_kernels.triton.lowrank import MAX_BLOCK_R, _lowrank_product
from limuon_kernels.triton.ns_update import newton_schulz_update_, skip_flag
from limuon_kernels.triton.storm import _matrix_block

__all__ = ["lowrank_momentum_ns_input", "momentum_ns_input_", "newton_schulz_update_", "rsvd_update_"]

# One fixed config per kernel (no autotuning): the per-matrix norms are then summed in the same order
# every run. The dense one is the storm kernels' memory-bound shape, the low-rank one lowrank.py's.
_DENSE = {"BLOCK_SIZE": 2048, "num_warps": 8, "num_stages": 1}
# fp64 data: half the block (ptxas spilled 16 B of the 2048-element fp64 block without prev and g_old)
_DENSE_FP64 = {"BLOCK_SIZE": 1024, "num_warps": 8, "num_stages": 1}
_LOWRANK = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}
_LOWRANK_FP64 = {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}
_COEFS = [f"{c}_{part}" for c in ("alpha", "beta", "delta", "rho", "sigma") for part in ("hi", "mid", "lo")]


@triton.jit
def _momentum_epilogue(prev, g, g_old, a0, a1, a2, b0, b1, b2, d0, d1, d2, r0, r1, r2, s0, s1, s2,
                       HAS_PREV: tl.constexpr, HAS_OLD: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    # new = (α·prev + β·g) + δ·g_old and X = ρ·new + σ·g, in reference_fused._momentum's order
    new = scalar_arg(b0, b1, b2, ACC) * g
    if HAS_PREV:
        new = scalar_arg(a0, a1, a2, ACC) * prev + new
    if HAS_OLD:
        new = new + scalar_arg(d0, d1, d2, ACC) * g_old
    return new, scalar_arg(r0, r1, r2, ACC) * new + scalar_arg(s0, s1, s2, ACC) * g


@triton.jit
def _momentum_kernel(
    buf_ptr, g_ptr, g_old_ptr, x_ptr, partial_ptr, skip_ptr, mat_numel,
    alpha_hi, alpha_mid, alpha_lo, beta_hi, beta_mid, beta_lo, delta_hi, delta_mid, delta_lo,
    rho_hi, rho_mid, rho_lo, sigma_hi, sigma_mid, sigma_lo,
    HAS_PREV: tl.constexpr, HAS_OLD: tl.constexpr, ACC: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # contiguous (B, m, n) operands; block `pid` lies within one matrix and writes partial[pid]
    pid, offs, mask = _matrix_block(mat_numel, BLOCK_SIZE)
    # upcast right after each load: the interpreter holds bf16 as raw uint16 (docs/DESIGN.md §6)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    prev = g
    if HAS_PREV:
        prev = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(ACC)
    g_old = g
    if HAS_OLD:
        g_old = tl.load(g_old_ptr + offs, mask=mask, other=0.0).to(ACC)
    new, x = _momentum_epilogue(prev, g, g_old, alpha_hi, alpha_mid, alpha_lo, beta_hi, beta_mid, beta_lo,
                                delta_hi, delta_mid, delta_lo, rho_hi, rho_mid, rho_lo, sigma_hi, sigma_mid, sigma_lo,
                                HAS_PREV, HAS_OLD, ACC)  # fmt: skip
    # the flag loaded as a block (one cached byte): a scalar i1 in a mask is refused by the interpreter
    keep = mask & (tl.load(skip_ptr + tl.zeros_like(offs)) == 0)
    tl.store(buf_ptr + offs, cast_for_store(new, buf_ptr.dtype.element_ty), mask=keep)
    tl.store(x_ptr + offs, cast_for_store(x, x_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, x * x, 0.0), axis=0).to(partial_ptr.dtype.element_ty))


@triton.jit
def _lowrank_momentum_kernel(
    u_ptr, s_ptr, v_ptr, g_ptr, g_old_ptr, buf_ptr, x_ptr, partial_ptr, M, N, R,
    stride_ub, stride_um, stride_ur, stride_sb, stride_sr, stride_vb, stride_vn, stride_vr,
    alpha_hi, alpha_mid, alpha_lo, beta_hi, beta_mid, beta_lo, delta_hi, delta_mid, delta_lo,
    rho_hi, rho_mid, rho_lo, sigma_hi, sigma_mid, sigma_lo,
    HAS_PREV: tl.constexpr, HAS_OLD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # one BLOCK_M × BLOCK_N tile of matrix b; g, g_old, buf, x contiguous (B, M, N); factors by strides
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    b = (pid // (tiles_m * tiles_n)).to(tl.int64)
    tile = pid - b * (tiles_m * tiles_n)
    rm = (tile // tiles_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = b * M * N + rm[:, None] * N + rn[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    prev = g
    if HAS_PREV:
        prev = _lowrank_product(u_ptr + b * stride_ub, s_ptr + b * stride_sb, v_ptr + b * stride_vb, rm, rn, M, N, R,
                                stride_um, stride_ur, stride_sr, stride_vn, stride_vr,
                                ACC, BLOCK_R, BLOCK_M, BLOCK_N)  # fmt: skip
    g_old = g
    if HAS_OLD:
        g_old = tl.load(g_old_ptr + offs, mask=mask, other=0.0).to(ACC)
    new, x = _momentum_epilogue(prev, g, g_old, alpha_hi, alpha_mid, alpha_lo, beta_hi, beta_mid, beta_lo,
                                delta_hi, delta_mid, delta_lo, rho_hi, rho_mid, rho_lo, sigma_hi, sigma_mid, sigma_lo,
                                HAS_PREV, HAS_OLD, ACC)  # fmt: skip
    tl.store(buf_ptr + offs, cast_for_store(new, buf_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + offs, cast_for_store(x, x_ptr.dtype.element_ty), mask=mask)
    sq = tl.sum(tl.sum(tl.where(mask, x * x, 0.0), axis=1), axis=0)
    tl.store(partial_ptr + pid, sq.to(partial_ptr.dtype.element_ty))


@triton.jit
def _step_seed_kernel(keys_ptr, step_ptr, seed_ptr, B, BLOCK: tl.constexpr):
    # seed[b] = splitmix64(keys[b] ^ int64(step[b])) >> 1 in wrapping uint64 arithmetic (seeds.step_seed)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    key = tl.load(keys_ptr + offs, mask=mask, other=0).to(tl.uint64, bitcast=True)
    step = tl.load(step_ptr + offs, mask=mask, other=0).to(tl.int64).to(tl.uint64, bitcast=True)
    x = (key ^ step) + 0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    x = x ^ (x >> 31)
    tl.store(seed_ptr + offs, (x >> 1).to(tl.int64, bitcast=True), mask=mask)


# -- launchers -------------------------------------------------------------------------------------


def _split_coefficients(coefficients: Sequence[float]) -> list[float]:
    return [part for c in coefficients for part in split_scalar(float(c))]


def momentum_ns_input_(buf: Tensor, g: Tensor, g_old: Tensor | None, coefficients: Sequence[float],
                       x_dtype: torch.dtype, skip: Tensor | None, block: int | None = None) -> tuple[Tensor, Tensor]:
    """``reference_fused.momentum_ns_input_`` in one launch (plus the ``(B, n_blocks)`` → ``(B,)`` sum).

    ``buf, g, g_old: (..., m, n)``; returns ``X`` (g's shape, ``x_dtype``, contiguous) and ``sqnorm``
    (``g.shape[:-2]``, fp32; fp64 for fp64 operands). ``block`` overrides the block size (tests).
    """
    *lead, m, n = g.shape
    has_prev = float(coefficients[0]) != 0.0
    work = buf if buf.is_contiguous() else buf.contiguous()  # a non-contiguous buf: updated through a copy
    inputs = [t.contiguous() for t in (g, g_old if g_old is not None else g)]
    # the reference's arithmetic dtype: buf counts only when it is read
    acc = acc_dtype(g, *([buf] if has_prev else []), *([g_old] if g_old is not None else []))
    norm_dtype = torch.float64 if acc == tl.float64 else torch.float32
    cfg = _DENSE_FP64 if norm_dtype == torch.float64 else _DENSE
    cfg = dict(cfg, BLOCK_SIZE=block) if block else cfg
    blocks = triton.cdiv(m * n, cfg["BLOCK_SIZE"])
    batch = g.numel() // (m * n)
    X = torch.empty(g.shape, dtype=x_dtype, device=g.device)
    partial = torch.empty((batch, blocks), dtype=norm_dtype, device=g.device)
    if batch == 0:  # a rank holding no matrix: no launch
        return X, partial.sum(dim=-1).reshape(lead)
    _momentum_kernel[(batch * blocks,)](
        work, *inputs, X, partial, skip_flag(skip, g.device), m * n, *_split_coefficients(coefficients),
        HAS_PREV=has_prev, HAS_OLD=g_old is not None, ACC=acc, **cfg,
    )  # fmt: skip
    if work is not buf:
        buf.copy_(work)  # skipped: work holds buf's own values
    return X, partial.sum(dim=-1).reshape(lead)


def lowrank_momentum_ns_input(U: Tensor, S: Tensor, V: Tensor, g: Tensor, g_old: Tensor | None,
                              coefficients: Sequence[float], x_dtype: torch.dtype,
                              blocks: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``reference_fused.lowrank_momentum_ns_input``: ``(buf, X, sqnorm)`` with ``U diag(S) Vᵀ`` built per tile.

    ``U: (..., m, r)``, ``S: (..., r)``, ``V: (..., n, r)`` (any strides), ``g, g_old: (..., m, n)``.
    ``blocks = (BLOCK_M, BLOCK_N)`` overrides the tile (tests).
    """
    *lead, m, n = g.shape
    r = S.shape[-1]
    U3, S2, V3 = U.reshape(-1, m, r), S.reshape(-1, r), V.reshape(-1, n, r)
    has_prev = float(coefficients[0]) != 0.0
    inputs = [t.contiguous() for t in (g, g_old if g_old is not None else g)]
    acc = acc_dtype(g, *((U, S, V) if has_prev else ()), *(() if g_old is None else (g_old,)))
    cfg = _LOWRANK_FP64 if acc == tl.float64 else _LOWRANK
    if blocks is not None:
        cfg = dict(cfg, BLOCK_M=blocks[0], BLOCK_N=blocks[1])
    batch = U3.shape[0]
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    buf = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    X = torch.empty(g.shape, dtype=x_dtype, device=g.device)
    partial = torch.empty((batch, tiles), dtype=torch.float64 if acc == tl.float64 else torch.float32, device=g.device)
    if batch == 0:  # a rank holding no matrix: no launch
        return buf, X, partial.sum(dim=-1).reshape(lead)
    _lowrank_momentum_kernel[(batch * tiles,)](
        U3, S2, V3, *inputs, buf, X, partial, m, n, r, *U3.stride(), *S2.stride(), *V3.stride(),
        *_split_coefficients(coefficients), HAS_PREV=has_prev, HAS_OLD=g_old is not None, ACC=acc,
        BLOCK_R=next_pow2_at_least_16(r, MAX_BLOCK_R), **cfg,
    )  # fmt: skip
    return buf, X, partial.sum(dim=-1).reshape(lead)


def step_seeds(keys: Tensor, step: Tensor) -> Tensor:
    """``seeds.step_seed(keys[b], step[b])`` for each b, computed on the device: ``(B,)`` int64."""
    seeds = torch.empty(keys.shape, dtype=torch.int64, device=keys.device)
    block = 128
    _step_seed_kernel[(triton.cdiv(keys.numel(), block),)](keys.contiguous(), step.contiguous(), seeds,
                                                            keys.numel(), BLOCK=block)  # fmt: skip
    return seeds


def rsvd_update_(U: Tensor, S: Tensor, V: Tensor, M: Tensor, oversample: int, power_iters: int, keys: Tensor,
                 step: Tensor, skip: Tensor | None) -> None:
    """``U, S, V ← rsvd(M, rank=U.shape[-1])`` in place, matrix b seeded by ``step_seed(keys[b], step[b])``
    (mixed on the device); nothing written when ``skip`` is set (a select on the device, no host read)."""
    keep = None if skip is None else skip.to(device=M.device).reshape(()) != 0
    if keep is not None:  # a skipped step's M may hold NaN, which the SVD may refuse: decompose zeros then
        M = torch.where(keep, torch.zeros((), dtype=M.dtype, device=M.device), M)
    new = _rsvd.rsvd(M, U.shape[-1], oversample, power_iters, step_seeds(keys, step))
    for dst, src in zip((U, S, V), new):
        dst.copy_(src if keep is None else torch.where(keep, dst, src.to(dst.dtype)))


# -- ahead-of-time compile targets (format: limuon_kernels/triton/_compile_targets.py) -------------


def _targets() -> list[KernelTarget]:
    # The optimizer's dtypes: fp32 state (buf, factors) with fp32 or bf16 gradients and a bf16 X, and
    # all-fp64; each with and without the previous momentum (α = 0 on a first step) and g_old (exact mode).
    coefs = dict.fromkeys(_COEFS, "fp32")

    def dense(cfg):
        return [KernelConfig({"BLOCK_SIZE": cfg["BLOCK_SIZE"]}, cfg["num_warps"], cfg["num_stages"])]

    def tiles(cfg):
        return [KernelConfig({"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_R": br},
                             cfg["num_warps"], cfg["num_stages"]) for br in (16, MAX_BLOCK_R)]  # fmt: skip

    lr_ints = {a: "i32" for a in ("M", "N", "R", "stride_ub", "stride_um", "stride_sb", "stride_vb", "stride_vn")}
    lr_ints.update(stride_ur=1, stride_sr=1, stride_vr=1)
    targets = []
    for state, grad, x in ((torch.float32, torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16,
                           torch.bfloat16), (torch.float64, torch.float64, torch.float64)):  # fmt: skip
        fp64 = state == torch.float64
        acc, norm = (tl.float64, torch.float64) if fp64 else (tl.float32, torch.float32)
        tag = f"state={dtype_name(state)},g={dtype_name(grad)}"
        for has_prev in (True, False):
            for has_old in (True, False):
                flags = {"HAS_PREV": has_prev, "HAS_OLD": has_old, "ACC": acc}
                name = f"[{tag}{',prev' if has_prev else ''}{',g_old' if has_old else ''}]"
                sig = {"buf_ptr": ptr(state), "g_ptr": ptr(grad), "g_old_ptr": ptr(grad), "x_ptr": ptr(x),
                       "partial_ptr": ptr(norm), "skip_ptr": "*u8", "mat_numel": "i32", **coefs}  # fmt: skip
                targets.append(KernelTarget("momentum" + name, _momentum_kernel, sig,
                                            dense(_DENSE_FP64 if fp64 else _DENSE), flags))  # fmt: skip
                sig = {**{a: ptr(state) for a in ("u_ptr", "s_ptr", "v_ptr")}, "g_ptr": ptr(grad),
                       "g_old_ptr": ptr(grad), "buf_ptr": ptr(grad), "x_ptr": ptr(x), "partial_ptr": ptr(norm),
                       **lr_ints, **coefs}  # fmt: skip
                cfgs = tiles(_LOWRANK_FP64 if fp64 else _LOWRANK)
                targets.append(KernelTarget("lowrank_momentum" + name, _lowrank_momentum_kernel, sig, cfgs, flags))
    for step in (torch.float32, torch.int64):
        sig = {"keys_ptr": "*i64", "step_ptr": ptr(step) if step != torch.int64 else "*i64", "seed_ptr": "*i64",
               "B": "i32"}  # fmt: skip
        targets.append(KernelTarget(f"step_seed[step={dtype_name(step)}]", _step_seed_kernel, sig,
                                    [KernelConfig({"BLOCK": 128}, 4, 1)]))  # fmt: skip
    return targets


COMPILE_TARGETS: list[KernelTarget] = _targets()
