"""The Gram Newton–Schulz Triton launcher against fp64, tile by tile.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (small shapes only), with the
operand roundings of a GPU emulated (bf16/fp16 casts, tf32 for the fp32 state products). Tolerance
(the flash-attention rule): max error against the fp64 *standard* iteration at most twice the error
of plain PyTorch computing the same Gram iteration (``reference.gram_newton_schulz``) in the same
compute dtype, plus one unit of rounding of that dtype.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: @triton.jit reads it

import pytest

pytest.importorskip("triton")

from test_triton_newton_schulz import DEVICE, EPS, PRESETS, ns_fp64

from limuon_kernels import reference
from limuon_kernels.triton import gram_newton_schulz as tg

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16


def assert_flash_rule(out, G, coefficients, norm_scale, compute_dtype, restarts):
    exact = ns_fp64(G.cpu(), coefficients, EPS, norm_scale)
    plain = reference.gram_newton_schulz(G.cpu(), coefficients, EPS, norm_scale, compute_dtype, restarts)
    err = (out.double().cpu() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    slack = torch.finfo(compute_dtype).eps
    assert torch.isfinite(out).all()
    assert err <= 2 * err_plain + slack, f"kernel error {err:.3e} > 2 × PyTorch's {err_plain:.3e} + {slack:.1e}"


@pytest.mark.parametrize(("dtype", "compute"), [(f32, f32), (f32, bf16), (bf16, bf16), (f16, f16)], ids=str)
@pytest.mark.parametrize("shape", [(48, 64), (64, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_many_tiles(shape, dtype, compute, gen):
    """16-wide tiles: 3–4 tiles per side, so off-diagonal tile pairs, mirror stores, ragged edges
    and the restart's p×q buffer."""
    coefficients, norm_scale = PRESETS["polar_express"]
    G = torch.randn(2, *shape, generator=gen).to(dtype).to(DEVICE)
    out = tg.gram_newton_schulz(G, coefficients, EPS, norm_scale, compute, [2], blocks=(16, 16, 16))
    assert out.shape == G.shape and out.dtype == G.dtype and out.is_contiguous()
    assert_flash_rule(out, G, coefficients, norm_scale, compute, [2])


@pytest.mark.parametrize("restarts", [[], [1, 3], [1, 2, 3, 4]], ids=str)
def test_restart_schedules(restarts, gen):
    coefficients, norm_scale = PRESETS["keller"]
    G = torch.randn(3, 24, 40, generator=gen).to(DEVICE)
    out = tg.gram_newton_schulz(G, coefficients, EPS, norm_scale, f32, restarts, blocks=(16, 16, 16))
    assert_flash_rule(out, G, coefficients, norm_scale, f32, restarts)


def test_leading_dims_noncontiguous_and_fp64(gen):
    coefficients, norm_scale = PRESETS["keller"]
    G = torch.randn(2, 1, 40, 24, generator=gen).to(DEVICE).mT  # (2, 1, 24, 40), strided
    out = tg.gram_newton_schulz(G, coefficients, EPS, norm_scale, f32, [2])
    assert out.shape == G.shape and out.is_contiguous()
    assert_flash_rule(out, G, coefficients, norm_scale, f32, [2])
    G64 = G.double()
    out = tg.gram_newton_schulz(G64, coefficients, EPS, norm_scale, torch.float64, [2])
    torch.testing.assert_close(out.cpu(), ns_fp64(G64.cpu(), coefficients, EPS, norm_scale))


def test_bad_arguments(gen):
    G = torch.randn(8, 16, generator=gen).to(DEVICE)
    with pytest.raises(RuntimeError, match="coefficients"):
        tg.gram_newton_schulz(G, [1.0, 2.0], EPS, 1.0, f32, [])
    with pytest.raises(RuntimeError, match="restarts"):
        tg.gram_newton_schulz(G, [1.0, 2.0, 3.0] * 2, EPS, 1.0, f32, [2])


# -- real sizes, CUDA only -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["keller", "polar_express"])
@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (12, 768, 2304)], ids=str)
def test_gpu_model_sizes(shape, preset):
    coefficients, norm_scale = PRESETS[preset]
    gen = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(*shape, device="cuda", generator=gen, dtype=bf16)
    out = tg.gram_newton_schulz(G, coefficients, EPS, norm_scale, bf16, [2])
    assert out.shape == G.shape and out.dtype == bf16
    assert_flash_rule(out, G, coefficients, norm_scale, bf16, [2])
