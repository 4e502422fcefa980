"""An independent, plain-PyTorch reference of the LiMuon, Muon and AdamW updates.

Written from docs/ALGORITHM.md and the optimizer's documented contract, not from ``limuon``: it
processes one parameter at a time, in whatever dtype it is given (the tests use fp64), and favours
being obviously right over being fast. The only things taken from the kernel package are the two
functions that *define* the randomness of the RSVD sketch, ``derive_seed`` and ``gaussian_sketch``.

Gradients come from ``grad_fn(params) -> (loss, grads)``, a pure function of the parameter values,
so the reference can evaluate the gradient at the previous iterate (exact mode) without moving
anything back and forth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from limuon_kernels import derive_seed
from limuon_kernels.reference import gaussian_sketch

GradFn = Callable[[list[Tensor]], tuple[Tensor, list[Tensor | None]]]

# Keller Jordan's Muon post (torch.optim.Muon's default): the same triple every iteration.
KELLER = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, arXiv 2505.16932) as used in modded-nanogpt's train_gpt.py,
# meant for an input scaled by 1 / (1.02·‖X‖_F).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# LiMuon's documented default momentum per variance-reduction mode (README, "momentum grid").
DEFAULT_MOMENTUM = {"exact": 0.7, "approx": 0.95, "none": 0.95}
SVD_REL_CUTOFF = 1e-6  # orthogonalizer="svd" drops directions with σ ≤ 1e-6·σ_max


# -- building blocks ---------------------------------------------------------------------------


def ns_schedule(coefficients: str | Sequence[float], steps: int) -> tuple[list[tuple[float, ...]], float]:
    """(a, b, c) for every iteration, and the factor applied to ‖X‖_F before normalising."""
    if coefficients == "keller":
        return [KELLER] * steps, 1.0
    if coefficients == "polar_express":
        return list(POLAR_EXPRESS[:steps]), 1.02
    return [tuple(float(c) for c in coefficients)] * steps, 1.0


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[float] = "keller",
    eps: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Newton–Schulz orthogonalisation of one matrix; matmuls in ``compute_dtype`` (default G's)."""
    triples, norm_scale = ns_schedule(coefficients, steps)
    dtype = compute_dtype or G.dtype
    X = G.T if G.shape[0] > G.shape[1] else G  # the Gram matrix X Xᵀ is min(m, n)²
    norm_dtype = torch.promote_types(X.dtype, torch.float32)
    X = X.to(norm_dtype)
    X = (X / max(norm_scale * torch.linalg.matrix_norm(X).item(), eps)).to(dtype)
    for a, b, c in triples:
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    X = X.T if G.shape[0] > G.shape[1] else X
    return X.to(G.dtype)


def orthogonalize_svd(G: Tensor) -> Tensor:
    """Exact polar factor U Vᵀ, leaving out directions with σ ≤ 1e-6·σ_max."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    keep = S / S.max() > SVD_REL_CUTOFF
    return U[:, keep] @ Vh[keep]


def rsvd(M: Tensor, rank: int, oversample: int, power_iters: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD (Halko–Martinsson–Tropp) of one matrix, in M's dtype, sketch from ``seed``."""
    m, n = M.shape
    k = min(rank + oversample, m, n)
    omega = gaussian_sketch(n, k, seed, M.device).to(M.dtype)
    Y = M @ omega
    for _ in range(power_iters):
        Q = torch.linalg.qr(Y).Q
        Z = torch.linalg.qr(M.T @ Q).Q
        Y = M @ Z
    Q = torch.linalg.qr(Y).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Ub[:, :rank], S[:rank], Vh[:rank].T


def lowrank(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    return U @ torch.diag(S) @ V.T


def lr_scale(m: int, n: int, adjust_lr_fn: str | None) -> float:
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, m / n))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(adjust_lr_fn)


def as_matrix(t: Tensor) -> Tensor:
    """The 2-D view of a matrix parameter: (out, in·kh·kw) for a conv weight."""
    return t.reshape(t.shape[0], -1)


def adamw_update(p: Tensor, g: Tensor, state: dict, lr: float, betas, eps: float, wd: float) -> None:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments, eps after sqrt)."""
    beta1, beta2 = betas
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    t = state["step"]
    p.mul_(1 - lr * wd)
    state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
    state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
    m_hat = state["exp_avg"] / (1 - beta1**t)
    denom = state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t) + eps
    p.sub_(lr * m_hat / denom)


def _split_groups(params, defaults: dict) -> list[dict]:
    params = list(params)
    raw = params if params and isinstance(params[0], dict) else [{"params": params}]
    return [{**defaults, **g, "params": list(g["params"])} for g in raw]


# -- LiMuon --------------------------------------------------------------------------------------


class ReferenceLiMuon:
    """LiMuon (docs/ALGORITHM.md §2) with the same arguments as ``limuon.LiMuon``.

    ``params``: tensors (owned and updated in place by the reference) or param-group dicts.
    Exact mode's second gradient is taken at the previous iterate: the reference keeps a full copy of
    every parameter from before the last step (``self.previous``), independently of how the optimizer
    stores it. ``restore``: ``"bf16"`` is the documented precision (W_k + bf16(W_{k-1} − W_k));
    ``"exact"`` uses W_{k-1} itself. ``exact_restore`` ("all" or "matrices") as the optimizer's: which
    parameters the second gradient sees at W_{k-1} (the rest at W_k).
    Subclasses may override ``exact_momentum`` to build deliberately wrong variants.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float | None = None,
        *,
        rank: int | None = None,
        oversample: int = 5,
        power_iters: int = 0,
        variance_reduction: str = "approx",
        exact_restore: str = "all",
        gamma: float = 0.025,
        orthogonalizer: str = "newton_schulz",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence[float] = "keller",
        eps: float = 1e-7,
        weight_decay: float = 0.1,
        adjust_lr_fn: str | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        seed: int = 0,
        ns_compute_dtype: torch.dtype | None = None,
        restore: str = "bf16",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            rank=rank,
            oversample=oversample,
            power_iters=power_iters,
            variance_reduction=variance_reduction,
            exact_restore=exact_restore,
            gamma=gamma,
            orthogonalizer=orthogonalizer,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            eps=eps,
            weight_decay=weight_decay,
            adjust_lr_fn=adjust_lr_fn,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            seed=seed,
            ns_compute_dtype=ns_compute_dtype,
            algorithm="limuon",
        )
        self.groups = _split_groups(params, defaults)
        self.params: list[Tensor] = [p for g in self.groups for p in g["params"]]
        self.group_of = [g for g in self.groups for _ in g["params"]]
        self.state: list[dict[str, Any]] = [{} for _ in self.params]
        self.restore = restore
        self.closure_calls = 0
        self.previous: list[Tensor] | None = None  # every parameter before the last step

    def is_matrix(self, i: int) -> bool:
        return self.params[i].ndim >= 2 and self.group_of[i]["algorithm"] != "adamw"

    # The STORM recursion of exact mode; overridden by the tests' deliberately broken variants.
    def exact_momentum(self, prev: Tensor, g_new: Tensor, g_old: Tensor, mu: float) -> Tensor:
        return g_new + mu * (prev - g_old)

    def _grads(self, grad_fn: GradFn, params: list[Tensor]):
        self.closure_calls += 1
        return grad_fn(params)

    def _moves_back(self, i: int) -> bool:
        group = self.group_of[i]
        return group["exact_restore"] == "all" or (self.is_matrix(i) and group["variance_reduction"] == "exact")

    def _previous_iterate(self) -> list[Tensor]:
        old = []
        for i, p in enumerate(self.params):
            if self._moves_back(i):
                du = self.previous[i] - p
                if self.restore == "bf16":
                    du = du.to(torch.bfloat16).to(p.dtype)
                old.append(p + du)
            else:
                old.append(p)
        return old

    def step(self, grad_fn: GradFn) -> Tensor:
        loss, grads = self._grads(grad_fn, self.params)
        needs_old = any(
            grads[i] is not None
            and self.is_matrix(i)
            and "buffer" in self.state[i]
            and self.group_of[i]["variance_reduction"] == "exact"
            for i in range(len(self.params))
        )
        old_grads = self._grads(grad_fn, self._previous_iterate())[1] if needs_old else None
        self.previous = [p.clone() for p in self.params]
        for i, p in enumerate(self.params):
            if grads[i] is None:
                continue
            group = self.group_of[i]
            if self.is_matrix(i):
                self._limuon_update(i, group, grads[i], old_grads[i] if old_grads is not None else None)
            else:
                lr = group["adamw_lr"] if group["adamw_lr"] is not None else group["lr"]
                wd = group["adamw_weight_decay"]
                wd = group["weight_decay"] if wd is None else wd
                adamw_update(p, grads[i], self.state[i], lr, group["adamw_betas"], group["adamw_eps"], wd)
        return loss

    def _limuon_update(self, i: int, h: dict, grad: Tensor, grad_old: Tensor | None) -> None:
        p, st = self.params[i], self.state[i]
        G = as_matrix(grad)
        m, n = G.shape
        mode, gamma = h["variance_reduction"], h["gamma"]
        mu = DEFAULT_MOMENTUM[mode] if h["momentum"] is None else h["momentum"]
        low_rank = h["rank"] is not None and h["rank"] < min(m, n)
        first = "buffer" not in st
        if not first:
            prev = lowrank(*st["buffer"]) if low_rank else st["buffer"]

        if mode == "exact":
            M = G if first else self.exact_momentum(prev, G, as_matrix(grad_old), mu)
            buffer, ns_input = M, M
        elif mode == "none":
            M = G if first else mu * prev + (1 - mu) * G
            buffer, ns_input = M, M
        elif mode == "approx":
            b = (1 - gamma) / mu * G if first else mu * prev + (1 - gamma) * (1 - mu) / mu * G
            buffer, ns_input = b, (G if first else gamma * G + mu * b)
        else:
            raise ValueError(mode)

        if h["orthogonalizer"] == "svd":
            O = orthogonalize_svd(ns_input)
        else:
            O = newton_schulz(ns_input, h["ns_steps"], h["ns_coefficients"], h["eps"], h["ns_compute_dtype"])

        st["step"] = st.get("step", 0) + 1
        lr = h["lr"]
        p.mul_(1 - lr * h["weight_decay"])
        p.sub_(lr * lr_scale(m, n, h["adjust_lr_fn"]) * O.reshape(p.shape))
        if low_rank:
            seed = derive_seed(h["seed"], i, st["step"])
            st["buffer"] = rsvd(buffer, h["rank"], h["oversample"], h["power_iters"], seed)
        else:
            st["buffer"] = buffer


# -- Muon ----------------------------------------------------------------------------------------


class ReferenceMuon:
    """torch.optim.Muon's update for 2-D and N-D params (N-D seen as (out, rest)), AdamW for the rest."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Sequence[float] = KELLER,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        ns_compute_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            ns_compute_dtype=ns_compute_dtype,
            algorithm="muon",
        )
        self.groups = _split_groups(params, defaults)
        self.params = [p for g in self.groups for p in g["params"]]
        self.group_of = [g for g in self.groups for _ in g["params"]]
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def step(self, grad_fn: GradFn) -> Tensor:
        loss, grads = grad_fn(self.params)
        for i, p in enumerate(self.params):
            if grads[i] is None:
                continue
            h, st = self.group_of[i], self.state[i]
            if p.ndim >= 2 and h["algorithm"] != "adamw":
                G = as_matrix(grads[i])
                m, n = G.shape
                buf = st.setdefault("momentum_buffer", torch.zeros_like(G))
                buf.lerp_(G, 1 - h["momentum"])
                U = G.lerp(buf, h["momentum"]) if h["nesterov"] else buf
                O = newton_schulz(U, h["ns_steps"], h["ns_coefficients"], h["eps"], h["ns_compute_dtype"])
                p.mul_(1 - h["lr"] * h["weight_decay"])
                p.sub_(h["lr"] * lr_scale(m, n, h["adjust_lr_fn"]) * O.reshape(p.shape))
            else:
                lr = h["adamw_lr"] if h["adamw_lr"] is not None else h["lr"]
                wd = h["adamw_weight_decay"]
                wd = h["weight_decay"] if wd is None else wd
                adamw_update(p, grads[i], st, lr, h["adamw_betas"], h["adamw_eps"], wd)
        return loss
