"""Every limuon_kernels op against a float64 reference written here, on every available backend.

Tolerances (docs/DESIGN.md §4):
  * matmul-heavy ops (Newton–Schulz, the low-rank products, the SVD polar factor): the op's max error
    against the fp64 reference is at most 2× the error of plain PyTorch computing the same formula in
    the same dtype, plus a tiny absolute slack (the flash-attention rule);
  * elementwise ops: the per-dtype table ``ELEMENTWISE_TOL``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import limuon_kernels as lk

SHAPES = [(5, 123), (123, 5), (33, 64), (64, 33), (1, 7)]
LEADS = [(), (1,), (3,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]

KELLER = (3.4445, -4.7750, 2.0315)  # Keller Jordan's Muon post
# Polar Express (Amsel et al. 2025), 5 iterations with the 2% safety factor, as in modded-nanogpt.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
PRESETS = {"keller": ([KELLER] * 5, 1.0), "polar_express": (POLAR_EXPRESS, 1.02)}

# Elementwise ops compute in fp32 (fp64 for fp64) and round once to the output dtype. bf16 keeps 8
# significant bits: round-to-nearest errs by ≤ half an ulp ≤ 2^-8 relative; rtol 4.5e-3 adds room
# for fp32 operation order but not for truncation (up to 2^-7) or for bf16 intermediate arithmetic.
ELEMENTWISE_TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 4.5e-3, "atol": 1e-5},
}
BF16_TRUNCATING_TOL = {"rtol": 8.2e-3, "atol": 1e-5}  # one ulp ≤ 2^-7 relative
# Absolute slack of the 2× rule, relative to the largest reference entry: a few ulps of the
# arithmetic dtype (fp32 for fp32/bf16 outputs), so that two correct computations with different
# summation orders never fail each other.
MATMUL_SLACK = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}


def shape_id(s):
    return f"{s[0]}x{s[1]}"


def lead_id(lead):
    return "b" + "x".join(map(str, lead)) if lead else "nobatch"


def dtype_id(d):
    return str(d).removeprefix("torch.")


def randn(*shape, gen, dtype=torch.float32, device="cpu"):
    """Gaussian tensor drawn in fp64 on the CPU (reproducible everywhere), then cast and moved."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def scaled_batch(lead, m, n, *, gen, dtype, device):
    """Random ``(*lead, m, n)`` matrices, each with a different scale (catches batch-wide norms)."""
    x = torch.randn(*lead, m, n, generator=gen, dtype=torch.float64)
    count = math.prod(lead)
    scales = torch.logspace(-2, 2, count, dtype=torch.float64) if count > 1 else torch.ones(1, dtype=torch.float64)
    x = x * scales.reshape(*lead, 1, 1) if lead else x
    return x.to(device=device, dtype=dtype)


def interpreted_triton_bf16(dtype):
    """True when bf16 results come from the Triton interpreter, which truncates fp32 → bf16.

    Triton 3.9's interpreter rounds toward zero on every fp32 → bf16 conversion (explicit ``.to``,
    ``fp_downcast_rounding="rtne"`` and implicit stores alike); GPUs round to nearest even. There the
    baselines truncate too, and the elementwise tolerance is one bf16 ulp instead of half of one.
    """
    return dtype == torch.bfloat16 and lk.get_backend() == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def cast(x, dtype):
    """``x.to(dtype)`` with the rounding the op under test is subject to (see above)."""
    if interpreted_triton_bf16(dtype) and x.device.type == "cpu":
        bits = x.float().view(torch.int32) & -65536  # keep sign, exponent and the top 7 mantissa bits
        return bits.view(torch.float32).to(dtype)
    return x.to(dtype)


def assert_matmul_close(out, ref, plain, what="", arith=torch.float32):
    """Flash-attention rule: max|out − ref| ≤ 2·max|plain − ref| + slack (ref in fp64).

    ``arith`` is the least precise arithmetic dtype of the computation (it sets the slack).
    """
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    out64, plain64 = out.double().cpu(), plain.double().cpu()
    ref = ref.cpu()
    err = (out64 - ref).abs().max().item()
    base = (plain64 - ref).abs().max().item()
    if interpreted_triton_bf16(out.dtype):  # at least the error of truncating the exact result
        base = max(base, (cast(ref.float(), out.dtype).double() - ref).abs().max().item())
    slack = MATMUL_SLACK[arith] * max(1.0, ref.abs().max().item())
    assert err <= 2 * base + slack, (
        f"{what}: max error {err:.3e} vs the fp64 reference exceeds 2 x plain PyTorch's {base:.3e} + {slack:.1e}"
    )


def assert_elementwise_close(out, ref, dtype):
    """``out`` (stored in ``dtype``) against the fp64 ``ref`` with the tolerance of ``dtype``."""
    tol = BF16_TRUNCATING_TOL if interpreted_triton_bf16(dtype) else ELEMENTWISE_TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), **tol)


# -- Newton–Schulz references ---------------------------------------------------------------------


def ns_fp64(G, triples, norm_scale=1.0, eps=1e-7):
    """Newton–Schulz in float64, one matrix at a time, straight from docs/ALGORITHM.md §3."""
    m, n = G.shape[-2:]
    outs = []
    for X in G.double().cpu().reshape(-1, m, n):
        transposed = m > n
        if transposed:
            X = X.T
        X = X / max(norm_scale * torch.linalg.matrix_norm(X).item(), eps)
        for a, b, c in triples:
            A = X @ X.T
            X = a * X + (b * A + c * (A @ A)) @ X
        outs.append(X.T if transposed else X)
    return torch.stack(outs).reshape(G.shape)


def ns_plain(G, triples, norm_scale, eps, compute_dtype):
    """Plain PyTorch Newton–Schulz as torch.optim.Muon writes it, matmuls in ``compute_dtype``."""
    X = G.float()
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    norm = torch.linalg.matrix_norm(X, keepdim=True)
    X = (X / (norm_scale * norm).clamp_min(eps)).to(compute_dtype)
    for a, b, c in triples:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return cast(X, G.dtype)


def known_spectrum(m, n, svals, gen):
    """fp64 ``m×n`` matrix with singular values ``svals`` between random orthogonal factors."""
    k = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return (Q1 * svals) @ Q2.T


# -- Newton–Schulz ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "lead", "dtype"),
    [
        pytest.param("keller", lead, d, id=f"keller-{lead_id(lead)}-{dtype_id(d)}")
        for lead in LEADS
        for d in DTYPES
        if d == torch.float32 or lead != (1,)  # batch of 1: fp32 only, the other dtypes add nothing there
    ]
    + [pytest.param("polar_express", (3,), d, id=f"polar_express-b3-{dtype_id(d)}") for d in DTYPES[:2]],
)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_newton_schulz_matches_fp64(dev, shape, preset, lead, dtype, gen):
    G = scaled_batch(lead, *shape, gen=gen, dtype=dtype, device=dev)
    triples, scale = PRESETS[preset]
    compute = lk.get_ns_compute_dtype(dev)
    if preset == "polar_express" and min(shape) == 1 and compute != torch.float32:
        # A rank-1 input drives Polar Express's σ through 1.19, 1.27, 0.95, 1.45 (outside the range its
        # coefficients are built for), where every step amplifies rounding: two correct bf16 codes both err
        # by 0.02-0.25 along the way (measured) and which one ends closer is chance. Compare in fp32 there.
        compute = torch.float32
    out = lk.newton_schulz(G, coefficients=preset, compute_dtype=compute)
    assert out.shape == G.shape and out.dtype == dtype and out.device == G.device
    assert out.is_contiguous()
    ref = ns_fp64(G, triples, scale)
    plain = ns_plain(G, triples, scale, 1e-7, compute)
    assert_matmul_close(out, ref, plain, f"newton_schulz {preset}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "batch_transposed"])
def test_newton_schulz_noncontiguous(dev, layout, dtype, gen):
    if layout == "transposed":
        G = randn(64, 33, gen=gen, dtype=dtype, device=dev).mT  # (33, 64), column-major
    elif layout == "sliced":
        G = randn(2, 70, 130, gen=gen, dtype=dtype, device=dev)[:, 3:36, 1:129:2]  # (2, 33, 64)
    else:
        G = randn(64, 3, 5, gen=gen, dtype=dtype, device=dev).permute(1, 2, 0)  # (3, 5, 64)
    assert not G.is_contiguous()
    G_before = G.clone()
    out = lk.newton_schulz(G)
    assert torch.equal(G, G_before), "newton_schulz modified its input"
    ref = ns_fp64(G, [KELLER] * 5)
    plain = ns_plain(G, [KELLER] * 5, 1.0, 1e-7, lk.get_ns_compute_dtype(dev))
    assert_matmul_close(out, ref, plain, f"newton_schulz {layout}")


# Observed over these shapes and conditions 1–30: keller 0.68–1.14, polar_express 0.86–1.14.
@pytest.mark.parametrize(
    ("preset", "band"), [("keller", (0.65, 1.2)), ("polar_express", (0.8, 1.2))], ids=["keller", "polar_express"]
)
@pytest.mark.parametrize("shape", [*SHAPES, (48, 48)], ids=shape_id)
def test_newton_schulz_singular_value_band(dev, preset, band, shape, gen):
    m, n = shape
    k = min(m, n)
    svals = torch.logspace(0, -1, k, dtype=torch.float64)  # condition number 10
    G = known_spectrum(m, n, svals, gen).float().to(dev)
    sv = torch.linalg.svdvals(lk.newton_schulz(G, coefficients=preset).double().cpu())
    assert band[0] <= sv.min().item() and sv.max().item() <= band[1], (sv.min().item(), sv.max().item())


@pytest.mark.parametrize("shape", [(33, 64), (64, 33), (1, 7)], ids=shape_id)
def test_newton_schulz_user_triple_converges_to_polar_factor(dev, shape, gen):
    # The cubic Newton–Schulz iteration X ← 1.5 X − 0.5 X Xᵀ X converges to U Vᵀ: checks that a
    # user's (a, b, c) is applied as a·X + (b·A + c·A²)·X, independently of any NS code (a wrong
    # reading of the triple is off by order 1; fp32 normalisation costs ~1e-7, hence atol 1e-6).
    m, n = shape
    G = known_spectrum(m, n, torch.logspace(0, -1, min(m, n), dtype=torch.float64), gen)
    out = lk.newton_schulz(G.to(dev), steps=30, coefficients=(1.5, -0.5, 0.0), compute_dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(out.cpu(), U @ Vh, rtol=0, atol=1e-6)


def test_newton_schulz_float64_converges_to_float64_polar_factor(dev, gen):
    # compute_dtype=float64 means fp64 throughout: normalising in fp32 would cap the accuracy at ~2e-8.
    G = known_spectrum(33, 64, torch.logspace(0, -1, 33, dtype=torch.float64), gen)
    out = lk.newton_schulz(G.to(dev), steps=30, coefficients=(1.5, -0.5, 0.0), compute_dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(out.cpu(), U @ Vh, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("shape", "dtype"), [pytest.param((33, 64), torch.float32, id="33x64-float32"),
                         pytest.param((64, 33), torch.bfloat16, id="64x33-bfloat16")]
)
def test_newton_schulz_triple_lists(dev, shape, dtype, gen):
    G = randn(3, *shape, gen=gen, dtype=dtype, device=dev)
    cd = lk.get_ns_compute_dtype(dev)
    # Polar Express triples in reverse order, passed as a plain list: catches a kernel that ignores
    # the per-iteration order or the list form.
    triples = POLAR_EXPRESS[::-1]
    out = lk.newton_schulz(G, steps=5, coefficients=[list(t) for t in triples])
    assert_matmul_close(out, ns_fp64(G, triples), ns_plain(G, triples, 1.0, 1e-7, cd), "reversed triples")
    # A list of 3 triples for 3 steps, and one triple repeated.
    three = POLAR_EXPRESS[1:4]
    out = lk.newton_schulz(G, steps=3, coefficients=three)
    assert_matmul_close(out, ns_fp64(G, three), ns_plain(G, three, 1.0, 1e-7, cd), "3 triples")
    out = lk.newton_schulz(G, steps=4, coefficients=[KELLER])
    assert_matmul_close(out, ns_fp64(G, [KELLER] * 4), ns_plain(G, [KELLER] * 4, 1.0, 1e-7, cd), "4 steps")
    # polar_express with fewer steps uses its first triples (and keeps the 1.02 normalisation).
    out = lk.newton_schulz(G, steps=2, coefficients="polar_express")
    ref = ns_fp64(G, POLAR_EXPRESS[:2], 1.02)
    assert_matmul_close(out, ref, ns_plain(G, POLAR_EXPRESS[:2], 1.02, 1e-7, cd), "polar_express 2 steps")


@pytest.mark.parametrize("shape", [(64, 33), (5, 123)], ids=shape_id)
def test_newton_schulz_compute_dtype_override(dev, shape, gen):
    G = randn(3, *shape, gen=gen, dtype=torch.float32, device=dev)
    ref = ns_fp64(G, [KELLER] * 5)
    fp32_err = (ns_plain(G, [KELLER] * 5, 1.0, 1e-7, torch.float32).double().cpu() - ref).abs().max().item()

    out = lk.newton_schulz(G, compute_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    plain_bf16 = ns_plain(G, [KELLER] * 5, 1.0, 1e-7, torch.bfloat16)
    assert_matmul_close(out, ref, plain_bf16, "compute_dtype=bfloat16")
    # bf16 matmuls must be visible in the error, or the override was ignored.
    assert (out.double().cpu() - ref).abs().max().item() > 20 * fp32_err

    out = lk.newton_schulz(G, compute_dtype=torch.float32)
    assert_matmul_close(out, ref, ns_plain(G, [KELLER] * 5, 1.0, 1e-7, torch.float32), "compute_dtype=float32")



# m·n = 4^k and ±1 entries: ‖G‖_F is a power of two, so the fp32 normalisation is exact and fp64
# matmuls must give fp64 accuracy (an fp32 path errs by ~1e-7).
@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (8, 32)], ids=shape_id)
def test_newton_schulz_float64_compute(dev, shape, gen):
    G = (torch.randint(0, 2, (3, *shape), generator=gen, dtype=torch.float64) * 2 - 1).to(dev)
    out = lk.newton_schulz(G, compute_dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), ns_fp64(G, [KELLER] * 5), rtol=0, atol=1e-12)


def test_newton_schulz_default_compute_dtype_follows_setting(dev, gen):
    G = randn(2, 33, 64, gen=gen, device=dev)
    ref = ns_fp64(G, [KELLER] * 5)
    lk.set_ns_compute_dtype(dev.type, torch.bfloat16)
    out = lk.newton_schulz(G)
    assert_matmul_close(out, ref, ns_plain(G, [KELLER] * 5, 1.0, 1e-7, torch.bfloat16), "bf16 default")
    lk.set_ns_compute_dtype(dev.type, torch.float64)
    out = lk.newton_schulz(G)
    assert (out.double().cpu() - ns_fp64(G, [KELLER] * 5)).abs().max().item() < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(64, 33), (1, 7)], ids=shape_id)
def test_newton_schulz_zero_and_tiny(dev, shape, dtype, gen):
    G = randn(3, *shape, gen=gen, dtype=dtype, device=dev)
    G[1] = 0
    out = lk.newton_schulz(G)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[1]) == 0, "a zero matrix must map to zero"
    plain = ns_plain(G, [KELLER] * 5, 1.0, 1e-7, lk.get_ns_compute_dtype(dev))
    assert_matmul_close(out, ns_fp64(G, [KELLER] * 5), plain, "batch with a zero matrix")
    # Below eps the input is divided by eps instead of its norm.
    tiny = (G.double() * 1e-9).to(dtype)
    out = lk.newton_schulz(tiny, eps=1e-7)
    plain = ns_plain(tiny, [KELLER] * 5, 1.0, 1e-7, lk.get_ns_compute_dtype(dev))
    assert_matmul_close(out, ns_fp64(tiny, [KELLER] * 5, eps=1e-7), plain, "norm below eps")


# -- orthogonalize_svd ----------------------------------------------------------------------------


def polar_fp64(G, rank=None):
    U, _, Vh = torch.linalg.svd(G.double().cpu(), full_matrices=False)
    if rank is not None:
        U, Vh = U[..., :rank], Vh[..., :rank, :]
    return U @ Vh


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead", LEADS, ids=lead_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_orthogonalize_svd(device, shape, lead, dtype, gen):
    m, n = shape
    G = torch.stack(
        [known_spectrum(m, n, torch.logspace(0, -1.5, min(m, n), dtype=torch.float64), gen) for _ in range(3)]
    )[: math.prod(lead)].reshape(*lead, m, n)
    G = G.to(device=device, dtype=dtype)
    out = lk.orthogonalize_svd(G)
    assert out.shape == G.shape and out.dtype == dtype
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    assert_matmul_close(out, polar_fp64(G), (U @ Vh).to(dtype), "orthogonalize_svd")


def test_orthogonalize_svd_zero_and_rank_deficient(device):
    gen = torch.Generator().manual_seed(7)
    # Small integer factors: G is exactly rank 3 in fp32, so its 4th singular value is roundoff.
    A = torch.randint(-3, 4, (9, 3), generator=gen).float()
    B = torch.randint(-3, 4, (3, 12), generator=gen).float()
    G = torch.stack([A @ B, torch.zeros(9, 12)]).to(device)
    out = lk.orthogonalize_svd(G)
    assert torch.count_nonzero(out[1]) == 0
    torch.testing.assert_close(out[0].double().cpu(), polar_fp64(G[0], rank=3), rtol=0, atol=1e-5)


# -- storm_update_ --------------------------------------------------------------------------------


def storm_fp64(m, g_new, g_old, mu):
    return g_new.double() + mu * (m.double() - g_old.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead", LEADS, ids=lead_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_storm_update(dev, shape, lead, dtype, gen):
    m, g_new, g_old = (randn(*lead, *shape, gen=gen, dtype=dtype, device=dev) for _ in range(3))
    ref = storm_fp64(m, g_new, g_old, 0.9)
    g_new_before, g_old_before = g_new.clone(), g_old.clone()
    out = lk.storm_update_(m, g_new, g_old, 0.9)
    assert out is m
    assert m.dtype == dtype
    assert_elementwise_close(m, ref, dtype)
    assert torch.equal(g_new, g_new_before) and torch.equal(g_old, g_old_before)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
def test_storm_update_momentum_edges(dev, momentum, gen):
    m, g_new, g_old = (randn(3, 33, 64, gen=gen, device=dev) for _ in range(3))
    ref = storm_fp64(m, g_new, g_old, momentum)
    lk.storm_update_(m, g_new, g_old, momentum)
    assert_elementwise_close(m, ref, torch.float32)
    if momentum == 0.0:
        assert torch.equal(m, g_new)


def test_storm_update_mixed_dtypes(dev, gen):
    # fp32 momentum with bf16 gradients: the wrapper accepts it, so it must be exact in fp32 terms.
    m = randn(3, 33, 64, gen=gen, device=dev)
    g_new, g_old = (randn(3, 33, 64, gen=gen, dtype=torch.bfloat16, device=dev) for _ in range(2))
    ref = storm_fp64(m, g_new, g_old, 0.95)
    lk.storm_update_(m, g_new, g_old, 0.95)
    assert m.dtype == torch.float32
    assert_elementwise_close(m, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_storm_update_noncontiguous(dev, dtype, gen):
    base = randn(3, 40, 140, gen=gen, dtype=dtype, device=dev)
    base_before = base.clone()
    m = base[:, 1:34, 5:138:2]  # (3, 33, 67), strided view: must be updated in place
    g_new = randn(3, 67, 33, gen=gen, dtype=dtype, device=dev).mT
    g_old = randn(1, 1, 67, gen=gen, dtype=dtype, device=dev).expand(3, 33, 67)  # stride 0
    ref = storm_fp64(m, g_new, g_old, 0.9)
    lk.storm_update_(m, g_new, g_old, 0.9)
    assert_elementwise_close(base[:, 1:34, 5:138:2], ref, dtype)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, 1:34, 5:138:2] = False
    assert torch.equal(base[untouched], base_before[untouched]), "wrote outside the view"


# -- mars_update_ ---------------------------------------------------------------------------------


def mars_fp64(b, g, mu, gamma):
    b_new = mu * b.double() + (1 - gamma) * (1 - mu) / mu * g.double()
    return b_new, gamma * g.double() + mu * b_new


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead", LEADS, ids=lead_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_mars_update(dev, shape, lead, dtype, gen):
    b, g = (randn(*lead, *shape, gen=gen, dtype=dtype, device=dev) for _ in range(2))
    b_ref, d_ref = mars_fp64(b, g, 0.95, 0.025)
    g_before = g.clone()
    d = lk.mars_update_(b, g, 0.95, 0.025)
    assert d.shape == g.shape and d.dtype == dtype and b.dtype == dtype
    assert_elementwise_close(b, b_ref, dtype)
    assert_elementwise_close(d, d_ref, dtype)
    assert torch.equal(g, g_before)


@pytest.mark.parametrize(("momentum", "gamma"), [(0.5, 0.5), (1.0, 0.0), (0.9, 1.0), (0.01, 0.025)])
def test_mars_update_hyperparameters(dev, momentum, gamma, gen):
    b, g = (randn(3, 33, 64, gen=gen, device=dev) for _ in range(2))
    b_ref, d_ref = mars_fp64(b, g, momentum, gamma)
    d = lk.mars_update_(b, g, momentum, gamma)
    assert_elementwise_close(b, b_ref, torch.float32)
    assert_elementwise_close(d, d_ref, torch.float32)


def test_mars_update_equals_mars_recursion(dev, gen):
    # docs/ALGORITHM.md §2: with b_0 = (1−γ)/μ·g_0, d_t equals the MARS momentum
    #   c_t = g_t + γ·μ/(1−μ)·(g_t − g_{t−1});  M_t = μ M_{t−1} + (1−μ) c_t,  M_0 = g_0.
    mu, gamma = 0.95, 0.025
    gs = [randn(33, 64, gen=gen, dtype=torch.float64) for _ in range(6)]
    b = ((1 - gamma) / mu * gs[0]).float().to(dev)
    M = gs[0]
    for t in range(1, len(gs)):
        c = gs[t] + gamma * mu / (1 - mu) * (gs[t] - gs[t - 1])
        M = mu * M + (1 - mu) * c
        d = lk.mars_update_(b, gs[t].float().to(dev), mu, gamma)
        torch.testing.assert_close(d.double().cpu(), M, rtol=1e-5, atol=1e-5)


def test_elementwise_ops_on_empty_shards(dev):
    # Under FSDP2 a rank may hold no rows of a matrix: the elementwise ops then see (B, 0, n) and
    # must neither fail nor launch anything.
    empty = torch.zeros(2, 0, 16, device=dev)
    assert lk.storm_update_(empty.clone(), empty, empty, 0.9).shape == (2, 0, 16)
    assert lk.mars_update_(empty.clone(), empty, 0.9, 0.1).shape == (2, 0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_mars_update_noncontiguous(dev, dtype, gen):
    base = randn(3, 40, 140, gen=gen, dtype=dtype, device=dev)
    base_before = base.clone()
    b = base[:, 1:34, 5:138:2]
    g = randn(3, 67, 33, gen=gen, dtype=dtype, device=dev).mT
    b_ref, d_ref = mars_fp64(b, g, 0.9, 0.1)
    d = lk.mars_update_(b, g, 0.9, 0.1)
    assert_elementwise_close(d, d_ref, dtype)
    assert_elementwise_close(base[:, 1:34, 5:138:2], b_ref, dtype)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, 1:34, 5:138:2] = False
    assert torch.equal(base[untouched], base_before[untouched]), "wrote outside the view"


# -- lowrank_storm / lowrank_axpby ----------------------------------------------------------------


def lowrank_inputs(lead, m, n, *, gen, dtype, factor_dtype, device, rank=4):
    r = min(rank, m, n)
    U = randn(*lead, m, r, gen=gen, dtype=factor_dtype, device=device)
    S = torch.rand(*lead, r, generator=gen, dtype=torch.float64).sort(dim=-1, descending=True).values * 3
    V = randn(*lead, n, r, gen=gen, dtype=factor_dtype, device=device)
    g1 = randn(*lead, m, n, gen=gen, dtype=dtype, device=device)
    g2 = randn(*lead, m, n, gen=gen, dtype=dtype, device=device)
    return U, S.to(device=device, dtype=factor_dtype), V, g1, g2


def lowrank_arith(dtype, fdtype):
    """fp64 arithmetic only when the gradient and the factors are fp64; fp32 otherwise."""
    return torch.float64 if dtype == fdtype == torch.float64 else torch.float32


def dense_fp64(U, S, V):
    return (U.double().cpu() * S.double().cpu().unsqueeze(-2)) @ V.double().cpu().mT


# (g dtype, factor dtype): rsvd returns fp32 factors whatever the gradient dtype; factors in the
# gradient's own dtype are the other case a user can pass.
DTYPE_PAIRS = [
    pytest.param(d, f, id=f"{dtype_id(d)}-{dtype_id(f)}factors")
    for d in DTYPES
    for f in dict.fromkeys([torch.float32, d])
]


@pytest.mark.parametrize(("dtype", "fdtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("lead", LEADS, ids=lead_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_lowrank_storm(dev, shape, lead, dtype, fdtype, gen):
    U, S, V, g_new, g_old = lowrank_inputs(lead, *shape, gen=gen, dtype=dtype, factor_dtype=fdtype, device=dev)
    out = lk.lowrank_storm(U, S, V, g_new, g_old, 0.9)
    assert out.shape == g_new.shape and out.dtype == dtype
    ref = g_new.double().cpu() + 0.9 * (dense_fp64(U, S, V) - g_old.double().cpu())
    plain = cast(g_new + 0.9 * ((U * S.unsqueeze(-2)) @ V.mT - g_old), dtype)
    assert_matmul_close(out, ref, plain, "lowrank_storm", arith=lowrank_arith(dtype, fdtype))


@pytest.mark.parametrize(("dtype", "fdtype"), DTYPE_PAIRS)
@pytest.mark.parametrize("lead", LEADS, ids=lead_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_lowrank_axpby(dev, shape, lead, dtype, fdtype, gen):
    U, S, V, g, _ = lowrank_inputs(lead, *shape, gen=gen, dtype=dtype, factor_dtype=fdtype, device=dev)
    alpha, beta = 0.7, -1.3
    out = lk.lowrank_axpby(U, S, V, g, alpha, beta)
    assert out.shape == g.shape and out.dtype == dtype
    ref = alpha * dense_fp64(U, S, V) + beta * g.double().cpu()
    plain = cast(alpha * ((U * S.unsqueeze(-2)) @ V.mT) + beta * g, dtype)
    assert_matmul_close(out, ref, plain, "lowrank_axpby", arith=lowrank_arith(dtype, fdtype))


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 1.0), (1.0, 0.0), (0.05, 0.95)])
def test_lowrank_axpby_coefficients(dev, alpha, beta, gen):
    U, S, V, g, _ = lowrank_inputs((3,), 33, 64, gen=gen, dtype=torch.float32, factor_dtype=torch.float32, device=dev)
    out = lk.lowrank_axpby(U, S, V, g, alpha, beta)
    ref = alpha * dense_fp64(U, S, V) + beta * g.double().cpu()
    plain = alpha * ((U * S.unsqueeze(-2)) @ V.mT) + beta * g
    assert_matmul_close(out, ref, plain, f"lowrank_axpby alpha={alpha} beta={beta}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_lowrank_ops_noncontiguous(dev, dtype, gen):
    m, n, r = 33, 67, 5
    U = randn(3, m, 2 * r, gen=gen, device=dev)[..., ::2]  # (3, m, r), strided columns
    V = randn(3, r, n, gen=gen, device=dev).mT  # (3, n, r), column-major
    S = torch.rand(1, r, generator=gen).to(dev).expand(3, r)  # stride 0 across the batch
    g_new = randn(3, n, m, gen=gen, dtype=dtype, device=dev).mT
    g_old = randn(3, m + 4, n + 3, gen=gen, dtype=dtype, device=dev)[:, 2 : m + 2, 1 : n + 1]
    dense = dense_fp64(U, S, V)
    plain_dense = (U * S.unsqueeze(-2)) @ V.mT

    out = lk.lowrank_storm(U, S, V, g_new, g_old, 0.8)
    ref = g_new.double().cpu() + 0.8 * (dense - g_old.double().cpu())
    assert_matmul_close(out, ref, cast(g_new + 0.8 * (plain_dense - g_old), dtype), "lowrank_storm strided")

    out = lk.lowrank_axpby(U, S, V, g_old, 2.0, 0.5)
    ref = 2.0 * dense + 0.5 * g_old.double().cpu()
    assert_matmul_close(out, ref, cast(2.0 * plain_dense + 0.5 * g_old, dtype), "lowrank_axpby strided")


# -- multi-threaded C++ kernels -----------------------------------------------------------------------


@pytest.mark.skipif("cpp" not in lk.available_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpp_kernels_multithreaded(dtype, threads, gen):
    # The suite runs single-threaded (conftest); here the tensors exceed ATen's 32768-element grain
    # and have ragged tails, so the C++ kernels split work across 2 threads (at::parallel_for).
    threads(2)
    lk.set_backend("cpp")
    dev = torch.device("cpu")
    shape = (3, 129, 301)
    m, g_new, g_old = (randn(*shape, gen=gen, dtype=dtype, device=dev) for _ in range(3))
    ref = storm_fp64(m, g_new, g_old, 0.9)
    lk.storm_update_(m, g_new, g_old, 0.9)
    assert_elementwise_close(m, ref, dtype)

    b_ref, d_ref = mars_fp64(m, g_new, 0.95, 0.025)
    d = lk.mars_update_(m, g_new, 0.95, 0.025)
    assert_elementwise_close(m, b_ref, dtype)
    assert_elementwise_close(d, d_ref, dtype)

    U, S, V, g1, g2 = lowrank_inputs((3,), 129, 301, gen=gen, dtype=dtype, factor_dtype=torch.float32,
                                     device=dev, rank=8)
    out = lk.lowrank_storm(U, S, V, g1, g2, 0.9)
    ref = g1.double().cpu() + 0.9 * (dense_fp64(U, S, V) - g2.double().cpu())
    assert_matmul_close(out, ref, cast(g1 + 0.9 * ((U * S.unsqueeze(-2)) @ V.mT - g2), dtype), "lowrank_storm")
    out = lk.lowrank_axpby(U, S, V, g1, 0.5, 2.0)
    ref = 0.5 * dense_fp64(U, S, V) + 2.0 * g1.double().cpu()
    assert_matmul_close(out, ref, cast(0.5 * ((U * S.unsqueeze(-2)) @ V.mT) + 2.0 * g1, dtype), "lowrank_axpby")

    G = randn(*shape, gen=gen, dtype=dtype, device=dev)
    plain = ns_plain(G, [KELLER] * 5, 1.0, 1e-7, lk.get_ns_compute_dtype(dev))
    assert_matmul_close(lk.newton_schulz(G), ns_fp64(G, [KELLER] * 5), plain, "newton_schulz")
