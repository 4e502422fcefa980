"""Triton STORM / MARS kernels (``limuon_kernels.triton.storm``) against fp64 formulas.

The kernels compute in fp32 (fp64 when an input is fp64, as the reference does) and round once to
the storage dtype. Without a GPU they run in Triton's interpreter on CPU tensors, which rounds
fp32 → bf16 toward zero (the GPU rounds to nearest even), so bf16 results are held to one bf16 ulp
(2⁻⁷ relative), not half of one.
"""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does the same)

import pytest

pytest.importorskip("triton")

from limuon_kernels import reference
from limuon_kernels.triton import storm
from limuon_kernels.triton._utils import is_interpreted

DEVICE = torch.device("cpu" if is_interpreted(storm._storm_kernel) else "cuda")
SHAPES = [(5, 123), (33, 64), (64, 33), (3, 33, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# One rounding to the storage dtype (relative), plus the arithmetic's error on O(1) inputs (absolute).
RTOL = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
ATOL = {torch.float64: 1e-15, torch.float32: 4e-7}


def shape_id(s):
    return "x".join(map(str, s))


def rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def check(out, ref64, arith=torch.float32):
    """Elementwise: |out − ref| ≤ one rounding to out's dtype + the slack of ``arith`` arithmetic."""
    err = (out.double().cpu() - ref64.cpu()).abs()
    bound = RTOL[out.dtype] * ref64.abs().cpu() + ATOL[arith] * (1 + ref64.abs().max().cpu())
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} (bound at that element exceeded)"


def arith(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def storm64(m, g_new, g_old, mu):
    return g_new.double() + mu * (m.double() - g_old.double())


def mars64(b, g, mu, gamma):
    b_new = mu * b.double() + (1 - gamma) * (1 - mu) / mu * g.double()
    return b_new, gamma * g.double() + mu * b_new


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_storm_update_matches_fp64(shape, dtype, gen):
    m, g_new, g_old = (rand(shape, dtype, gen) for _ in range(3))
    ref = storm64(m, g_new, g_old, 0.95)
    assert storm.storm_update_(m, g_new, g_old, 0.95) is None
    assert m.dtype == dtype and m.shape == shape
    check(m, ref, arith(dtype))


@pytest.mark.parametrize("mu", [0.0, 1.0, 0.3])
def test_storm_update_momentum_edges(mu, gen):
    m, g_new, g_old = (rand((33, 64), torch.float32, gen) for _ in range(3))
    ref = storm64(m, g_new, g_old, mu)
    storm.storm_update_(m, g_new, g_old, mu)
    check(m, ref)


def test_fp32_state_fp64_grads_compute_in_fp64(gen):
    """As the reference: any fp64 input makes the arithmetic fp64 (μ = 0.1 is not an fp32 number)."""
    m = rand((33, 64), torch.float32, gen)
    g_new, g_old = rand((33, 64), torch.float64, gen), rand((33, 64), torch.float64, gen)
    ref = storm64(m, g_new, g_old, 0.1)
    storm.storm_update_(m, g_new, g_old, 0.1)
    check(m, ref, torch.float64)
    b, g = rand((33, 64), torch.float64, gen), rand((33, 64), torch.float64, gen)
    ref_b, ref_d = mars64(b, g, 0.1, 0.3)
    d = storm.mars_update_(b, g, 0.1, 0.3)
    check(b, ref_b, torch.float64)
    check(d, ref_d, torch.float64)


def test_storm_update_fp32_state_bf16_grads(gen):
    m = rand((3, 33, 64), torch.float32, gen)
    g_new, g_old = rand((3, 33, 64), torch.bfloat16, gen), rand((3, 33, 64), torch.bfloat16, gen)
    ref = storm64(m, g_new, g_old, 0.9)
    storm.storm_update_(m, g_new, g_old, 0.9)
    check(m, ref)


def test_storm_update_non_contiguous(gen):
    """A strided view is updated in place (its storage), neighbours untouched; inputs may be views too."""
    base = rand((64, 66), torch.float32, gen)
    m = base[:, 1:65:2].mT  # (32, 64), neither contiguous nor dense
    g_new = rand((64, 32), torch.float32, gen).mT
    g_old = rand((32, 128), torch.float32, gen)[:, ::2]
    before = base.clone()
    ref = storm64(m, g_new, g_old, 0.9)
    storm.storm_update_(m, g_new, g_old, 0.9)
    check(m, ref)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, 1:65:2] = False
    assert torch.equal(base[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_mars_update_matches_fp64(shape, dtype, gen):
    b, g = rand(shape, dtype, gen), rand(shape, dtype, gen)
    ref_b, ref_d = mars64(b, g, 0.95, 0.025)
    d = storm.mars_update_(b, g, 0.95, 0.025)
    assert d.dtype == dtype and d.shape == shape and d.is_contiguous()
    check(b, ref_b, arith(dtype))
    check(d, ref_d, arith(dtype))


def test_mars_update_non_contiguous(gen):
    b = rand((64, 33), torch.float32, gen).mT
    g = rand((33, 128), torch.float32, gen)[:, ::2]
    ref_b, ref_d = mars64(b, g, 0.9, 0.1)
    d = storm.mars_update_(b, g, 0.9, 0.1)
    assert d.is_contiguous()
    check(b, ref_b)
    check(d, ref_d)


def test_empty_and_shape_errors(gen):
    m = torch.empty(0, 7, device=DEVICE)
    storm.storm_update_(m, m.clone(), m.clone(), 0.9)
    a = rand((5, 123), torch.float32, gen)
    with pytest.raises(RuntimeError, match="g_new must have the shape of m"):
        storm.storm_update_(a, a[:, :5], a, 0.9)
    with pytest.raises(RuntimeError, match="g must have the shape of b"):
        storm.mars_update_(a, a[:4], 0.9, 0.1)


@pytest.mark.parametrize("name", ["storm_update_", "mars_update_"])
def test_launcher_signature_is_the_reference_one(name):
    """The dispatcher swaps ``reference.<op>(*args)`` for the launcher: same parameters, same order."""
    assert list(inspect.signature(getattr(storm, name)).parameters) == list(
        inspect.signature(getattr(reference, name)).parameters
    )
