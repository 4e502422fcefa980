"""The step's math, as functions over one bucket's stacked tensors (no optimizer state, no bookkeeping).

A bucket is ``B`` same-shape ``m×n`` matrices: gradients ``G (B, m, n)``, momentum ``buf (B, m, n)`` or its
low-rank factors ``U (B, m, r), S (B, r), V (B, n, r)``, and the parameters holding the matrices. One step
of a bucket is (docs/ALGORITHM.md §2, docs/DESIGN.md §3):

    X, ‖X‖² = momentum pass(buf or U diag(S) Vᵀ, G, G_old)     one fused kernel (the momentum in place)
    W ← W·(1 − lr·wd) − lr·s·NS(X / ‖X‖)                         Newton–Schulz; the update in its last step
    U, S, V = rsvd(buf)                                          Option #2 only
Every write is skipped on the device when the step's non-finite flag ``skip`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import limuon_kernels as lk
from limuon_kernels.ns_coefficients import resolve_coefficients
from limuon_kernels.ns_method import gram_restarts, resolve_ns_method


def momentum_coefficients(mode: str, first: bool, mu: float, gamma: float) -> list[float]:
    """``[α, β, δ, ρ, σ]`` of ``lk.momentum_ns_input_`` for LiMuon's ``mode`` (buf ← α·buf + β·g + δ·g_old,
    X = ρ·buf + σ·g):
        exact  M ← g + μ(M − g_old)            first step: M = g
        approx b ← μb + (1−γ)(1−μ)/μ·g, X = γg + μb      first: b = (1−γ)/μ·g, X = g
        none   M ← μM + (1−μ)g                 first step: M = g
    """
    if mode == "approx":
        return [0.0, (1.0 - gamma) / mu, 0.0, 0.0, 1.0] if first else \
            [mu, (1.0 - gamma) * (1.0 - mu) / mu, 0.0, mu, gamma]
    if first:
        return [0.0, 1.0, 0.0, 1.0, 0.0]
    if mode == "exact":
        return [mu, 1.0, -mu, 1.0, 0.0]
    return [mu, 1.0 - mu, 0.0, 1.0, 0.0]


def muon_coefficients(mu: float, nesterov: bool) -> list[float]:
    """torch.optim.Muon's momentum: ``buf ← buf.lerp(g, 1−μ)``; X = ``g.lerp(buf, μ)`` (nesterov) or buf."""
    return [mu, 1.0 - mu, 0.0, mu, 1.0 - mu] if nesterov else [mu, 1.0 - mu, 0.0, 1.0, 0.0]


@dataclass(frozen=True)
class Orthogonalizer:
    """How a group orthogonalises its ``m×n`` matrices (resolved once per bucket shape)."""

    coefficients: tuple[float, ...]  # flat [a1, b1, c1, a2, ...]
    norm_scale: float
    eps: float
    compute_dtype: torch.dtype
    restarts: tuple[int, ...] | None  # None: standard Newton–Schulz; else Gram NS restarting after these
    svd: bool = False  # the exact polar factor instead (slow; a verification setting)

    @property
    def x_dtype(self) -> torch.dtype:
        """The dtype the momentum pass writes X in: the compute dtype, except fp32 for fp16 (X is not yet
        normalised there, and fp16's range would lose small gradients: NS normalises in fp32 first) and for
        the SVD polar factor (a verification setting: the momentum is not rounded to the NS dtype there)."""
        return torch.float32 if self.svd or self.compute_dtype == torch.float16 else self.compute_dtype


def orthogonalizer(group: dict, shape: tuple[int, int], device: torch.device, compute_dtype: torch.dtype
                   ) -> Orthogonalizer:
    steps = group["ns_steps"]
    flat, norm_scale = resolve_coefficients(group["ns_coefficients"], steps)
    method = resolve_ns_method(group.get("ns_method", "auto"), shape[0], shape[1], device, compute_dtype)
    restarts = tuple(gram_restarts(steps)) if method == "gram" else None
    svd = group.get("orthogonalizer") == "svd"
    return Orthogonalizer(tuple(flat), norm_scale, float(group["eps"]), compute_dtype, restarts, svd)


def _polar_factor(X: Tensor, skip: Tensor | None) -> Tensor:
    """The SVD polar factor; a skipped step's X may hold NaN, which LAPACK refuses: zeros are decomposed then."""
    if skip is not None:
        X = torch.where(skip != 0, torch.zeros((), dtype=X.dtype, device=X.device), X)
    return lk.orthogonalize_svd(X)


def orthogonalize(X: Tensor, orth: Orthogonalizer, skip: Tensor | None) -> Tensor:
    """``NS(X / ‖X‖)`` of every matrix of ``X: (B, m, n)`` with its own norm pass (for the paths where the
    momentum pass's norms do not cover whole matrices: matrices moved to their owner rank)."""
    if X.shape[0] == 0:
        return X.clone()
    if orth.svd:
        return _polar_factor(X, skip)
    args = (X, list(orth.coefficients), orth.eps, orth.norm_scale, orth.compute_dtype)
    if orth.restarts is not None:
        return lk.ops._call("gram_newton_schulz", X.device, *args, list(orth.restarts))
    return lk.ops._call("newton_schulz", X.device, *args)


def update_fused(X: Tensor, sqnorm: Tensor, params: Sequence[Tensor], lr: Tensor, weight_decay: float, scale: float,
                 orth: Orthogonalizer, skip: Tensor | None, delta: Tensor | None) -> None:
    """Newton–Schulz of the momentum pass's ``X`` with its norms; the last iteration updates ``params``
    (``W ← W(1 − lr·wd) − lr·scale·O``) and, in exact mode, ``delta`` (the previous-iterate restore buffer)."""
    if orth.svd:
        counts = [p.numel() // (X.shape[-2] * X.shape[-1]) for p in params]
        apply_update_(params, _polar_factor(X, skip), lr, weight_decay, scale, counts, skip, delta)
        return
    lk.newton_schulz_update_(X, sqnorm, params, lr, weight_decay, scale, orth.coefficients, orth.eps,
                             orth.norm_scale, orth.compute_dtype, orth.restarts, skip, delta)


def apply_update_(params: Sequence[Tensor], O: Tensor, lr: Tensor, weight_decay: float, scale: float,
                  counts: Sequence[int], skip: Tensor | None, delta: Tensor | None = None) -> None:
    """``delta ← W·lr·wd + lr·scale·O``; ``W ← W·(1 − lr·wd) − lr·scale·O`` for an orthogonalised ``O (B, m, n)``
    (``params[j]`` holds ``counts[j]`` consecutive matrices of it; local shards under FSDP2), unless ``skip``."""
    m, n = O.shape[-2], O.shape[-1]
    parts = O.split(list(counts))
    keep = None if skip is None else skip != 0
    step = lr * scale
    if delta is not None:
        W = torch.cat([p.reshape(c, m, n) for p, c in zip(params, counts)])
        new = W.to(torch.promote_types(W.dtype, torch.float32)) * (lr * weight_decay) + step * O
        delta.copy_(new if keep is None else torch.where(keep, delta, new.to(delta.dtype)))
    for p, o in zip(params, parts):
        new = p * (1.0 - lr * weight_decay) - step * o.view(p.shape)
        p.copy_(new if keep is None else torch.where(keep, p, new.to(p.dtype)))
