"""The batched Newton–Schulz Triton launcher against an fp64 Newton–Schulz computed here.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (small shapes only). Tolerance
(the flash-attention rule): the kernel's max error against fp64 may be at most twice the error that
plain PyTorch (``reference.newton_schulz``) makes in the same compute dtype, plus one unit of
rounding of that dtype.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: @triton.jit reads it

import pytest

pytest.importorskip("triton")

import triton
import triton.language as tl

from limuon_kernels import reference
from limuon_kernels.ns_coefficients import (
    KELLER,
    POLAR_EXPRESS,
    POLAR_EXPRESS_NORM_SCALE,
)
from limuon_kernels.triton import newton_schulz as tns
from limuon_kernels.triton.newton_schulz import _upper_tile

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-7
PRESETS = {
    "keller": ([x for _ in range(5) for x in KELLER], 1.0),
    "polar_express": ([x for t in POLAR_EXPRESS for x in t], POLAR_EXPRESS_NORM_SCALE),
}
f32, bf16 = torch.float32, torch.bfloat16


def ns_fp64(G, coefficients, eps, norm_scale):
    """Newton–Schulz in fp64, written independently of reference.py."""
    m, n = G.shape[-2:]
    X = G.double()
    if m > n:
        X = X.transpose(-2, -1)
    norm = (X * X).sum(dim=(-2, -1), keepdim=True).sqrt()
    X = X / torch.clamp(norm * norm_scale, min=eps)
    for i in range(0, len(coefficients), 3):
        a, b, c = coefficients[i : i + 3]
        A = X @ X.transpose(-2, -1)
        X = a * X + (b * A + c * (A @ A)) @ X
    if m > n:
        X = X.transpose(-2, -1)
    return X


def assert_flash_rule(out, G, coefficients, norm_scale, compute_dtype):
    exact = ns_fp64(G, coefficients, EPS, norm_scale)
    plain = reference.newton_schulz(G, coefficients, EPS, norm_scale, compute_dtype)
    err = (out.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    slack = torch.finfo(compute_dtype).eps
    assert err <= 2 * err_plain + slack, f"kernel error {err:.3e} > 2 × PyTorch's {err_plain:.3e} + {slack:.1e}"


SHAPES = [(5, 37), (37, 5), (33, 64), (64, 33), (48, 48)]
DTYPES = [(f32, f32), (bf16, bf16), (f32, bf16)]  # (G's dtype, compute dtype)


@pytest.mark.parametrize("preset,batch", [("keller", (3,)), ("polar_express", (1,))], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype,compute", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_fp64(shape, dtype, compute, preset, batch, gen):
    coefficients, norm_scale = PRESETS[preset]
    G = torch.randn(*batch, *shape, generator=gen).to(dtype).to(DEVICE)
    out = tns.newton_schulz(G, coefficients, EPS, norm_scale, compute)
    assert out.shape == G.shape and out.dtype == G.dtype and out.is_contiguous()
    assert_flash_rule(out, G, coefficients, norm_scale, compute)


@pytest.mark.parametrize("shape", [(48, 64), (64, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_many_tiles(shape, gen):
    """16-wide tiles: 3 tiles per side, so off-diagonal pairs, mirror stores and ragged edges."""
    coefficients, norm_scale = PRESETS["keller"][0][:9], 1.0  # first, middle and last iteration
    G = torch.randn(1, *shape, generator=gen).to(DEVICE)
    out = tns._run_ns(G, coefficients, EPS, norm_scale, f32, blocks=(16, 16, 16))
    assert_flash_rule(out, G, coefficients, norm_scale, f32)


@triton.jit
def _upper_tile_probe(out_ptr):
    pid = tl.program_id(0)
    i, j = _upper_tile(pid)
    tl.store(out_ptr + 2 * pid, i)
    tl.store(out_ptr + 2 * pid + 1, j)


def test_upper_tile_enumeration():
    """pid → (i, j) visits every tile pair i <= j of a 40×40 grid exactly once."""
    T = 40
    out = torch.full((T * (T + 1) // 2, 2), -1, dtype=torch.int32, device=DEVICE)
    _upper_tile_probe[(out.shape[0],)](out)
    pairs = {tuple(p) for p in out.tolist()}
    assert pairs == {(i, j) for j in range(T) for i in range(j + 1)}


def test_zero_matrix_gives_zero():
    coefficients, norm_scale = PRESETS["keller"]
    G = torch.zeros(2, 33, 64, device=DEVICE)
    out = tns.newton_schulz(G, coefficients, EPS, norm_scale, f32)
    assert torch.equal(out, torch.zeros_like(G))


def test_normalisation_is_per_matrix(gen):
    """Matrices of very different scale (and a zero one) in one batch: each as if alone."""
    coefficients, norm_scale = PRESETS["polar_express"]
    base = torch.randn(3, 24, 40, generator=gen)
    G = (base * torch.tensor([1e-3, 1e3, 0.0]).view(3, 1, 1)).to(DEVICE)
    out = tns.newton_schulz(G, coefficients, EPS, norm_scale, f32)
    for k in range(3):
        alone = tns.newton_schulz(G[k], coefficients, EPS, norm_scale, f32)
        torch.testing.assert_close(out[k], alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_several_partial_sums_and_leading_dims(gen):
    """> 16 Ki elements per matrix (several partial sums of squares), two leading dims, one step."""
    coefficients = list(KELLER)
    G = torch.randn(2, 1, 40, 500, generator=gen).to(DEVICE)
    out = tns.newton_schulz(G, coefficients, EPS, 1.0, f32)
    assert out.shape == G.shape
    assert_flash_rule(out, G, coefficients, 1.0, f32)


def test_non_contiguous_input(gen):
    coefficients, norm_scale = PRESETS["keller"]
    G = torch.randn(2, 40, 24, generator=gen).to(DEVICE).mT  # (2, 24, 40), strided
    out = tns.newton_schulz(G, coefficients, EPS, norm_scale, f32)
    assert out.is_contiguous()
    assert_flash_rule(out, G, coefficients, norm_scale, f32)


def test_fp64_compute_and_bad_coefficients(gen):
    G = torch.randn(12, 20, generator=gen, dtype=torch.float64).to(DEVICE)
    coefficients = list(KELLER) * 2
    out = tns.newton_schulz(G, coefficients, EPS, 1.0, torch.float64)
    torch.testing.assert_close(out, ns_fp64(G, coefficients, EPS, 1.0))
    with pytest.raises(RuntimeError, match="coefficients"):
        tns.newton_schulz(G.float(), [1.0, 2.0], EPS, 1.0, f32)


# -- real sizes, CUDA only -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["keller", "polar_express"])
@pytest.mark.parametrize("shape", [(768, 768), (768, 3072), (3072, 768), (12, 768, 768)], ids=str)
def test_gpu_model_sizes(shape, preset):
    coefficients, norm_scale = PRESETS[preset]
    gen = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(*shape, device="cuda", generator=gen, dtype=bf16)
    out = tns.newton_schulz(G, coefficients, EPS, norm_scale, bf16)
    assert out.shape == G.shape and out.dtype == bf16
    assert_flash_rule(out, G, coefficients, norm_scale, bf16)
