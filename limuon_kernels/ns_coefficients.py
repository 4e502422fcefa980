"""Newton–Schulz coefficient presets and their resolution into one (a, b, c) triple per iteration."""

from __future__ import annotations

from collections.abc import Sequence

# Keller Jordan's Muon post (also torch.optim.Muon's default): one triple, repeated every iteration.
KELLER = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025, arXiv 2505.16932), the 5-iteration schedule with a 2% safety
# factor as used in modded-nanogpt; it expects the input scaled by 1/(1.02·‖X‖_F).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_NORM_SCALE = 1.02

Coefficients = str | Sequence[float] | Sequence[Sequence[float]]


def resolve_coefficients(coefficients: Coefficients, steps: int) -> tuple[list[float], float]:
    """Return the flat per-iteration list ``[a1, b1, c1, a2, ...]`` (3·steps floats) and the norm scale.

    Accepted forms: ``"keller"``; ``"polar_express"`` (steps ≤ 5: its first ``steps`` triples); one
    triple ``(a, b, c)`` repeated ``steps`` times; or a sequence of exactly ``steps`` triples.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid ns_steps: {steps!r}; expected an integer >= 1")
    scale = 1.0
    if isinstance(coefficients, str):
        if coefficients == "keller":
            triples = [KELLER] * steps
        elif coefficients == "polar_express":
            if steps > len(POLAR_EXPRESS):
                raise ValueError(
                    f"Invalid ns_steps: {steps} with ns_coefficients='polar_express', which defines "
                    f"{len(POLAR_EXPRESS)} iterations"
                )
            triples = list(POLAR_EXPRESS[:steps])
            scale = POLAR_EXPRESS_NORM_SCALE
        else:
            raise ValueError(
                f"Invalid ns_coefficients: {coefficients!r}; expected 'keller', 'polar_express', "
                "an (a, b, c) triple or a list of triples"
            )
    else:
        seq = list(coefficients)
        if len(seq) == 3 and all(isinstance(x, (int, float)) for x in seq):
            triples = [tuple(seq)] * steps
        elif seq and all(isinstance(t, Sequence) and len(t) == 3 for t in seq):
            if len(seq) == 1:
                triples = [tuple(seq[0])] * steps
            elif len(seq) == steps:
                triples = [tuple(t) for t in seq]
            else:
                raise ValueError(
                    f"Invalid ns_coefficients: {len(seq)} triples given but ns_steps={steps}; pass one "
                    "triple per iteration, or a single triple to repeat"
                )
        else:
            raise ValueError(
                f"Invalid ns_coefficients: {coefficients!r}; expected 'keller', 'polar_express', "
                "an (a, b, c) triple or a list of triples"
            )
    flat = [float(x) for t in triples for x in t]
    if not all(x == x and abs(x) != float("inf") for x in flat):
        raise ValueError(f"Invalid ns_coefficients: {coefficients!r} contains a non-finite value")
    return flat, scale
