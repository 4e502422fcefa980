"""The fused optimizer-step ops: schema, fake (meta) implementation, registrations, public wrappers.

One bucket of ``B`` same-shape matrices goes through (docs/DESIGN.md §3):
    momentum_ns_input_ / lowrank_momentum_ns_input   momentum, Newton–Schulz input X and ‖X‖² per matrix
    newton_schulz_update_                           NS from those norms; its last step updates W
    rsvd_update_                                    (Option #2) the new momentum compressed to rank r
Their math is in ``reference_fused.py``; the C++ kernels (CPU) are in ``csrc/cpu/fused_momentum.cpp`` and
``fused_ns_update.cpp``, the Triton kernels (CUDA) in ``limuon_kernels/triton/fused_step.py``. Each takes an
optional ``skip`` (a 0-d tensor: nonzero → nothing is written), so a step with a non-finite gradient is skipped
on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from limuon_kernels import ops, reference_fused
from limuon_kernels.ops import _call, _check_float, _check_matrix, _check_same, _check_scalar

_DEFS = {
    "momentum_ns_input_": "(Tensor(a!) buf, Tensor g, Tensor? g_old, float[] coefficients, ScalarType x_dtype, "
    "Tensor? skip) -> (Tensor, Tensor)",
    "lowrank_momentum_ns_input": "(Tensor U, Tensor S, Tensor V, Tensor g, Tensor? g_old, float[] coefficients, "
    "ScalarType x_dtype) -> (Tensor, Tensor, Tensor)",
    "newton_schulz_update_": "(Tensor X, Tensor sqnorm, Tensor(a!)[] W, Tensor lr, float weight_decay, float scale, "
    "float[] coefficients, float eps, float norm_scale, ScalarType? compute_dtype, int[]? restarts, Tensor? skip, "
    "Tensor(b!)? delta) -> ()",
    "rsvd_update_": "(Tensor(a!) U, Tensor(b!) S, Tensor(c!) V, Tensor M, int oversample, int power_iters, "
    "Tensor keys, Tensor step, Tensor? skip) -> ()",
}
for _name, _schema in _DEFS.items():
    torch.library.define(f"limuon::{_name}", _schema)
    torch.library.impl(f"limuon::{_name}", "CompositeExplicitAutograd")(getattr(reference_fused, _name))
ops._TRITON_MODULE.update({name: "fused_step" for name in _DEFS})
ops.register_cuda_kernels(_DEFS)


def _norm_dtype(*read: Tensor | None) -> torch.dtype:
    """The dtype of sqnorm: fp64 when any operand the op reads is fp64 (its arithmetic is fp64 then)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in read) else torch.float32


@torch.library.register_fake("limuon::momentum_ns_input_")
def _momentum_fake(buf, g, g_old, coefficients, x_dtype, skip):
    X = torch.empty(g.shape, dtype=x_dtype, device=g.device)
    return X, g.new_empty(g.shape[:-2], dtype=_norm_dtype(g, g_old, buf if coefficients[0] != 0 else None))


@torch.library.register_fake("limuon::lowrank_momentum_ns_input")
def _lowrank_fake(U, S, V, g, g_old, coefficients, x_dtype):
    buf = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    X = torch.empty(g.shape, dtype=x_dtype, device=g.device)
    factors = (U, S, V) if coefficients[0] != 0 else ()
    return buf, X, g.new_empty(g.shape[:-2], dtype=_norm_dtype(g, g_old, *factors))


@torch.library.register_fake("limuon::newton_schulz_update_")
def _ns_update_fake(X, sqnorm, W, lr, weight_decay, scale, coefficients, eps, norm_scale, compute_dtype, restarts,
                    skip, delta):
    return None


@torch.library.register_fake("limuon::rsvd_update_")
def _rsvd_update_fake(U, S, V, M, oversample, power_iters, keys, step, skip):
    return None


# -- argument checks ------------------------------------------------------------------------------


def _check_skip(skip: Tensor | None, ref: Tensor) -> None:
    if skip is not None and (skip.numel() != 1 or skip.device != ref.device):
        raise ValueError(f"skip must be a one-element tensor on {ref.device}, got {tuple(skip.shape)} on {skip.device}")


def _check_coefficients(coefficients: Sequence[float]) -> list[float]:
    values = [float(c) for c in coefficients]
    if len(values) != 5:
        raise ValueError(f"Invalid coefficients: expected [alpha, beta, delta, rho, sigma], got {coefficients!r}")
    for value, name in zip(values, ("alpha", "beta", "delta", "rho", "sigma")):
        _check_scalar(value, f"coefficients ({name})")
    return values


def _check_x_dtype(x_dtype: torch.dtype) -> None:
    if x_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"Invalid x_dtype: {x_dtype}; expected float32, float64, bfloat16 or float16")


# -- public API -----------------------------------------------------------------------------------


def momentum_ns_input_(buf: Tensor, g: Tensor, g_old: Tensor | None, coefficients: Sequence[float],
                       x_dtype: torch.dtype, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Update the dense momentum ``buf`` in place and return the Newton–Schulz input and its squared norms.

    With ``coefficients = [α, β, δ, ρ, σ]``, for ``buf, g, g_old: (..., m, n)``:
        buf ← (α·buf + β·g) + δ·g_old;   X = ρ·buf + σ·g      (fp32 arithmetic, fp64 for fp64)
    Returns ``X`` (``x_dtype``, g's shape) and ``sqnorm = ‖X‖²_F`` per matrix (shape ``g.shape[:-2]``,
    fp32). ``buf`` is not read when α = 0; nothing is written to it when ``skip`` is nonzero.
    See ``reference_fused.momentum_ns_input_`` for the coefficients of each LiMuon mode.
    """
    if g.dim() >= 3 and g.numel() == 0:  # (a rank holding no matrix, or no rows of them, under FSDP2)
        norm_dtype = _norm_dtype(g, g_old, buf if float(coefficients[0]) != 0 else None)
        return torch.empty(g.shape, dtype=x_dtype, device=g.device), g.new_zeros(g.shape[:-2], dtype=norm_dtype)
    _check_matrix(g, "g")
    _check_same(buf, g, "buf", "g")
    if g_old is not None:
        _check_same(g_old, g, "g_old", "g")
    _check_x_dtype(x_dtype)
    _check_skip(skip, g)
    return _call("momentum_ns_input_", g.device, buf, g, g_old, _check_coefficients(coefficients), x_dtype, skip)


def lowrank_momentum_ns_input(U: Tensor, S: Tensor, V: Tensor, g: Tensor, g_old: Tensor | None,
                              coefficients: Sequence[float], x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``momentum_ns_input_`` with the previous momentum ``U diag(S) Vᵀ`` (``U: (..., m, r)``, ``S: (..., r)``,
    ``V: (..., n, r)``), which the fused kernels never materialise. Returns ``(buf, X, sqnorm)``, ``buf``
    the new dense momentum in g's dtype."""
    ops._check_lowrank(U, S, V, g, "g")
    if g_old is not None:
        _check_same(g_old, g, "g_old", "g")
    _check_x_dtype(x_dtype)
    coefficients = _check_coefficients(coefficients)
    return _call("lowrank_momentum_ns_input", g.device, U, S, V, g, g_old, coefficients, x_dtype)


def _check_params(W: Sequence[Tensor], X: Tensor) -> None:
    B, m, n = X.shape
    total = 0
    for j, w in enumerate(W):
        _check_float(w, f"W[{j}]")
        if w.device != X.device or w.numel() % (m * n) != 0:
            raise ValueError(
                f"W[{j}] must hold whole {m}×{n} matrices on {X.device}, got {tuple(w.shape)} on {w.device}")
        total += w.numel() // (m * n)
    if total != B:
        raise ValueError(f"W must hold the {B} matrices of X, got {total}")


def newton_schulz_update_(X: Tensor, sqnorm: Tensor, W: Sequence[Tensor], lr: Tensor | float, weight_decay: float,
                          scale: float, coefficients: Sequence[float], eps: float = 1e-7, norm_scale: float = 1.0,
                          compute_dtype: torch.dtype | None = None, restarts: Sequence[int] | None = None,
                          skip: Tensor | None = None, delta: Tensor | None = None) -> None:
    """Orthogonalise the matrices of ``X: (B, m, n)`` and update the parameters ``W`` in the last iteration.

        O = NS(X / max(norm_scale·√sqnorm, eps));  delta ← W·lr·wd + lr·scale·O;  W ← W·(1 − lr·wd) − lr·scale·O
    ``coefficients``: the flat ``[a1, b1, c1, ...]`` of ``newton_schulz``; ``restarts``: None (standard NS) or
    the restart points of Gram NS. ``W[j]`` holds consecutive matrices of the batch; ``lr`` may be a 0-d
    tensor (no recompile, no host read when a schedule changes it). Nothing is written when ``skip`` is set.
    """
    if X.dim() == 3 and X.shape[0] == 0:  # (a rank holding no matrix)
        return
    _check_matrix(X, "X")
    if X.dim() != 3:
        raise ValueError(f"X must have shape (B, m, n), got {tuple(X.shape)}")
    if tuple(sqnorm.shape) != (X.shape[0],):
        raise ValueError(f"sqnorm must have shape ({X.shape[0]},), got {tuple(sqnorm.shape)}")
    _check_params(W, X)
    if not isinstance(lr, Tensor):
        _check_scalar(float(lr), "lr", low=0.0)
        lr = torch.tensor(float(lr), dtype=torch.float32, device=X.device)
    _check_scalar(weight_decay, "weight_decay")
    _check_scalar(scale, "scale")
    if delta is not None and tuple(delta.shape) != tuple(X.shape):
        raise ValueError(f"delta must have X's shape {tuple(X.shape)}, got {tuple(delta.shape)}")
    _check_skip(skip, X)
    flat = [float(c) for c in coefficients]
    if not flat or len(flat) % 3:
        raise ValueError(f"Invalid coefficients: a flat list of 3·steps floats, got {len(flat)}")
    _call("newton_schulz_update_", X.device, X, sqnorm, list(W), lr, float(weight_decay), float(scale), flat,
          float(eps), float(norm_scale), compute_dtype, None if restarts is None else list(restarts), skip, delta)


def rsvd_update_(U: Tensor, S: Tensor, V: Tensor, M: Tensor, oversample: int, power_iters: int, keys: Tensor,
                 step: Tensor, skip: Tensor | None = None) -> None:
    """``U, S, V ← rsvd(M, rank=U.shape[-1])`` in place for ``M: (B, m, n)``; matrix ``b`` is seeded with
    ``seeds.step_seed(keys[b], step[b])`` (``keys``: int64, ``step``: its step counter, both ``(B,)`` tensors
    on M's device, read on the device by the GPU kernels). Nothing is written when ``skip`` is set."""
    if M.dim() == 3 and M.shape[0] == 0:  # (a rank holding no matrix)
        return
    _check_matrix(M, "M")
    ops._check_lowrank(U, S, V, M, "M")
    for t, name in ((keys, "keys"), (step, "step")):
        if tuple(t.shape) != (M.shape[0],) or t.device != M.device:
            raise ValueError(
                f"{name} must have shape ({M.shape[0]},) on {M.device}, got {tuple(t.shape)} on {t.device}")
    if keys.dtype != torch.int64:
        raise ValueError(f"keys must be an int64 tensor, got {keys.dtype}")
    _check_skip(skip, M)
    _call("rsvd_update_", M.device, U, S, V, M, int(oversample), int(power_iters), keys, step, skip)
