"""The ``torch.ops.limuon`` registrations: ``torch.library.opcheck`` on each op, and torch.compile.

opcheck calls the op through the dispatcher, so on CPU it exercises the C++ kernels when
``limuon_kernels._C`` is loaded (and the reference kernels otherwise). It compares the fake (meta)
implementation with the real one, including output strides, and checks the mutation annotations.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import limuon_kernels as lk
from limuon_kernels import derive_seed, reference, reference_fused


def randn(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _cases():
    """(op name, case id, args builder) triples; builders take a generator."""
    keller = [3.4445, -4.7750, 2.0315] * 3
    f32, bf16 = torch.float32, torch.bfloat16

    def lowrank(lead, m, n, r, dtype, gen, strided=False):
        U = randn(*lead, m, r, gen=gen)
        S = torch.rand(*lead, r, generator=gen)
        V = randn(*lead, n, r, gen=gen)
        if strided:
            g1 = randn(*lead, n, m, dtype=dtype, gen=gen).mT
            g2 = randn(*lead, m, 2 * n, dtype=dtype, gen=gen)[..., ::2]
        else:
            g1, g2 = randn(*lead, m, n, dtype=dtype, gen=gen), randn(*lead, m, n, dtype=dtype, gen=gen)
        return U, S, V, g1, g2

    return [
        ("newton_schulz", "33x64-f32", lambda g: (randn(33, 64, gen=g), keller, 1e-7, 1.0, None)),
        ("newton_schulz", "b3-64x33-bf16", lambda g: (randn(3, 64, 33, dtype=bf16, gen=g), keller, 1e-7, 1.02, f32)),
        ("newton_schulz", "transposed", lambda g: (randn(64, 33, gen=g).mT, keller, 1e-7, 1.0, torch.bfloat16)),
        ("gram_newton_schulz", "33x64-f32", lambda g: (randn(33, 64, gen=g), keller, 1e-7, 1.0, None, [2])),
        ("gram_newton_schulz", "b3-transposed-bf16",
         lambda g: (randn(3, 64, 33, dtype=bf16, gen=g).mT, keller, 1e-7, 1.02, bf16, [])),
        ("rsvd", "33x64-r4", lambda g: (randn(33, 64, gen=g), 4, 5, 0, [derive_seed(0, 0)])),
        ("rsvd", "b3-64x33-r3-q1", lambda g: (randn(3, 64, 33, gen=g), 3, 2, 1, [11, 12, 13])),
        ("rsvd", "5x123-bf16", lambda g: (randn(5, 123, dtype=bf16, gen=g), 2, 5, 0, [7])),
        ("storm_update_", "b3-33x64", lambda g: (randn(3, 33, 64, gen=g), randn(3, 33, 64, gen=g),
                                                 randn(3, 33, 64, gen=g), 0.9)),
        ("storm_update_", "strided-bf16", lambda g: (randn(64, 33, dtype=bf16, gen=g).mT,
                                                     randn(33, 128, dtype=bf16, gen=g)[:, ::2],
                                                     randn(33, 64, dtype=bf16, gen=g), 0.5)),
        ("mars_update_", "b3-33x64", lambda g: (randn(3, 33, 64, gen=g), randn(3, 33, 64, gen=g), 0.95, 0.025)),
        ("mars_update_", "strided", lambda g: (randn(64, 33, gen=g).mT, randn(64, 33, gen=g).mT, 0.9, 0.1)),
        ("lowrank_storm", "b3-33x64-r4", lambda g: (*lowrank((3,), 33, 64, 4, f32, g), 0.9)),
        ("lowrank_storm", "64x33-bf16", lambda g: (*lowrank((), 64, 33, 4, bf16, g), 0.9)),
        ("lowrank_storm", "strided", lambda g: (*lowrank((), 33, 64, 4, f32, g, strided=True), 0.9)),
        ("lowrank_axpby", "b3-33x64-r4", lambda g: (*lowrank((3,), 33, 64, 4, f32, g)[:4], 0.5, 0.9)),
        ("gaussian_sketch", "123x7", lambda g: (123, 7, 42, torch.device("cpu"))),
        ("lowrank_axpby", "strided-bf16", lambda g: (*lowrank((), 33, 64, 4, bf16, g, strided=True)[:4], 2.0, 0.1)),
        *_fused_cases(keller, lowrank),
    ]


def _fused_cases(keller, lowrank):
    """The fused step ops (fused_ops.py): mutated args (``Tensor(a!)``, a ``Tensor(a!)[]``), skip flags."""
    f32, bf16 = torch.float32, torch.bfloat16
    exact, approx = [0.9, 1.0, -0.9, 1.0, 0.0], [0.9, 0.975 * 0.1 / 0.9, 0.0, 0.9, 0.025]

    def ns_update(B, m, n, gen, restarts=None, with_delta=False, skip=None):
        X = randn(B, m, n, gen=gen)
        W = [randn(2, m, n, gen=gen), randn(n, m, gen=gen).mT, *(randn(m, n, gen=gen) for _ in range(B - 3))]
        delta = randn(B, m, n, gen=gen) if with_delta else None
        return (X, X.square().sum((-2, -1)), W, torch.tensor(0.02), 0.1, 0.2, keller, 1e-7, 1.0, None, restarts,
                skip, delta)

    def rsvd_update(B, m, n, r, gen, skip=None):
        M = randn(B, m, n, gen=gen)
        U, S, V = randn(B, m, r, gen=gen), torch.rand(B, r, generator=gen), randn(B, n, r, gen=gen)
        keys = torch.tensor([derive_seed(0, b) for b in range(B)], dtype=torch.int64)
        return U, S, V, M, 2, 1, keys, torch.arange(B, dtype=torch.int64) + 3, skip

    return [
        ("momentum_ns_input_", "b3-33x64-exact", lambda g: (randn(3, 33, 64, gen=g), randn(3, 33, 64, gen=g),
                                                            randn(3, 33, 64, gen=g), exact, bf16, None)),
        ("momentum_ns_input_", "strided-bf16-approx-skip",
         lambda g: (randn(64, 33, dtype=bf16, gen=g).mT, randn(33, 128, gen=g)[:, ::2], None, approx, f32,
                    torch.tensor(1))),
        ("lowrank_momentum_ns_input", "b3-33x64-r4", lambda g: (*lowrank((3,), 33, 64, 4, f32, g), exact, bf16)),
        ("lowrank_momentum_ns_input", "strided-bf16",
         lambda g: (*lowrank((), 64, 33, 4, bf16, g, strided=True)[:4], None, approx, f32)),
        ("newton_schulz_update_", "b4-33x64-delta", lambda g: ns_update(4, 33, 64, g, with_delta=True)),
        ("newton_schulz_update_", "b3-64x33-gram", lambda g: ns_update(3, 64, 33, g, restarts=[2])),
        ("newton_schulz_update_", "skip", lambda g: ns_update(3, 33, 64, g, with_delta=True, skip=torch.tensor(1))),
        ("rsvd_update_", "b2-33x64-r4", lambda g: rsvd_update(2, 33, 64, 4, g)),
        ("rsvd_update_", "skip", lambda g: rsvd_update(2, 64, 33, 3, g, skip=torch.tensor(True))),
    ]


CASES = _cases()


def test_every_op_has_an_opcheck_case():
    registered = {n.removeprefix("limuon::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("limuon::")}
    assert registered, "no limuon:: ops registered"
    missing = registered - {name for name, _, _ in CASES}
    assert not missing, f"ops without an opcheck case: {sorted(missing)}"


CASE_PARAMS = [pytest.param(op, mk, id=f"{op}-{cid}") for op, cid, mk in CASES]


@pytest.mark.parametrize(("op", "make_args"), CASE_PARAMS)
def test_opcheck(op, make_args, gen):
    torch.library.opcheck(getattr(torch.ops.limuon, op).default, make_args(gen))


def _metadata(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [None if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in outs]


@pytest.mark.parametrize(("op", "make_args"), CASE_PARAMS)
def test_reference_kernel_layout_matches_fake(op, make_args):
    # The reference kernels are the CompositeExplicitAutograd registration: every device without a
    # dedicated kernel runs them through the dispatcher (CPU too when _C is absent, where opcheck
    # would test them), so their outputs must have the shape, dtype and strides the fake promises.
    real = getattr(reference, op, None) or getattr(reference_fused, op)
    real = real(*make_args(torch.Generator().manual_seed(0)))
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                for a in make_args(torch.Generator().manual_seed(0))]
        fake = getattr(torch.ops.limuon, op)(*args)
    assert _metadata(real) == _metadata(fake), "(shape, dtype, stride) of the reference kernel vs the fake"


def _step(m, g_new, g_old, U, S, V):
    lk.storm_update_(m, g_new, g_old, 0.9)
    d = lk.lowrank_storm(U, S, V, g_new, g_old, 0.8)
    _, S2, _ = lk.rsvd(d, 3, seed=5)
    return lk.newton_schulz(m) + lk.newton_schulz(d, coefficients="polar_express", steps=3), S2


def _step_inputs(gen):
    m, g_new, g_old = (randn(3, 33, 64, gen=gen) for _ in range(3))
    return m, g_new, g_old, randn(3, 33, 4, gen=gen), torch.rand(3, 4, generator=gen), randn(3, 64, 4, gen=gen)


def _check_compiled(fullgraph, gen):
    if lk.get_backend() == "triton" and not torch.cuda.is_available():
        # On CPU tensors the Triton kernels run in the interpreter, called straight from Python (on
        # CUDA they go through torch.ops.limuon); Dynamo cannot trace the interpreter.
        pytest.skip("torch.compile cannot trace the Triton interpreter")
    torch._dynamo.reset()
    m, *rest = _step_inputs(gen)
    eager_m = m.clone()
    want = _step(eager_m, *rest)
    # aot_eager traces through the fake kernels (the part that can break) without inductor's C++
    # compile, which would take minutes on the CI machines.
    compiled = torch.compile(_step, backend="aot_eager", fullgraph=fullgraph)
    got = compiled(m, *rest)
    torch.testing.assert_close(m, eager_m, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_torch_compile_matches_eager(backend, gen):
    _check_compiled(fullgraph=False, gen=gen)


def test_torch_compile_fullgraph(backend, gen):
    # No graph breaks: argument checks and backend selection must be traceable by Dynamo.
    _check_compiled(fullgraph=True, gen=gen)
