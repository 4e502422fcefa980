"""``newton_schulz_update_`` in Triton: Newton–Schulz from given norms, the parameter update in its last step.

The iterations are those of ``newton_schulz.py`` (standard NS) or ``gram_newton_schulz.py`` (Gram NS,
``restarts`` a list), with two changes:
  * no sum-of-squares pass: the given ``sqnorm: (B,)`` fp32 is read as the partial sums ``(B, 1)``;
  * the last product is ``_ns_final_kernel``: ``O = L·X (+ a·X)`` (L = B of standard NS, or Gram NS's Q),
    rounded to the compute dtype as the reference's result is, then per element, in fp32,
        delta ← W·lr·wd + lr·scale·O          (when given)
        W     ← W·(1 − lr·wd) − lr·scale·O
    with W reached through a table of per-matrix base addresses (int64, on the device: the B matrices
    of a bucket live in several parameter tensors), lr read from a device scalar and nothing stored
    when the device flag ``skip`` is set. O itself is never stored.

The final kernel writes W in place, so it is not autotuned (benchmark runs would apply the update
several times): one fixed tile per arch. fp64 compute, fp64 or mixed-dtype or non-contiguous
parameters run ``reference_fused`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from limuon_kernels import reference_fused
from limuon_kernels.triton import gram_newton_schulz as gns
from limuon_kernels.triton import newton_schulz as ns
from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget
from limuon_kernels.triton._ns_kernels import _RECT
from limuon_kernels.triton._ns_tiles import _cast_out, _inv_norm, _load, _mma, _round_as

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_FINAL_GPU = {arch: cfgs[-1] for arch, cfgs in _RECT.items()}  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)


@triton.jit
def _ns_final_kernel(
    L_ptr, X_ptr, table_ptr, delta_ptr, partial_ptr, lr_ptr, skip_ptr, P, Q, n_part, norm_scale, eps, coef_a,
    weight_decay, update_scale, stride_xb, stride_xr, stride_xc, stride_wr, stride_wc, stride_db, stride_dr, stride_dc,
    NORMALIZE: tl.constexpr, ADD_X: tl.constexpr, HAS_DELTA: tl.constexpr, W_TY: tl.constexpr, DOT_TY: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # O[b] = L[b]·X[b] (+ coef_a·X[b] when ADD_X; X scaled by s when NORMALIZE) on (P, Q) tiles; L contiguous
    # (B, P, P); X by strides; W[b] at address table[b] and delta[b] by strides, both in X's (P, Q) orientation
    tiles_m = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % tiles_m
    pid_n = pid // tiles_m
    bid = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    l_ptrs = L_ptr + bid * P * P + (offs_m % P)[:, None] * P + offs_k[None, :]
    x_base = X_ptr + bid * stride_xb
    x_ptrs = x_base + offs_k[:, None] * stride_xr + (offs_n % Q)[None, :] * stride_xc
    s = 1.0
    if NORMALIZE:
        s = _inv_norm(partial_ptr, bid, n_part, norm_scale, eps, 128)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, P, BLOCK_K):
        lt = _load(l_ptrs, offs_k[None, :] < P - k, UPCAST)
        xt = _load(x_ptrs, offs_k[:, None] < P - k, UPCAST)
        if NORMALIZE:  # in fp32 before the cast to the dot dtype, as newton_schulz.py does
            xt = xt.to(tl.float32) * s
        acc = _mma(lt, xt, acc, DOT_TY, UPCAST, PRECISION)
        l_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_xr
    mask = (offs_m[:, None] < P) & (offs_n[None, :] < Q)
    if ADD_X:
        x_ij = _load(x_base + offs_m[:, None] * stride_xr + offs_n[None, :] * stride_xc, mask, UPCAST)
        acc = acc + coef_a * (x_ij.to(tl.float32) * s)
    # the reference's NS result is in the compute dtype: round O to it before the update
    if UPCAST:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        o = _round_as(acc, DOT_TY)
    else:
        o = acc.to(DOT_TY).to(tl.float32)
    lr = tl.load(lr_ptr)
    # the flag loaded as a tile (one cached byte): a scalar i1 in a mask is refused by the interpreter
    keep = mask & (tl.load(skip_ptr + tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)) == 0)
    w_base = tl.load(table_ptr + bid).to(tl.pointer_type(W_TY))
    w_ptrs = w_base + offs_m[:, None] * stride_wr + offs_n[None, :] * stride_wc
    w = _load(w_ptrs, mask, UPCAST).to(tl.float32)
    if HAS_DELTA:
        d = w * (lr * weight_decay) + (lr * update_scale) * o
        d_ptrs = delta_ptr + bid * stride_db + offs_m[:, None] * stride_dr + offs_n[None, :] * stride_dc
        tl.store(d_ptrs, _cast_out(d, delta_ptr.dtype.element_ty, UPCAST), mask=keep)
    new = w * (1.0 - lr * weight_decay) - (lr * update_scale) * o
    tl.store(w_ptrs, _cast_out(new, W_TY, UPCAST), mask=keep)


# -- host side -------------------------------------------------------------------------------------

_ZERO: dict[torch.device, Tensor] = {}
_TABLES: dict[tuple, Tensor] = {}


def skip_flag(skip: Tensor | None, device: torch.device) -> Tensor:
    """``skip`` as a one-byte device tensor (nonzero: skip), read by the kernels; a shared zero when None.
    A bool or 8-bit flag is reinterpreted in place; any other dtype costs one small device op."""
    if skip is None:
        if device not in _ZERO:
            _ZERO[device] = torch.zeros(1, dtype=torch.uint8, device=device)
        return _ZERO[device]
    flag = skip.reshape(1)
    if flag.dtype in (torch.bool, torch.uint8, torch.int8):
        return flag.view(torch.uint8)
    return (flag != 0).view(torch.uint8)


def pointer_table(W: Sequence[Tensor], mat_numel: int, device: torch.device) -> Tensor:
    """int64 ``(B,)`` device tensor of the base address of every matrix of ``W`` (contiguous tensors, each
    holding whole ``mat_numel``-element matrices), in batch order. Cached by the addresses: a steady-state
    step reuses its table and makes no host→device copy."""
    addrs = tuple(w.data_ptr() + k * mat_numel * w.element_size() for w in W for k in range(w.numel() // mat_numel))
    key = (device, addrs)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 1024:  # parameters re-allocated over and over: forget the old tables
            _TABLES.clear()
        table = _TABLES[key] = torch.tensor(addrs, dtype=torch.int64).to(device)
    return table


def _use_reference(X: Tensor, W: Sequence[Tensor], dtype: torch.dtype) -> bool:
    dtypes = {w.dtype for w in W}
    return (dtype not in _TL_DTYPE or X.dtype == torch.float64 or len(dtypes) != 1 or dtypes.pop() not in _TL_DTYPE
            or not all(w.is_contiguous() for w in W))  # fmt: skip


def newton_schulz_update_(X: Tensor, sqnorm: Tensor, W: list[Tensor], lr: Tensor, weight_decay: float, scale: float,
                          coefficients: Sequence[float], eps: float, norm_scale: float,
                          compute_dtype: torch.dtype | None, restarts: Sequence[int] | None, skip: Tensor | None,
                          delta: Tensor | None, blocks: tuple[int, int, int] | None = None) -> None:  # fmt: skip
    """``reference_fused.newton_schulz_update_`` on ``X: (B, m, n)`` with ``sqnorm: (B,)``: NS (standard, or
    Gram with ``restarts``) whose last product updates the parameters ``W`` (and writes ``delta``).
    ``blocks=(BLOCK_M, BLOCK_N, BLOCK_K)`` fixes every tile (tests)."""
    B, m, n = X.shape
    dtype = compute_dtype or X.dtype
    if _use_reference(X, W, dtype):
        reference_fused.newton_schulz_update_(X, sqnorm, W, lr, weight_decay, scale, coefficients, eps, norm_scale,
                                              compute_dtype, restarts, skip, delta)  # fmt: skip
        return
    partial = sqnorm.to(device=X.device, dtype=torch.float32).reshape(B, 1).contiguous()
    transposed = m > n
    p, q = (n, m) if transposed else (m, n)
    work = None if delta is None else (delta if delta.is_contiguous() else delta.contiguous())
    epilogue = dict(table=pointer_table(W, m * n, X.device), W_TY=_TL_DTYPE[W[0].dtype],
                    lr=lr.to(device=X.device, dtype=torch.float32).reshape(1), skip=skip_flag(skip, X.device),
                    delta=work, wd=float(weight_decay), scale=float(scale), transposed=transposed,
                    m=m, n=n, p=p, q=q, blocks=blocks, partial=partial,
                    norm=(float(norm_scale), float(eps)))  # fmt: skip
    if restarts is None:
        def final(Bm, src, coef_a, normalize, flags, partial):
            _launch_final(Bm, src, coef_a, normalize, True, dict(flags, DOT_TY=_TL_DTYPE[dtype]), epilogue)

        ns._run_ns(X, coefficients, eps, norm_scale, compute_dtype, blocks, partial, final)
    else:
        coefficients, restarts = gns._check_args(X, coefficients, restarts)
        X3 = X if X.is_contiguous() else X.contiguous()
        run = gns._Launch(X3, p, q, dtype, blocks, partial)
        Qm, src, normalize = gns.iterate(run, X3.mT if transposed else X3, coefficients, restarts, eps, norm_scale)
        _launch_final(Qm, src, 0.0, normalize, False, run.dot, epilogue)
    if work is not None and work is not delta:
        delta.copy_(work)  # skipped: work holds delta's own values


def _launch_final(L: Tensor, src: Tensor, coef_a: float, normalize: bool, add_x: bool, dot: dict, e: dict) -> None:
    """``_ns_final_kernel`` over the batch; ``e``: the update's operands (see ``newton_schulz_update_``)."""
    batch, m, n, p, q = L.shape[0], e["m"], e["n"], e["p"], e["q"]
    blocks = e["blocks"]
    if blocks is None and dot["UPCAST"]:
        blocks = (32, 32, 32)
    if blocks is None:
        bm, bn, bk, warps, stages = _FINAL_GPU[ns._arch_key(src.device)]
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    else:
        meta = dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2])
    w_strides = (1, n) if e["transposed"] else (n, 1)
    delta = e["delta"]
    d_strides = (m * n, *w_strides) if delta is not None else (0, 0, 0)
    grid = (triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(q, meta["BLOCK_N"]), batch)
    _ns_final_kernel[grid](
        L, src, e["table"], delta if delta is not None else e["partial"], e["partial"], e["lr"], e["skip"],
        p, q, 1, *e["norm"], coef_a, e["wd"], e["scale"], *src.stride(), *w_strides, *d_strides,
        NORMALIZE=normalize, ADD_X=add_x, HAS_DELTA=delta is not None, W_TY=e["W_TY"], **dot, **meta,
    )  # fmt: skip


# -- ahead-of-time compile targets (format: limuon_kernels/triton/_compile_targets.py) -------------


def _targets() -> list[KernelTarget]:
    # bf16 compute on the GPU (tf32 state products in Gram NS); fp32 or bf16 parameters; bf16 delta;
    # X row-major (its last NS buffer) or read transposed (m > n: W's strides swap too).
    configs = [KernelConfig(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s, archs=(arch,))
               for arch, (bm, bn, bk, w, s) in _FINAL_GPU.items()]  # fmt: skip
    div16 = ("P", "Q", "stride_xb", "stride_xr", "stride_xc", "stride_db", "stride_dr", "stride_dc")
    scalars = dict(P="i32", Q="i32", n_part=1, norm_scale="fp32", eps="fp32", coef_a="fp32", weight_decay="fp32",
                   update_scale="fp32")  # fmt: skip
    rows = dict(stride_xb="i32", stride_xr="i32", stride_xc=1, stride_wr="i32", stride_wc=1, stride_db="i32",
                stride_dr="i32", stride_dc=1)  # fmt: skip
    cols = dict(stride_xb="i32", stride_xr=1, stride_xc="i32", stride_wr=1, stride_wc="i32", stride_db="i32",
                stride_dr=1, stride_dc="i32")  # fmt: skip

    def target(gram: bool, w_dtype: str, delta: bool, strides: dict, normalize: bool = False, x: str = "bf16"):
        name = (f"ns_final[{'gram' if gram else 'standard'},W={w_dtype}{',delta' if delta else ''}"
                f"{',transposed' if strides is cols else ''}{',first' if normalize else ''}]")  # fmt: skip
        sig = dict(L_ptr="*fp32" if gram else "*bf16", X_ptr=f"*{x}", table_ptr="*i64", delta_ptr="*bf16",
                   partial_ptr="*fp32", lr_ptr="*fp32", skip_ptr="*u8", **scalars, **strides)  # fmt: skip
        flags = dict(NORMALIZE=normalize, ADD_X=not gram, HAS_DELTA=delta, W_TY=getattr(tl, w_dtype),
                     DOT_TY=tl.bfloat16, UPCAST=False, PRECISION="tf32")  # fmt: skip
        return KernelTarget(name, _ns_final_kernel, sig, configs, flags, div16)

    names = {"fp32": "float32", "bf16": "bfloat16"}
    targets = [target(g, names[w], d, rows) for g in (False, True) for w in ("fp32", "bf16") for d in (False, True)]
    targets += [target(g, "float32", d, cols) for g in (False, True) for d in (False, True)]
    # one-step NS, or Gram NS without restarts: the final kernel normalises the input X itself
    targets += [target(g, "float32", False, s, True, x) for g in (False, True) for s in (rows, cols)
                for x in ("bf16", "fp32")]  # fmt: skip
    return targets


COMPILE_TARGETS: list[KernelTarget] = _targets()
