"""Newton–Schulz in half precision, on every backend: inputs far below fp16's normal range, and the
coefficient triples whose ``c`` is zero.

The oracle is fp64 Newton–Schulz written in test_ops.py; the bound is the flash-attention rule
against a plain fp16 Newton–Schulz written here (normalise in fp64, then cast, then fp16 matmuls).
"""

from __future__ import annotations

import pytest
import torch
from test_ops import KELLER, assert_matmul_close, dtype_id, ns_fp64, randn, shape_id

import limuon_kernels as lk

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32


def ns_half_plain(G, triples, compute_dtype, eps=1e-7):
    """Plain Newton–Schulz: normalised in fp64, then every matmul in ``compute_dtype``."""
    X = G.double().cpu()
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = (X / torch.linalg.matrix_norm(X, keepdim=True).clamp_min(eps)).to(compute_dtype)
    for a, b, c in triples:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if transposed else X).to(G.dtype)


# (G's dtype, compute dtype). fp16 G: the input itself holds subnormals (fp16's smallest normal is
# 6.1e-5, its smallest subnormal 6e-8). fp32/bf16 G with fp16 compute: a kernel that casts G to fp16
# before normalising turns 1e-7-sized entries into subnormals with one or two significant bits.
HALF_CASES = [(f16, f16), (f32, f16), (bf16, f16), (f16, f32)]


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize(("dtype", "compute"), HALF_CASES, ids=lambda d: dtype_id(d))
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=shape_id)
def test_newton_schulz_tiny_entries_in_fp16(dev, shape, dtype, compute, method, gen):
    """1e-7-sized gradients: normalised in fp32 before any fp16 cast, on every backend."""
    G = (randn(2, *shape, gen=gen) * 1e-7).to(dtype)
    assert G.abs().max() < 6.1e-5 and (G != 0).float().mean() > 0.7  # fp16 subnormals, most not zero
    out = lk.newton_schulz(G.to(dev), compute_dtype=compute, method=method)
    triples = [KELLER] * 5
    ref = ns_fp64(G, triples)
    # the scale-free baseline: the same input at unit scale through the plain fp16 computation
    plain = ns_half_plain(G, triples, compute)
    assert_matmul_close(out, ref, plain, f"newton_schulz {method} {dtype}->{compute}")
    # and the result is an orthogonalisation: close to the fp64 iteration in absolute terms
    assert (out.double().cpu() - ref).abs().max().item() < 0.02


@pytest.mark.parametrize("method", ["standard", "gram"])
@pytest.mark.parametrize("compute", [bf16, f16, f32], ids=dtype_id)
def test_newton_schulz_triple_without_cubic_term(dev, compute, method, gen):
    """c = 0 (the classic cubic iteration 1.5·X − 0.5·X Xᵀ X): ATen's CPU ``baddbmm`` in bf16/fp16
    with ``alpha=0`` returns ``self`` unscaled (torch 2.13), which made the iteration diverge."""
    G = randn(2, 32, 96, gen=gen)
    triples = [(1.5, -0.5, 0.0)] * 8
    out = lk.newton_schulz(G.to(dev), steps=8, coefficients=(1.5, -0.5, 0.0), compute_dtype=compute, method=method)
    ref = ns_fp64(G, triples)
    plain = ns_half_plain(G, triples, compute)
    assert_matmul_close(out, ref, plain, f"cubic newton_schulz {method} in {compute}")
