"""Triton low-rank epilogues (``limuon_kernels.triton.lowrank``) against an fp64 oracle.

fp32 and fp64 results must be within 2× the error the plain-PyTorch reference makes in the same
dtype (the flash-attention rule; fp64 data is computed in fp64, as the reference does); bf16
results within one bf16 ulp (the interpreter truncates fp32 → bf16).
"""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does the same)

import pytest

pytest.importorskip("triton")

from limuon_kernels import reference
from limuon_kernels.triton import lowrank
from limuon_kernels.triton._utils import is_interpreted

DEVICE = torch.device("cpu" if is_interpreted(lowrank._lowrank_kernel) else "cuda")
# (lead, m, n, r): r = 20 pads the rank chunk to 32, r = 40 takes two chunks of 32.
CASES = [((), 5, 123, 4), ((), 33, 64, 8), ((), 64, 33, 20), ((3,), 33, 64, 8), ((2,), 17, 48, 40)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
SLACK = {torch.float32: 1e-7, torch.float64: 1e-12}  # of the 2× rule, relative to max |reference|


def case_id(c):
    lead, m, n, r = c
    return "x".join(map(str, (*lead, m, n))) + f"-r{r}"


def make(case, dtype, gen, factor_dtype=None):
    """U, S, V (fp32, or fp64 with fp64 g, unless given) and two gradients in ``dtype``."""
    lead, m, n, r = case
    factor_dtype = factor_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    U, V = rnd(*lead, m, r), rnd(*lead, n, r)
    S = torch.rand(*lead, r, generator=gen) * 3
    g1, g2 = rnd(*lead, m, n).to(dtype), rnd(*lead, m, n).to(dtype)
    return [t.to(DEVICE) for t in (U.to(factor_dtype), S.to(factor_dtype), V.to(factor_dtype), g1, g2)]


def product64(U, S, V):
    return (U.double() * S.double().unsqueeze(-2)) @ V.double().mT


def strided(t):
    """A copy of t whose last dimension has stride 2."""
    view = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2]
    view.copy_(t)
    return view


def assert_2x_rule(out, ref64, torch_out):
    err = (out.double().cpu() - ref64.cpu()).abs().max().item()
    torch_err = (torch_out.double().cpu() - ref64.cpu()).abs().max().item()
    slack = SLACK[out.dtype] * ref64.abs().max().item()
    assert err <= 2 * torch_err + slack, f"kernel error {err:.3g} vs torch's {torch_err:.3g} in {out.dtype}"


def assert_one_ulp(out, ref64, ulp=2.0**-7):
    err = (out.double().cpu() - ref64.cpu()).abs()
    bound = ulp * ref64.abs().cpu() + 1e-6 * (1 + ref64.abs().max().cpu())
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"


def assert_matches(out, ref64, torch_out):
    if out.dtype in SLACK:
        assert_2x_rule(out, ref64, torch_out)
    else:
        assert_one_ulp(out, ref64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lowrank_storm(case, dtype, gen):
    U, S, V, g_new, g_old = make(case, dtype, gen)
    ref = g_new.double() + 0.9 * (product64(U, S, V) - g_old.double())
    out = lowrank.lowrank_storm(U, S, V, g_new, g_old, 0.9)
    assert out.dtype == dtype and out.shape == g_new.shape and out.is_contiguous()
    assert_matches(out, ref, reference.lowrank_storm(U, S, V, g_new, g_old, 0.9))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_lowrank_axpby(case, dtype, gen):
    U, S, V, g, _ = make(case, dtype, gen)
    ref = 0.95 * product64(U, S, V) + 0.05 * g.double()
    out = lowrank.lowrank_axpby(U, S, V, g, 0.95, 0.05)
    assert out.dtype == dtype and out.shape == g.shape and out.is_contiguous()
    assert_matches(out, ref, reference.lowrank_axpby(U, S, V, g, 0.95, 0.05))


def test_bf16_factors(gen):
    """U, S, V stored in bf16 are upcast after the load (the interpreter's bf16 arithmetic is wrong)."""
    U, S, V, g_new, g_old = make(((2,), 33, 64, 8), torch.float32, gen, factor_dtype=torch.bfloat16)
    ref = g_new.double() + 0.5 * (product64(U, S, V) - g_old.double())
    out = lowrank.lowrank_storm(U, S, V, g_new, g_old, 0.5)
    assert_2x_rule(out, ref, reference.lowrank_storm(U, S, V, g_new, g_old, 0.5))


def test_non_contiguous_operands(gen):
    """Every operand is read through its strides: transposed and sliced views give the same result."""
    U, S, V, g_new, g_old = make(((3,), 33, 64, 8), torch.float32, gen)
    Ut, g_new_t = U.mT.contiguous().mT, g_new.mT.contiguous().mT  # column-major
    Ss, Vs, g_old_s = strided(S), strided(V), strided(g_old)  # stride 2 along the last dim
    expected = lowrank.lowrank_storm(U, S, V, g_new, g_old, 0.9)
    out = lowrank.lowrank_storm(Ut, Ss, Vs, g_new_t, g_old_s, 0.9)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out = lowrank.lowrank_axpby(Ut, Ss, Vs, g_new_t, 1.0, -1.0)
    torch.testing.assert_close(out, lowrank.lowrank_axpby(U, S, V, g_new, 1.0, -1.0), rtol=0, atol=0)


def test_shape_errors(gen):
    U, S, V, g_new, g_old = make(((), 33, 64, 8), torch.float32, gen)
    with pytest.raises(RuntimeError, match="V must have shape"):
        lowrank.lowrank_storm(U, S, V[:, :4], g_new, g_old, 0.9)
    with pytest.raises(RuntimeError, match="g_old must have the shape of g_new"):
        lowrank.lowrank_storm(U, S, V, g_new, g_old[:5], 0.9)


@pytest.mark.parametrize("name", ["lowrank_storm", "lowrank_axpby"])
def test_launcher_signature_is_the_reference_one(name):
    """The dispatcher swaps ``reference.<op>(*args)`` for the launcher: same parameters, same order."""
    assert list(inspect.signature(getattr(lowrank, name)).parameters) == list(
        inspect.signature(getattr(reference, name)).parameters
    )
