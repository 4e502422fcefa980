"""Plain-PyTorch reference kernels: the ground truth for tests and the fallback on every device.

Every function here implements one ``limuon::`` op exactly as ``ops.py`` documents it. They favour
clarity over speed, but they are also what runs when neither the C++ nor the Triton kernels are
available, so they avoid needless copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# -- Newton–Schulz -------------------------------------------------------------------------------


def _ns_input(G: Tensor, eps: float, norm_scale: float, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``G: (..., m, n)`` as ``X: (B, p, q)``, p = min(m, n) (transposed when m > n), normalised per matrix.

        X = G / max(norm_scale·‖G‖_F, eps)
    The norm and the division run in at least fp32 before the cast to ``dtype``: cast first, and an
    fp16 gradient of 1e-6-sized entries (fp16's smallest normal is 6e-5) would lose its digits.
    """
    m, n = G.shape[-2], G.shape[-1]
    X = G.reshape(-1, m, n)
    transposed = m > n
    if transposed:
        X = X.mT
    # fp64 input stays fp64, so an fp64 run is fp64 throughout
    Xf = X.to(torch.promote_types(X.dtype, torch.float32))
    norms = torch.linalg.vector_norm(Xf, dim=(-2, -1), keepdim=True)
    return (Xf / (norms * norm_scale).clamp_min(eps)).to(dtype), transposed


def _ns_output(X: Tensor, transposed: bool, G: Tensor) -> Tensor:
    if transposed:
        X = X.mT
    return X.to(G.dtype).reshape(G.shape).contiguous()


def _sym_poly(A: Tensor, b: float, c: float) -> Tensor:
    """``b·A + c·A·A``. Not ``baddbmm`` with ``alpha=0``: ATen's CPU baddbmm in bf16/fp16 then returns
    ``A`` unscaled (torch 2.13), which breaks the classic cubic iteration (c = 0) in half precision."""
    return A * b if c == 0 else torch.baddbmm(A, A, A, beta=b, alpha=c)


def newton_schulz(
    G: Tensor,
    coefficients: Sequence[float],
    eps: float,
    norm_scale: float,
    compute_dtype: torch.dtype | None,
) -> Tensor:
    """Newton–Schulz orthogonalisation of every matrix in ``G: (..., m, n)``.

    ``coefficients`` is the flat list ``[a_1, b_1, c_1, a_2, ...]``, one triple per iteration:
        X ← G / max(norm_scale·‖G‖_F, eps)            (norm in fp32, per matrix)
        A = X Xᵀ;  B = b·A + c·A·A;  X ← a·X + B·X     (Gram side is min(m, n))
    Matmuls run in ``compute_dtype`` (``None``: G's dtype). Returns a tensor of G's shape and dtype.
    """
    X, transposed = _ns_input(G, eps, norm_scale, compute_dtype or G.dtype)
    return _ns_output(ns_iterate(X, coefficients), transposed, G)


def ns_iterate(X: Tensor, coefficients: Sequence[float]) -> Tensor:
    """The iterations of ``newton_schulz`` on a normalised ``X: (B, p, q)``, p ≤ q, in X's dtype."""
    for i in range(0, len(coefficients), 3):
        a, b, c = coefficients[i], coefficients[i + 1], coefficients[i + 2]
        A = torch.bmm(X, X.mT)
        X = torch.baddbmm(X, _sym_poly(A, b, c), X, beta=a)
    return X


def _gram(X: Tensor, state: torch.dtype) -> Tensor:
    """``X Xᵀ`` in the state dtype; half-precision products are exact in fp32, as on tensor cores."""
    Xs = X.to(state)
    return torch.bmm(Xs, Xs.mT)


def gram_newton_schulz(
    G: Tensor,
    coefficients: Sequence[float],
    eps: float,
    norm_scale: float,
    compute_dtype: torch.dtype | None,
    restarts: Sequence[int],
) -> Tensor:
    """Newton–Schulz on the ``p×p`` Gram matrix (p = min(m, n)): the same iteration as ``newton_schulz``.

    Every iterate is ``X_k = Q_k X_0`` with ``Q_k`` a polynomial in ``R_0 = X_0 X_0ᵀ``, and all those
    polynomials commute, so with ``p_k(R) = a_k·I + b_k·R + c_k·R²``:
        R ← X Xᵀ;  Q ← I
        per iteration:  P = p_k(R);  Q ← P·Q;  R ← R·P²        (p×p only: ~8p³ flops, not 4p²q + 2p³)
                        (R symmetrised by mirroring its upper triangle; Q kept as computed)
        after the iterations listed in ``restarts``:  X ← Q·X;  R ← X Xᵀ;  Q ← I
        result: Q·X
    R drifts from Q R_0 Q in finite precision, its small eigenvalues (σ², so the condition number is
    squared) most; a restart recomputes it from X, whose small singular values have grown by then.
    ``R``, ``P``, ``Q`` are kept in at least fp32 (p×p, cheap); the p×q products take their operands
    in ``compute_dtype``. The last iteration skips its R update and the first its P·Q product.
    """
    dtype = compute_dtype or G.dtype
    X, transposed = _ns_input(G, eps, norm_scale, dtype)
    return _ns_output(gram_ns_iterate(X, coefficients, restarts), transposed, G)


def gram_ns_iterate(X: Tensor, coefficients: Sequence[float], restarts: Sequence[int]) -> Tensor:
    """The iterations of ``gram_newton_schulz`` on a normalised ``X: (B, p, q)``, p ≤ q, in X's dtype."""
    steps = len(coefficients) // 3
    restarts = list(restarts)
    if restarts != sorted(set(restarts)) or not all(0 < r < steps for r in restarts):
        raise ValueError(f"restarts must be increasing iteration counts in [1, {steps - 1}], got {restarts}")
    dtype = X.dtype
    state = torch.promote_types(dtype, torch.float32)
    restart_after = set(restarts)
    R = _gram(X, state)
    Q = None  # the identity
    for k in range(steps):
        a, b, c = coefficients[3 * k], coefficients[3 * k + 1], coefficients[3 * k + 2]
        P = _sym_poly(R, b, c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else torch.bmm(P, Q)
        if k + 1 in restart_after:
            X = torch.bmm(Q.to(dtype), X)
            R = _gram(X, state)
            Q = None
        elif k + 1 < steps:
            R = torch.bmm(R, torch.bmm(P, P))
            # R·P² is symmetric only up to rounding; keeping its upper triangle (as the Triton kernel,
            # which computes only those tiles) halved the fp32 error at condition 1e-3
            R = R.triu() + R.triu(1).mT
    if Q is not None:
        X = torch.bmm(Q.to(dtype), X)
    return X


# -- Randomized SVD ------------------------------------------------------------------------------


def gaussian_sketch(n: int, k: int, seed: int, device: torch.device) -> Tensor:
    """Ω ~ N(0, 1)^{n×k} in fp32, from a CPU generator seeded with ``seed``.

    Generated on the CPU (then moved) so the same seed gives the same Ω on every device and in the
    C++ kernel, which draws from the same CPU generator (mt19937).
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=torch.float32).to(device)


def rsvd(
    M: Tensor, rank: int, oversample: int, power_iters: int, seeds: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD (Halko–Martinsson–Tropp) of every matrix in ``M: (..., m, n)``, in fp32.

        Ω_i ~ N(0,1)^{n×k} seeded by seeds[i], k = min(rank + oversample, m, n);  Y = M Ω
        q times: Q = qr(Y);  Z = qr(Mᵀ Q);  Y = M Z               (power iterations)
        Q = qr(Y);  B = Qᵀ M;  (Ũ, Σ, Vᵀ) = svd(B);  U = Q Ũ
    Returns ``U: (..., m, rank)``, ``S: (..., rank)``, ``V: (..., n, rank)`` (fp32).
    """
    m, n = M.shape[-2], M.shape[-1]
    lead = M.shape[:-2]
    Mb = M.reshape(-1, m, n).float()
    k = min(rank + oversample, m, n)
    # Through the op (not a direct call): a torch.Generator is opaque to torch.compile, an op is not.
    omega = torch.stack([torch.ops.limuon.gaussian_sketch(n, k, int(s), M.device) for s in seeds])
    Y = torch.bmm(Mb, omega)
    for _ in range(power_iters):
        Q = torch.linalg.qr(Y).Q
        Z = torch.linalg.qr(torch.bmm(Mb.mT, Q)).Q
        Y = torch.bmm(Mb, Z)
    Q = torch.linalg.qr(Y).Q
    B = torch.bmm(Q.mT, Mb)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = torch.bmm(Q, Ub[..., :rank])
    return (
        U.reshape(*lead, m, rank).contiguous(),
        S[..., :rank].reshape(*lead, rank).contiguous(),
        Vh[..., :rank, :].mT.reshape(*lead, n, rank).contiguous(),
    )


# -- Elementwise momentum updates ----------------------------------------------------------------


def _acc(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype: fp32 for half types and fp32, fp64 for fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def storm_update_(m: Tensor, g_new: Tensor, g_old: Tensor, momentum: float) -> None:
    """In place: ``m ← g_new + momentum·(m − g_old)`` (fp32 or fp64 arithmetic, stored in m's dtype)."""
    out = _acc(g_new) + momentum * (_acc(m) - _acc(g_old))
    m.copy_(out)


def mars_update_(b: Tensor, g: Tensor, momentum: float, gamma: float) -> Tensor:
    """The one-gradient ("approx") LiMuon update in its MARS-M-efficient form.

        b ← μ·b + (1−γ)(1−μ)/μ · g        (in place)
        d = γ·g + μ·b                     (returned, the Newton–Schulz input, in g's dtype)
    """
    gf = _acc(g)
    b_new = momentum * _acc(b) + ((1.0 - gamma) * (1.0 - momentum) / momentum) * gf
    b.copy_(b_new)
    return (gamma * gf + momentum * b_new).to(g.dtype).contiguous()


def lowrank_product(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """``U diag(S) Vᵀ`` for ``U: (..., m, r)``, ``S: (..., r)``, ``V: (..., n, r)`` (fp32)."""
    return torch.matmul(_acc(U) * _acc(S).unsqueeze(-2), _acc(V).mT)


def lowrank_storm(U: Tensor, S: Tensor, V: Tensor, g_new: Tensor, g_old: Tensor, momentum: float) -> Tensor:
    """``g_new + momentum·(U diag(S) Vᵀ − g_old)``, returned in g_new's dtype."""
    out = _acc(g_new) + momentum * (lowrank_product(U, S, V) - _acc(g_old))
    return out.to(g_new.dtype).contiguous()


def lowrank_axpby(U: Tensor, S: Tensor, V: Tensor, g: Tensor, alpha: float, beta: float) -> Tensor:
    """``alpha·U diag(S) Vᵀ + beta·g``, returned in g's dtype."""
    return (alpha * lowrank_product(U, S, V) + beta * _acc(g)).to(g.dtype).contiguous()
