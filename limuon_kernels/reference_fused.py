"""Reference kernels of the fused optimizer-step ops (``fused_ops.py``): the ground truth for the C++
and Triton kernels, and what runs on devices that have neither.

The three ops a bucket of same-shape matrices goes through in one optimizer step:

    momentum_ns_input_          new momentum (in place) + Newton–Schulz input + per-matrix ‖X‖²
    lowrank_momentum_ns_input   the same from low-rank factors U diag(S) Vᵀ (new momentum returned)
    newton_schulz_update_       Newton–Schulz from those norms, the parameter update in its last step
plus ``rsvd_update_``, the randomized SVD that compresses a low-rank momentum, with its seeds derived
from per-matrix keys and step counters held in tensors (nothing read back to the host on a GPU).

Every op takes an optional ``skip``: a 0-d tensor on the operands' device; when it is nonzero the op
writes nothing (the step is skipped on the device, as GradScaler skips ``optimizer.step``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from limuon_kernels import reference
from limuon_kernels.reference import _acc
from limuon_kernels.seeds import step_seed


def _keep_unless_skipped(dst: Tensor, new: Tensor, skip: Tensor | None) -> None:
    """``dst ← new``, or unchanged where ``skip`` is nonzero (no host read: a select on the device)."""
    if skip is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(skip.to(device=dst.device) != 0, dst, new.to(dst.dtype)))


def _momentum(prev: Tensor | None, g: Tensor, g_old: Tensor | None, coefficients: Sequence[float]
              ) -> tuple[Tensor, Tensor]:
    """(new momentum, orthogonaliser input) in the accumulation dtype, in this order of operations:

        new = (α·prev + β·g) + δ·g_old        (α·prev left out when α = 0: prev is then not read;
                                               δ·g_old left out when g_old is None)
        X   = ρ·new + σ·g
    """
    alpha, beta, delta, rho, sigma = (float(c) for c in coefficients)
    gf = _acc(g)
    new = beta * gf
    if alpha != 0.0 and prev is not None:
        new = alpha * prev + new
    if g_old is not None:
        new = new + delta * _acc(g_old)
    return new, rho * new + sigma * gf


def _sqnorm(X: Tensor) -> Tensor:
    """Σ x² of every matrix of ``X: (..., m, n)``, shape ``(...)``, in X's (accumulation) dtype."""
    return X.square().sum(dim=(-2, -1))


def momentum_ns_input_(buf: Tensor, g: Tensor, g_old: Tensor | None, coefficients: Sequence[float],
                       x_dtype: torch.dtype, skip: Tensor | None) -> tuple[Tensor, Tensor]:
    """Dense momentum, in place, and the Newton–Schulz input, in one pass over ``(..., m, n)`` tensors.

    ``coefficients = [α, β, δ, ρ, σ]`` (``_momentum``), which express every mode of LiMuon and Muon:
        exact (STORM)  M ← μ·M + g − μ·g_old               [μ, 1, −μ, 1, 0]
        approx (MARS)  b ← μ·b + (1−γ)(1−μ)/μ·g,  X = μb + γg   [μ, (1−γ)(1−μ)/μ, 0, μ, γ]
        none (EMA)     M ← μ·M + (1−μ)·g                   [μ, 1−μ, 0, 1, 0]
        first step     M = g, or b = (1−γ)/μ·g and X = g    [0, 1, 0, 1, 0] / [0, (1−γ)/μ, 0, 0, 1]
    Returns ``X`` (g's shape, contiguous, ``x_dtype``: unnormalised) and ``sqnorm`` (``g.shape[:-2]``,
    fp32, fp64 for fp64 operands): ‖X‖²_F per matrix, of X before its rounding to ``x_dtype``.
    ``buf`` is not read when α = 0, and not written when ``skip`` is nonzero.
    """
    prev = _acc(buf) if float(coefficients[0]) != 0.0 else None
    new, X = _momentum(prev, g, g_old, coefficients)
    _keep_unless_skipped(buf, new, skip)
    return X.to(x_dtype).contiguous(), _sqnorm(X)


def lowrank_momentum_ns_input(U: Tensor, S: Tensor, V: Tensor, g: Tensor, g_old: Tensor | None,
                              coefficients: Sequence[float], x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``momentum_ns_input_`` with the previous momentum ``U diag(S) Vᵀ`` (``U: (..., m, r)``, ``S: (..., r)``,
    ``V: (..., n, r)``), never materialised by the fused kernels. Returns ``(buf, X, sqnorm)``: the new dense
    momentum in g's dtype (compressed again by ``rsvd_update_``), X and sqnorm as ``momentum_ns_input_``."""
    prev = reference.lowrank_product(U, S, V) if float(coefficients[0]) != 0.0 else None
    new, X = _momentum(prev, g, g_old, coefficients)
    return new.to(g.dtype).contiguous(), X.to(x_dtype).contiguous(), _sqnorm(X)


def _orthogonalize_normalised(X: Tensor, sqnorm: Tensor, coefficients: Sequence[float], eps: float,
                              norm_scale: float, compute_dtype: torch.dtype,
                              restarts: Sequence[int] | None) -> Tensor:
    """Newton–Schulz of ``X: (B, m, n)`` normalised by the given ``sqnorm`` (no norm pass); the result in
    the accumulation dtype, ``(B, m, n)``."""
    acc = torch.promote_types(X.dtype, torch.float32)
    scale = (sqnorm.to(acc).sqrt() * norm_scale).clamp_min(eps).reshape(-1, 1, 1)
    transposed = X.shape[-2] > X.shape[-1]
    Xn = (X.to(acc) / scale).to(compute_dtype)
    Xn = Xn.mT if transposed else Xn
    if restarts is None:
        O = reference.ns_iterate(Xn, coefficients)
    else:
        O = reference.gram_ns_iterate(Xn, coefficients, restarts)
    return (O.mT if transposed else O).to(acc)


def newton_schulz_update_(X: Tensor, sqnorm: Tensor, W: list[Tensor], lr: Tensor, weight_decay: float,
                          scale: float, coefficients: Sequence[float], eps: float, norm_scale: float,
                          compute_dtype: torch.dtype | None, restarts: Sequence[int] | None,
                          skip: Tensor | None, delta: Tensor | None) -> None:
    """Orthogonalise the ``B`` matrices of ``X: (B, m, n)`` and apply the update to the parameters.

        O = NS(X / max(norm_scale·√sqnorm, eps))         (``restarts``: None → standard, a list → Gram NS)
        delta ← W·lr·wd + lr·scale·O       (when given: ``W_k − W_{k+1}``, exact mode's restore buffer)
        W     ← W·(1 − lr·wd) − lr·scale·O
    ``W`` lists the parameters; ``W[j]`` holds ``W[j].numel() / (m·n)`` consecutive matrices of the batch.
    ``lr``: a 0-d tensor (device or CPU), so a schedule changes it without a recompile or a host read.
    Nothing is written when ``skip`` is nonzero.
    """
    _, m, n = X.shape
    dtype = compute_dtype or X.dtype
    O = _orthogonalize_normalised(X, sqnorm, coefficients, eps, norm_scale, dtype, restarts)
    lr_t = lr.to(device=X.device, dtype=O.dtype)
    counts = [w.numel() // (m * n) for w in W]
    parts = O.split(counts)
    if delta is not None:
        Wb = torch.cat([_acc(w).reshape(c, m, n) for w, c in zip(W, counts)])
        _keep_unless_skipped(delta, Wb * (lr_t * weight_decay) + (lr_t * scale) * O, skip)
    for w, o in zip(W, parts):
        new = _acc(w) * (1.0 - lr_t * weight_decay) - (lr_t * scale) * o.reshape(w.shape)
        _keep_unless_skipped(w, new, skip)


def step_seeds(keys: Tensor, step: Tensor) -> list[int]:
    """Per matrix: ````seeds.step_seed(key, t)`` with ``key`` the int64 bit pattern of a ``seed_key`` and
    ``t`` its step (this reads both tensors: the reference's way; the Triton kernel mixes on the device)."""
    return [step_seed(k, t) for k, t in zip(keys.tolist(), step.tolist())]


def rsvd_update_(U: Tensor, S: Tensor, V: Tensor, M: Tensor, oversample: int, power_iters: int, keys: Tensor,
                 step: Tensor, skip: Tensor | None) -> None:
    """``U, S, V ← rsvd(M, rank=U.shape[-1])`` in place (shapes ``(B, m, r)``, ``(B, r)``, ``(B, n, r)``), with
    matrix ``b`` seeded by ``splitmix64(keys[b] ^ step[b]) >> 1`` (``step_seeds``); nothing written when
    ``skip`` is nonzero."""
    if skip is not None and skip.device.type == "cpu":  # (a CPU flag is read for free: no device to wait for)
        if bool(skip):
            return
        skip = None
    seeds = step_seeds(keys, step)
    if skip is not None:  # (a skipped step's M may hold NaN, which LAPACK's SVD refuses: decompose zeros then)
        M = torch.where(skip.to(M.device) != 0, torch.zeros((), dtype=M.dtype, device=M.device), M)
    new = torch.ops.limuon.rsvd(M, U.shape[-1], oversample, power_iters, seeds)
    for dst, src in zip((U, S, V), new):
        _keep_unless_skipped(dst, src, skip)
