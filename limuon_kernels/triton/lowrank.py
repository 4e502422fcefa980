"""Low-rank momentum epilogues: ``U diag(S) Vᵀ`` built tile by tile in registers, never stored.

One program computes a ``BLOCK_M × BLOCK_N`` tile of matrix ``b`` of a stacked ``(B, m, n)``
group: ``P = (U_b[rows] · S_b) V_b[cols]ᵀ`` with ``tl.dot`` over the rank (in chunks of
``BLOCK_R ≤ 32``, a power of two ≥ 16, masked past ``r``; one chunk for the paper's ranks), then
the epilogue, all in fp32:
  * STORM: ``out = g_new + μ·(P − g_old)``            (``lowrank_storm``)
  * AXPBY: ``out = α·P + β·g``                         (``lowrank_axpby``)
``_lowrank_product`` (the tile of ``U diag(S) Vᵀ``) is shared with the fused step kernel
(``fused_step.lowrank_momentum_ns_input``).
Inputs are read through their strides (no copies of non-contiguous operands); outputs are
contiguous. ``tl.dot`` runs in exact fp32 (``input_precision="ieee"``, FMA units): at most 2·32
flops per output element per rank chunk keeps the kernel memory-bound, and tf32 would cost the
fp32 path three decimal digits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget
from limuon_kernels.triton._utils import (
    acc_dtype,
    cast_for_store,
    dtype_name,
    launch_tuned,
    next_pow2_at_least_16,
    ptr,
    scalar_arg,
    split_scalar,
)

MAX_BLOCK_R = 32
# (BLOCK_M, BLOCK_N, warps): the accumulator, the two gradient tiles and the rank-chunk operands
# live in registers; with BLOCK_R ≤ 32 these stay at ≤ 170 registers per thread without spills
# on sm_90 and sm_80 (ptxas -v), where BLOCK_R = 64 or 128×128 tiles spill. The rank
# loop is one or two iterations, so there is nothing to pipeline (num_stages=1).
_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1),
]
# fp64 data (fp64 arithmetic, as the reference) holds twice the registers: half-size tiles.
_CONFIGS_FP64 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1),
]


@triton.jit
def _lowrank_product(
    u_base, s_base, v_base, rm, rn, M, N, R, stride_um, stride_ur, stride_sr, stride_vn, stride_vr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The ``(rm, rn)`` tile of ``(U·S) Vᵀ`` for one matrix (bases already offset to it), in ACC."""
    rk = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, R, BLOCK_R):
        kk = k0 + rk
        k_mask = kk < R
        # Upcast right after every load: the interpreter holds bf16 as raw uint16 (docs/DESIGN.md §6).
        u = tl.load(
            u_base + rm[:, None] * stride_um + kk[None, :] * stride_ur,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(ACC)
        s = tl.load(s_base + kk * stride_sr, mask=k_mask, other=0.0).to(ACC)
        vt = tl.load(
            v_base + kk[:, None] * stride_vr + rn[None, :] * stride_vn,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        ).to(ACC)
        # (U·S) Vᵀ in this order, as reference.lowrank_product computes it.
        acc = tl.dot(u * s[None, :], vt, acc, input_precision="ieee")
    return acc


@triton.jit
def _lowrank_kernel(
    u_ptr,
    s_ptr,
    v_ptr,
    g1_ptr,
    g2_ptr,
    out_ptr,
    M,
    N,
    R,
    stride_ub,
    stride_um,
    stride_ur,
    stride_sb,
    stride_sr,
    stride_vb,
    stride_vn,
    stride_vr,
    stride_g1b,
    stride_g1m,
    stride_g1n,
    stride_g2b,
    stride_g2m,
    stride_g2n,
    alpha_hi,
    alpha_mid,
    alpha_lo,
    beta_hi,
    beta_mid,
    beta_lo,
    STORM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    b = pid // (tiles_m * tiles_n)
    tile = pid - b * (tiles_m * tiles_n)
    pid_m = tile // tiles_n
    pid_n = tile - pid_m * tiles_n
    b = b.to(tl.int64)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    alpha = scalar_arg(alpha_hi, alpha_mid, alpha_lo, ACC)
    beta = scalar_arg(beta_hi, beta_mid, beta_lo, ACC)
    acc = _lowrank_product(u_ptr + b * stride_ub, s_ptr + b * stride_sb, v_ptr + b * stride_vb, rm, rn, M, N, R,
                           stride_um, stride_ur, stride_sr, stride_vn, stride_vr,
                           ACC, BLOCK_R, BLOCK_M, BLOCK_N)  # fmt: skip
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    g1 = tl.load(
        g1_ptr + b * stride_g1b + rm[:, None] * stride_g1m + rn[None, :] * stride_g1n, mask=mask, other=0.0
    ).to(ACC)
    if STORM:
        g2 = tl.load(
            g2_ptr + b * stride_g2b + rm[:, None] * stride_g2m + rn[None, :] * stride_g2n, mask=mask, other=0.0
        ).to(ACC)
        out = g1 + alpha * (acc - g2)
    else:
        out = alpha * acc + beta * g1
    offs = b * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out_ptr + offs, cast_for_store(out, out_ptr.dtype.element_ty), mask=mask)


_lowrank_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "R"])(_lowrank_kernel)
_lowrank_tuned_fp64 = triton.autotune(configs=_CONFIGS_FP64, key=["M", "N", "R"])(_lowrank_kernel)


# -- launchers ------------------------------------------------------------------------------------


def _as_batched(U: Tensor, S: Tensor, V: Tensor, g: Tensor, g_name: str):
    """Views ``(B, m, r)``, ``(B, r)``, ``(B, n, r)``, ``(B, m, n)`` (copies only if no view exists)."""
    torch._check(g.dim() >= 2, lambda: f"{g_name} must have shape (..., m, n), got {tuple(g.shape)}")
    *lead, m, n = g.shape
    torch._check(S.dim() >= 1, lambda: f"S must have shape (..., r), got {tuple(S.shape)}")
    r = S.shape[-1]
    for t, name, shape in ((U, "U", (*lead, m, r)), (S, "S", (*lead, r)), (V, "V", (*lead, n, r))):
        torch._check(
            tuple(t.shape) == tuple(shape),
            lambda t=t, name=name, shape=shape: (
                f"{name} must have shape {tuple(shape)} to match {g_name} {tuple(g.shape)}, got {tuple(t.shape)}"
            ),
        )
        torch._check(
            t.device == g.device, lambda t=t, name=name: f"{name} must be on {g_name}'s device, got {t.device}"
        )
    return U.reshape(-1, m, r), S.reshape(-1, r), V.reshape(-1, n, r), g.reshape(-1, m, n)


def _launch(U, S, V, g1, g2, out, alpha, beta, storm):
    """One launch over the ``(B, m, n)`` group."""
    batch, m, n = g1.shape
    r = S.shape[-1]
    acc = acc_dtype(U, S, V, g1, g2)
    meta = {"STORM": storm, "ACC": acc, "BLOCK_R": next_pow2_at_least_16(r, MAX_BLOCK_R)}
    args = (
        U,
        S,
        V,
        g1,
        g2,
        out,
        m,
        n,
        r,
        *U.stride(),
        *S.stride(),
        *V.stride(),
        *g1.stride(),
        *g2.stride(),
        *split_scalar(float(alpha)),
        *split_scalar(float(beta)),
    )

    def grid(cfg):
        return (batch * triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

    launch_tuned(_lowrank_tuned_fp64 if acc == tl.float64 else _lowrank_tuned, grid, *args, **meta)


def lowrank_storm(U: Tensor, S: Tensor, V: Tensor, g_new: Tensor, g_old: Tensor, momentum: float) -> Tensor:
    """``g_new + momentum·(U diag(S) Vᵀ − g_old)`` in g_new's dtype (contiguous), never forming ``U diag(S) Vᵀ``.

    ``U: (..., m, r)``, ``S: (..., r)``, ``V: (..., n, r)``, ``g_new, g_old: (..., m, n)``; any r
    (chunks of 32 past r = 32). fp32 arithmetic, fp64 when an input is fp64.
    """
    torch._check(g_old.shape == g_new.shape, lambda: f"g_old must have the shape of g_new, got {tuple(g_old.shape)}")
    U3, S2, V3, g1 = _as_batched(U, S, V, g_new, "g_new")
    out = torch.empty(g_new.shape, dtype=g_new.dtype, device=g_new.device)
    if out.numel():
        _launch(U3, S2, V3, g1, g_old.reshape(g1.shape), out, momentum, 0.0, storm=True)
    return out


def lowrank_axpby(U: Tensor, S: Tensor, V: Tensor, g: Tensor, alpha: float, beta: float) -> Tensor:
    """``alpha·U diag(S) Vᵀ + beta·g`` in g's dtype (contiguous), never forming ``U diag(S) Vᵀ``."""
    U3, S2, V3, g1 = _as_batched(U, S, V, g, "g")
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if out.numel():
        _launch(U3, S2, V3, g1, g1, out, alpha, beta, storm=False)
    return out


# -- ahead-of-time compile targets (format: limuon_kernels/triton/_compile_targets.py) ------------


def _targets() -> list[KernelTarget]:
    # Contiguous factors and contiguous g, as the optimizer launches: unit strides are the constant 1
    # (the JIT specialises integer arguments equal to 1), the other sizes and strides i32. fp32
    # factors with fp32 or bf16 g, and all-fp64 (fp64 arithmetic, its own configs).
    unit = ("stride_ur", "stride_sr", "stride_vr", "stride_g1n", "stride_g2n")
    ints = [a for a in _lowrank_kernel.arg_names if a in ("M", "N", "R") or a.startswith("stride_")]
    scalars = {f"{x}_{part}": "fp32" for x in ("alpha", "beta") for part in ("hi", "mid", "lo")}

    def configs(tuned):
        return [
            KernelConfig({"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": c.kwargs["BLOCK_N"], "BLOCK_R": br},
                         c.num_warps, c.num_stages)
            for c in tuned
            for br in (16, MAX_BLOCK_R)
        ]  # fmt: skip

    targets = []
    for factor_dtype, g_dtype in (
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float64,) * 2,
    ):
        fp64 = factor_dtype == torch.float64
        f, g = ptr(factor_dtype), ptr(g_dtype)
        for op, storm in (("lowrank_storm", True), ("lowrank_axpby", False)):
            signature = {
                **{a: f for a in ("u_ptr", "s_ptr", "v_ptr")},
                **{a: g for a in ("g1_ptr", "g2_ptr", "out_ptr")},
                **{a: 1 if a in unit else "i32" for a in ints},
                **scalars,
            }
            constexprs = {"STORM": storm, "ACC": tl.float64 if fp64 else tl.float32}
            name = f"{op}[factors={dtype_name(factor_dtype)},g={dtype_name(g_dtype)}]"
            targets.append(KernelTarget(name, _lowrank_kernel, signature, configs(_CONFIGS_FP64 if fp64 else _CONFIGS),
                                        constexprs))  # fmt: skip
    return targets


COMPILE_TARGETS: list[KernelTarget] = _targets()
