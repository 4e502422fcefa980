"""Which Newton–Schulz form runs: the standard iteration or the Gram form, and the Gram form's restarts.

Both forms compute the same polynomial of ``X = G/‖G‖``; they differ in cost and rounding. For
``X: p×q`` (p = min(m, n), q = max(m, n)) and K iterations, in multiply–adds ×2 (flops):
    standard:   K·(4p²q + 2p³)
    Gram:       2p²q (R = X Xᵀ) + 2p²q (Q·X) + ~8p³ per iteration (P = p(R), Q ← P·Q, R ← R·P²)
                + 4p²q and a few p³ less per restart (X ← Q·X, R ← X Xᵀ)
With K = 5 and one restart: 20p²q + 10p³ against 8p²q + 28p³, equal at q/p = 1.5. For GPT-2's
768×3072 that is 40.8 against 27.2 GFLOP (1.5×); a square matrix only loses.

The choice is made on the host from shapes, device and dtype only (never from data), so it is the
same on every rank and under ``torch.compile``.
"""

from __future__ import annotations

import torch

NS_METHODS = ("auto", "standard", "gram")

# Restart the Gram iteration (X ← Q·X, R ← X Xᵀ, Q ← I) after iteration 2, then after every third.
# Without a restart R's small eigenvalues (σ², so the condition number squared) drift: measured on
# 96×384 and 256×1024 matrices with singular values down to 1e-6 of the largest, the fp32 error
# against fp64 was up to 5× the bound max(1.5 × the standard method's error, 5e-5) with no restart,
# and at most 0.15× of it with this one; 10 Keller iterations needed the later ones too (0.64×).
_FIRST_RESTART, _RESTART_EVERY = 2, 3

# Gram is used where max(m, n) >= ratio·min(m, n) and min(m, n) >= min_side, for fp32/fp64 compute, per
# device type; other device types and dtypes always use the standard form.
# CPU: measured with bench/bench_kernels.py --ns-methods (C++ kernels, fp32, 2 threads, 2-core Intel
# Xeon with AMX, 2026-12-02), Gram's speedup over standard by min side p and q/p:
#     q/p:      1     1.5    2     3     (4: 768×3072 1.44×, 12×3072×768 1.55×)
#     p=128   0.71   0.84  0.93  1.11
#     p=256   0.74   0.90  1.07  1.24
#     p=512   0.78   0.98  1.05  1.44
# The flop count breaks even at q/p = 1.5; the extra ATen calls and p³ products cost the rest.
# bf16 on the CPU: Gram's fp32 state products made it 0.54× (768×3072) of the bf16 standard form on
# that machine (AMX bf16), and far slower ones are emulated: standard.
# CUDA: not measured (no GPU was available when this was written): the standard form until the bench
# rows have been run on one.
_GRAM_RULE: dict[str, tuple[float, int]] = {"cpu": (2.0, 256)}


def gram_restarts(steps: int) -> list[int]:
    """The iteration counts after which the Gram form restarts: 2, 5, 8, ... below ``steps``."""
    return list(range(_FIRST_RESTART, steps, _RESTART_EVERY))


def resolve_ns_method(method: str, m: int, n: int, device: torch.device | str, compute_dtype: torch.dtype) -> str:
    """``"standard"`` or ``"gram"`` for an ``m×n`` Newton–Schulz on ``device`` in ``compute_dtype``.

    ``method`` is ``"standard"``, ``"gram"`` (returned as given) or ``"auto"``: Gram where it was
    measured to save time on this device type (an aspect-ratio rule, see ``_GRAM_RULE``).
    """
    if method not in NS_METHODS:
        raise ValueError(
            f"Invalid Newton–Schulz method (method / ns_method): {method!r}; expected one of "
            + ", ".join(map(repr, NS_METHODS))
        )
    if method != "auto":
        return method
    rule = _GRAM_RULE.get(torch.device(device).type)
    if rule is None or compute_dtype not in (torch.float32, torch.float64):
        return "standard"
    ratio, min_side = rule
    p, q = min(m, n), max(m, n)
    return "gram" if p >= min_side and q >= ratio * p else "standard"
