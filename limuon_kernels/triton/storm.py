"""Elementwise momentum updates of LiMuon in one pass: STORM (exact mode) and MARS (approx mode).

Each kernel reads its inputs once and updates the momentum buffer in place. A whole tensor is one
launch; offsets are int64; arithmetic is fp32 whatever the storage dtype (fp64 for fp64 data).
The launchers (``storm_update_``, ``mars_update_``, the reference signatures) are autotuned over
``_CONFIGS``. The fused step's momentum kernel (``fused_step.py``) shares ``_matrix_block``.
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
    ptr,
    scalar_arg,
    split_scalar,
)

# Memory-bound kernels: 8–16 elements per thread keeps 128-bit accesses and enough bytes in
# flight on H100/H200 (and on A100, sm_80, where the same configs compile).
_CONFIGS = [
    triton.Config({"BLOCK_SIZE": 1024}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_SIZE": 2048}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_SIZE": 4096}, num_warps=8, num_stages=1),
]


@triton.jit
def _matrix_block(mat_numel, BLOCK_SIZE: tl.constexpr):
    """(program id, int64 offsets, mask) of this program's block: block ``pid`` covers part of one
    matrix only, so its partial sum of squares belongs to that matrix."""
    pid = tl.program_id(0)
    blocks_per_mat = tl.cdiv(mat_numel, BLOCK_SIZE)
    b = pid // blocks_per_mat
    local = (pid - b * blocks_per_mat).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return pid, b.to(tl.int64) * mat_numel + local, local < mat_numel


@triton.jit
def _storm_kernel(
    m_ptr,
    g_new_ptr,
    g_old_ptr,
    numel,
    mu_hi,
    mu_mid,
    mu_lo,
    ACC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    _, offs, mask = _matrix_block(numel, BLOCK_SIZE)  # the whole tensor is one "matrix"
    mu = scalar_arg(mu_hi, mu_mid, mu_lo, ACC)
    # Upcast right after the load: the interpreter holds bf16 as raw uint16 (docs/DESIGN.md §6).
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC)
    g_new = tl.load(g_new_ptr + offs, mask=mask, other=0.0).to(ACC)
    g_old = tl.load(g_old_ptr + offs, mask=mask, other=0.0).to(ACC)
    out = g_new + mu * (m - g_old)
    tl.store(m_ptr + offs, cast_for_store(out, m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mars_kernel(
    b_ptr,
    g_ptr,
    d_ptr,
    numel,
    mu_hi,
    mu_mid,
    mu_lo,
    coef_hi,
    coef_mid,
    coef_lo,
    gamma_hi,
    gamma_mid,
    gamma_lo,
    ACC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # b ← μ·b + coef·g with coef = (1−γ)(1−μ)/μ (computed on the host in double, as the reference
    # does); d = γ·g + μ·b from b before it is rounded to b's dtype.
    _, offs, mask = _matrix_block(numel, BLOCK_SIZE)
    mu = scalar_arg(mu_hi, mu_mid, mu_lo, ACC)
    coef = scalar_arg(coef_hi, coef_mid, coef_lo, ACC)
    gamma = scalar_arg(gamma_hi, gamma_mid, gamma_lo, ACC)
    buf = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    buf = mu * buf + coef * g
    d = gamma * g + mu * buf
    tl.store(b_ptr + offs, cast_for_store(buf, b_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, cast_for_store(d, d_ptr.dtype.element_ty), mask=mask)


_storm_tuned = triton.autotune(configs=_CONFIGS, key=["numel"], restore_value=["m_ptr"])(_storm_kernel)
_mars_tuned = triton.autotune(configs=_CONFIGS, key=["numel"], restore_value=["b_ptr"])(_mars_kernel)


# -- launchers ------------------------------------------------------------------------------------


def _check_like(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    torch._check(
        t.shape == ref.shape,
        lambda: f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}",
    )
    torch._check(t.device == ref.device, lambda: f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_momentum(momentum: float) -> None:
    torch._check(momentum != 0.0, lambda: "momentum must be nonzero: the MARS update divides by it")


def _run(tuned, state: Tensor, inputs: tuple[Tensor, ...], outs: tuple[Tensor, ...], scalars) -> None:
    """Launch ``kernel(state, *inputs, *outs, numel, *split scalars)`` over ``state``, autotuned.

    ``state`` (updated in place) may be non-contiguous: the kernel then works on a contiguous copy
    that is copied back.
    """
    if state.numel() == 0:  # a rank holding no rows of these matrices (FSDP2): no launch, no autotuning
        return
    work = state if state.is_contiguous() else state.contiguous()
    inputs = tuple(t.contiguous() for t in inputs)
    split = [part for x in scalars for part in split_scalar(float(x))]
    n = work.numel()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_SIZE"]),)  # noqa: E731
    launch_tuned(tuned, grid, work, *inputs, *outs, n, *split, ACC=acc_dtype(state, *inputs))
    if work is not state:
        state.copy_(work)


def storm_update_(m: Tensor, g_new: Tensor, g_old: Tensor, momentum: float) -> None:
    """In place, one pass: ``m ← g_new + momentum·(m − g_old)`` (fp32 arithmetic, fp64 if an input is
    fp64; stored in m's dtype)."""
    _check_like(g_new, m, "g_new", "m")
    _check_like(g_old, m, "g_old", "m")
    if m.numel():
        _run(_storm_tuned, m, (g_new, g_old), (), (momentum,))


def mars_update_(b: Tensor, g: Tensor, momentum: float, gamma: float) -> Tensor:
    """``b ← μ·b + (1−γ)(1−μ)/μ·g`` in place; returns ``d = γ·g + μ·b`` in g's dtype (contiguous)."""
    _check_like(g, b, "g", "b")
    _check_momentum(momentum)
    d = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if b.numel():
        coef = (1.0 - gamma) * (1.0 - momentum) / momentum
        _run(_mars_tuned, b, (g,), (d,), (momentum, coef, gamma))
    return d


# -- ahead-of-time compile targets (format: limuon_kernels/triton/_compile_targets.py) ------------


def _targets() -> list[KernelTarget]:
    # fp32 state (m, b) with fp32 or bf16 gradients, and all-fp64 (fp64 arithmetic).
    tuned = [KernelConfig({"BLOCK_SIZE": c.kwargs["BLOCK_SIZE"]}, c.num_warps, c.num_stages) for c in _CONFIGS]

    def split(*names: str) -> dict[str, str]:
        return {f"{x}_{part}": "fp32" for x in names for part in ("hi", "mid", "lo")}

    targets = []
    for state_dtype, g_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float64,) * 2):
        st, g = ptr(state_dtype), ptr(g_dtype)
        acc = tl.float64 if state_dtype == torch.float64 else tl.float32
        tag = f"state={dtype_name(state_dtype)},g={dtype_name(g_dtype)}"
        targets += [
            KernelTarget(
                f"storm_update[{tag}]",
                _storm_kernel,
                {"m_ptr": st, "g_new_ptr": g, "g_old_ptr": g, "numel": "i32", **split("mu")},
                tuned,
                {"ACC": acc},
            ),
            KernelTarget(
                f"mars_update[{tag}]",
                _mars_kernel,
                {"b_ptr": st, "g_ptr": g, "d_ptr": g, "numel": "i32", **split("mu", "coef", "gamma")},
                tuned,
                {"ACC": acc},
            ),
        ]
    return targets


COMPILE_TARGETS: list[KernelTarget] = _targets()
