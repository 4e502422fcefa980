"""Backend selection, Newton–Schulz coefficient resolution, and argument validation of the public API."""

from __future__ import annotations

import math
import os

import pytest
import torch

import limuon_kernels as lk
from limuon_kernels import _extension, reference
from limuon_kernels import backend as backend_mod
from limuon_kernels.ns_coefficients import resolve_coefficients

TENSOR_ERRORS = (RuntimeError, ValueError)  # torch._check raises RuntimeError; either is fine


@pytest.fixture
def no_selection(monkeypatch):
    """No ``set_backend`` call in effect, and no ``LIMUON_BACKEND`` from the caller's shell."""
    monkeypatch.setattr(backend_mod, "_selected", None)
    monkeypatch.delenv("LIMUON_BACKEND", raising=False)


@pytest.fixture
def without_c_ext(monkeypatch):
    """Simulate a process where ``limuon_kernels._C`` failed to load."""
    monkeypatch.setattr(_extension, "HAS_C_EXT", False)
    monkeypatch.setattr(_extension, "LOAD_ERROR", "simulated: _C is missing")


# -- backend selection ----------------------------------------------------------------------------


def test_available_backends():
    found = lk.available_backends()
    assert found[0] == "torch"
    assert ("cpp" in found) == lk.HAS_C_EXT == _extension.HAS_C_EXT
    assert set(found) <= {"torch", "cpp", "triton"}


@pytest.mark.parametrize("name", ["bogus", "CPP", "", "cuda"])
def test_set_backend_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=f"Invalid backend: {name!r}"):
        lk.set_backend(name)


def test_set_backend_roundtrip(no_selection):
    assert lk.get_backend() == "auto"
    for name in lk.available_backends():
        lk.set_backend(name)
        assert lk.get_backend() == name
    lk.set_backend("auto")
    assert lk.get_backend() == "auto"


def test_cpp_unavailable_is_a_clear_error(without_c_ext, no_selection):
    assert "cpp" not in lk.available_backends()
    with pytest.raises(ValueError, match=r"'cpp' is not available.*simulated: _C is missing"):
        lk.set_backend("cpp")
    # Through the environment variable the error comes at the first op call, and says why.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIMUON_BACKEND", "cpp")
        with pytest.raises(RuntimeError, match=r"'cpp' requested but unavailable: simulated"):
            lk.storm_update_(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.9)


def test_triton_unavailable_is_a_clear_error(monkeypatch, no_selection):
    monkeypatch.setattr(backend_mod, "triton_usable", lambda: False)
    assert "triton" not in lk.available_backends()
    with pytest.raises(ValueError, match="'triton' is not available"):
        lk.set_backend("triton")
    monkeypatch.setenv("LIMUON_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="'triton' requested but unavailable"):
        lk.newton_schulz(torch.randn(4, 4))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch, no_selection):
    monkeypatch.setattr(backend_mod, "triton_usable", lambda: True)
    monkeypatch.setenv("LIMUON_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_mod.resolve(torch.device("cpu"))
    assert backend_mod.resolve(torch.device("cuda")) == "triton"
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        backend_mod.resolve(torch.device("meta"))


def test_env_var_selects_backend(monkeypatch, no_selection):
    monkeypatch.setenv("LIMUON_BACKEND", "torch")
    assert lk.get_backend() == "torch"
    monkeypatch.setenv("LIMUON_BACKEND", "  Torch ")
    assert lk.get_backend() == "torch"
    monkeypatch.setenv("LIMUON_BACKEND", "")
    assert lk.get_backend() == "auto"
    monkeypatch.setenv("LIMUON_BACKEND", "torch")
    lk.set_backend("auto")  # set_backend wins over the environment
    assert lk.get_backend() == "auto"


def test_env_var_invalid_value(monkeypatch, no_selection):
    monkeypatch.setenv("LIMUON_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"LIMUON_BACKEND.*'fastest'"):
        lk.get_backend()
    with pytest.raises(ValueError, match="LIMUON_BACKEND"):
        lk.newton_schulz(torch.randn(4, 4))


@pytest.mark.parametrize("has_c_ext", [True, False], ids=["with_cpp", "without_cpp"])
@pytest.mark.parametrize("has_triton", [True, False], ids=["with_triton", "without_triton"])
def test_auto_resolution(monkeypatch, no_selection, has_c_ext, has_triton):
    monkeypatch.setattr(_extension, "HAS_C_EXT", has_c_ext)
    monkeypatch.setattr(backend_mod, "triton_usable", lambda: has_triton)
    assert backend_mod.resolve(torch.device("cpu")) == ("cpp" if has_c_ext else "torch")
    assert backend_mod.resolve(torch.device("cuda", 0)) == ("triton" if has_triton else "torch")
    assert backend_mod.resolve(torch.device("meta")) == "torch"
    # An explicit choice is not overridden by what auto would pick.
    lk.set_backend("torch")
    assert backend_mod.resolve(torch.device("cpu")) == "torch"
    assert backend_mod.resolve(torch.device("cuda", 0)) == "torch"


@pytest.mark.skipif("cpp" not in lk.available_backends(), reason="the C++ extension is not built")
def test_cpp_backend_rejects_non_cpu_tensors():
    lk.set_backend("cpp")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        backend_mod.resolve(torch.device("meta"))


def test_torch_backend_calls_the_reference_kernel(monkeypatch, no_selection):
    calls = []
    original = reference.storm_update_

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(reference, "storm_update_", spy)
    m = torch.zeros(3, 4)
    lk.set_backend("torch")
    lk.storm_update_(m, torch.ones(3, 4), torch.zeros(3, 4), 0.25)
    assert calls == [0.25]
    assert torch.equal(m, torch.ones(3, 4))
    if "cpp" in lk.available_backends():
        lk.set_backend("cpp")  # dispatches to the C++ kernel, not the Python reference
        lk.storm_update_(m, torch.ones(3, 4), torch.zeros(3, 4), 0.5)
        assert calls == [0.25]
        assert torch.allclose(m, torch.full((3, 4), 1.5))


# -- Newton–Schulz compute dtype --------------------------------------------------------------------


def test_ns_compute_dtype_defaults_and_setting():
    # The CPU default follows the machine and LIMUON_CPU_NS_DTYPE (tests/test_ns_dtype.py fakes both).
    from limuon_kernels.cpu_features import NS_DTYPE_ENV, has_native_bf16_matmul

    machine = torch.bfloat16 if has_native_bf16_matmul() else torch.float32
    forced = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(os.environ.get(NS_DTYPE_ENV, ""))
    assert lk.get_ns_compute_dtype("cpu") == (forced or machine)
    assert lk.get_ns_compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    lk.set_ns_compute_dtype("cpu", torch.bfloat16)
    assert lk.get_ns_compute_dtype("cpu") == torch.bfloat16
    assert lk.get_ns_compute_dtype("cuda") == torch.bfloat16
    lk.set_ns_compute_dtype("cuda", torch.float32)
    assert lk.get_ns_compute_dtype("cuda:0") == torch.float32


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_ns_compute_dtype_rejects_non_float(dtype):
    with pytest.raises(ValueError, match="compute dtype"):
        lk.set_ns_compute_dtype("cpu", dtype)


# -- resolve_coefficients ---------------------------------------------------------------------------

KELLER = (3.4445, -4.7750, 2.0315)  # Keller Jordan's Muon post
PE_FIRST = (8.156554524902461, -22.48329292557795, 15.878769915207462)  # Polar Express, iteration 1
PE_LAST = (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)  # Polar Express, iteration 5


def test_resolve_keller():
    flat, scale = resolve_coefficients("keller", 5)
    assert flat == list(KELLER) * 5 and scale == 1.0
    flat, _ = resolve_coefficients("keller", 7)
    assert flat == list(KELLER) * 7


def test_resolve_polar_express():
    flat, scale = resolve_coefficients("polar_express", 5)
    assert len(flat) == 15 and scale == 1.02
    assert tuple(flat[:3]) == PE_FIRST and tuple(flat[-3:]) == PE_LAST
    flat, scale = resolve_coefficients("polar_express", 2)
    assert tuple(flat[:3]) == PE_FIRST and len(flat) == 6 and scale == 1.02


@pytest.mark.parametrize("steps", [6, 10])
def test_resolve_polar_express_too_many_steps(steps):
    with pytest.raises(ValueError, match=rf"ns_steps: {steps}.*polar_express"):
        resolve_coefficients("polar_express", steps)


def test_resolve_user_triples():
    assert resolve_coefficients((1.5, -0.5, 0), 3) == ([1.5, -0.5, 0.0] * 3, 1.0)
    assert resolve_coefficients([2, -1, 0.25], 1) == ([2.0, -1.0, 0.25], 1.0)
    assert resolve_coefficients([(1, 2, 3)], 2) == ([1.0, 2.0, 3.0] * 2, 1.0)
    triples = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert resolve_coefficients(triples, 3) == ([float(x) for x in range(1, 10)], 1.0)
    flat, _ = resolve_coefficients([[1, 2, 3], [4, 5, 6]], 2)
    assert all(isinstance(x, float) for x in flat)


@pytest.mark.parametrize(
    ("coefficients", "match"),
    [
        ("nesterov", "ns_coefficients: 'nesterov'"),
        ((1.0, 2.0), "ns_coefficients"),
        ((1.0, 2.0, 3.0, 4.0), "ns_coefficients"),
        ([(1, 2, 3), (1, 2)], "ns_coefficients"),
        ([], "ns_coefficients"),
        ([(1, 2, 3)] * 4, r"4 triples given but ns_steps=5"),
        ([(1, 2, 3)] * 2, r"2 triples given but ns_steps=5"),
        ((math.nan, 1.0, 1.0), "non-finite"),
        ([(1, 2, 3), (1, math.inf, 3), (1, 2, 3), (1, 2, 3), (1, 2, 3)], "non-finite"),
        ((1.0, -math.inf, 0.0), "non-finite"),
    ],
    ids=["unknown-preset", "pair", "quad", "ragged", "empty", "4-triples", "2-triples", "nan", "inf-list", "-inf"],
)
def test_resolve_invalid_coefficients(coefficients, match):
    with pytest.raises(ValueError, match=match):
        resolve_coefficients(coefficients, 5)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True, None])
def test_resolve_invalid_steps(steps):
    with pytest.raises(ValueError, match="ns_steps"):
        resolve_coefficients("keller", steps)


# -- argument validation of the public wrappers ------------------------------------------------------


def test_newton_schulz_validation():
    G = torch.randn(5, 7)
    with pytest.raises(TENSOR_ERRORS, match="G must be a float"):
        lk.newton_schulz(torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(TENSOR_ERRORS, match=r"G must have shape \(\.\.\., m, n\)"):
        lk.newton_schulz(torch.randn(7))
    with pytest.raises(TENSOR_ERRORS, match="G must not be empty"):
        lk.newton_schulz(torch.randn(0, 7))
    with pytest.raises(TENSOR_ERRORS, match="G must not be empty"):
        lk.newton_schulz(torch.randn(2, 5, 0))
    with pytest.raises(ValueError, match="ns_steps"):
        lk.newton_schulz(G, steps=0)
    with pytest.raises(ValueError, match="ns_coefficients"):
        lk.newton_schulz(G, coefficients="fast")
    with pytest.raises(ValueError, match="polar_express"):
        lk.newton_schulz(G, steps=6, coefficients="polar_express")
    for eps in (-1e-7, math.nan, math.inf):
        with pytest.raises(ValueError, match="eps"):
            lk.newton_schulz(G, eps=eps)


def _mats(*shapes, device="cpu", dtype=torch.float32):
    return [torch.randn(*s, device=device, dtype=dtype) for s in shapes]


def test_storm_update_validation():
    m, g1, g2 = _mats((3, 4), (3, 4), (3, 4))
    with pytest.raises(TENSOR_ERRORS, match=r"g_new must have the shape of m \(3, 4\), got \(4, 3\)"):
        lk.storm_update_(m, g1.T, g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match=r"g_old must have the shape of m"):
        lk.storm_update_(m, g1, g2[:2], 0.9)
    with pytest.raises(TENSOR_ERRORS, match="g_new must be on m's device"):
        lk.storm_update_(m, g1.to("meta"), g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match="g_old must be on m's device"):
        lk.storm_update_(m, g1, g2.to("meta"), 0.9)
    with pytest.raises(TENSOR_ERRORS, match="m must be a float"):
        lk.storm_update_(m.long(), g1, g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match="g_old must be a float"):
        lk.storm_update_(m, g1, g2.to(torch.int32), 0.9)
    for momentum in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="momentum"):
            lk.storm_update_(m, g1, g2, momentum)
    assert torch.equal(m, m.clone()) and not m.isnan().any()


def test_storm_update_validation_leaves_m_untouched():
    m, g1, g2 = _mats((3, 4), (3, 4), (3, 4))
    before = m.clone()
    with pytest.raises(ValueError):
        lk.storm_update_(m, g1, g2, 2.0)
    with pytest.raises(TENSOR_ERRORS):
        lk.storm_update_(m, g1, g2[:2], 0.9)
    assert torch.equal(m, before)


def test_mars_update_validation():
    b, g = _mats((3, 4), (3, 4))
    with pytest.raises(TENSOR_ERRORS, match=r"g must have the shape of b"):
        lk.mars_update_(b, g[:, :3], 0.9, 0.025)
    with pytest.raises(TENSOR_ERRORS, match="g must be on b's device"):
        lk.mars_update_(b, g.to("meta"), 0.9, 0.025)
    with pytest.raises(TENSOR_ERRORS, match="b must be a float"):
        lk.mars_update_(b.int(), g, 0.9, 0.025)
    with pytest.raises(ValueError, match=r"momentum.*divides by momentum"):
        lk.mars_update_(b, g, 0.0, 0.025)
    for momentum in (-0.5, 1.01, math.nan):
        with pytest.raises(ValueError, match="momentum"):
            lk.mars_update_(b, g, momentum, 0.025)
    for gamma in (-0.1, 1.1, math.inf):
        with pytest.raises(ValueError, match="gamma"):
            lk.mars_update_(b, g, 0.9, gamma)


def _lowrank(m=6, n=5, r=2, lead=()):
    return _mats((*lead, m, r), (*lead, r), (*lead, n, r), (*lead, m, n), (*lead, m, n))


def test_lowrank_storm_validation():
    U, S, V, g1, g2 = _lowrank()
    with pytest.raises(TENSOR_ERRORS, match=r"U must have shape \(6, 2\) to match g_new \(6, 5\), got \(5, 2\)"):
        lk.lowrank_storm(U[:5], S, V, g1, g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match=r"V must have shape \(5, 2\)"):
        lk.lowrank_storm(U, S, torch.randn(6, 2), g1, g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match=r"S must have shape \(2,\)"):
        lk.lowrank_storm(U, S.expand(3, 2), V, g1, g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match=r"U must have shape \(3, 6, 2\)"):
        lk.lowrank_storm(U, *_lowrank(lead=(3,))[1:], 0.9)  # unbatched U for a batch of 3
    with pytest.raises(TENSOR_ERRORS, match="g_old must have the shape of g_new"):
        lk.lowrank_storm(U, S, V, g1, g2.T, 0.9)
    with pytest.raises(TENSOR_ERRORS, match="V must be on g_new's device"):
        lk.lowrank_storm(U, S, V.to("meta"), g1, g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match="g_old must be on g_new's device"):
        lk.lowrank_storm(U, S, V, g1, g2.to("meta"), 0.9)
    with pytest.raises(TENSOR_ERRORS, match="S must be a float"):
        lk.lowrank_storm(U, S.long(), V, g1, g2, 0.9)
    with pytest.raises(TENSOR_ERRORS, match=r"g_new must have shape \(\.\.\., m, n\)"):
        lk.lowrank_storm(U, S, V, g1[0], g2[0], 0.9)
    for momentum in (-1.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="momentum"):
            lk.lowrank_storm(U, S, V, g1, g2, momentum)


def test_lowrank_axpby_validation():
    U, S, V, g, _ = _lowrank()
    with pytest.raises(TENSOR_ERRORS, match=r"V must have shape \(5, 2\) to match g"):
        lk.lowrank_axpby(U, S, V[:4], g, 1.0, 1.0)
    with pytest.raises(TENSOR_ERRORS, match="U must be on g's device"):
        lk.lowrank_axpby(U.to("meta"), S, V, g, 1.0, 1.0)
    for name, alpha, beta in (("alpha", math.nan, 1.0), ("beta", 1.0, math.inf), ("alpha", -math.inf, 0.0)):
        with pytest.raises(ValueError, match=name):
            lk.lowrank_axpby(U, S, V, g, alpha, beta)


def test_rsvd_validation():
    M = torch.randn(6, 9)
    with pytest.raises(ValueError, match=r"rank: 7; must be at most min\(m, n\) = 6"):
        lk.rsvd(M, 7)
    with pytest.raises(ValueError, match=r"rank: 10; must be at most min\(m, n\) = 6"):
        lk.rsvd(M.T, 10)
    for rank in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="Invalid rank"):
            lk.rsvd(M, rank)
    for oversample in (-1, 1.5):
        with pytest.raises(ValueError, match="Invalid oversample"):
            lk.rsvd(M, 2, oversample=oversample)
    for power_iters in (-1, None):
        with pytest.raises(ValueError, match="Invalid power_iters"):
            lk.rsvd(M, 2, power_iters=power_iters)
    with pytest.raises(TENSOR_ERRORS, match="M must be a float"):
        lk.rsvd(M.long(), 2)
    with pytest.raises(TENSOR_ERRORS, match="M must have shape"):
        lk.rsvd(torch.randn(9), 2)
    with pytest.raises(TENSOR_ERRORS, match="M must not be empty"):
        lk.rsvd(torch.randn(0, 6, 9), 2)


def test_rsvd_seed_validation():
    M = torch.randn(3, 6, 9)
    with pytest.raises(ValueError, match="Invalid seed: 2 seeds given for a batch of 3"):
        lk.rsvd(M, 2, seed=[1, 2])
    with pytest.raises(ValueError, match="Invalid seed: 1 seeds given for a batch of 3"):
        lk.rsvd(M, 2, seed=[1])
    with pytest.raises(ValueError, match="Invalid seed: 4 seeds given for a batch of 3"):
        lk.rsvd(M, 2, seed=[1, 2, 3, 4])
    for bad in ([1, -2, 3], [1, 2, 1 << 63]):
        with pytest.raises(ValueError, match=r"Invalid seed: seeds must be in \[0, 2\*\*63\)"):
            lk.rsvd(M, 2, seed=bad)
    # An int seed is mixed with the batch index, so any Python int is fine.
    for seed in (-1, 1 << 70):
        _, S, _ = lk.rsvd(M, 2, seed=seed)
        assert torch.isfinite(S).all()


@pytest.mark.parametrize("seed", [1.5, None, "ab", [1.0, 2.5, 3.0]], ids=["float", "None", "str", "float-list"])
def test_rsvd_rejects_non_integer_seeds(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        lk.rsvd(torch.randn(3, 6, 9), 2, seed=seed)


def test_rsvd_accepts_numpy_integer_seeds():
    np = pytest.importorskip("numpy")
    M = torch.randn(3, 6, 9)
    for got, want in zip(lk.rsvd(M, 2, seed=np.int64(5)), lk.rsvd(M, 2, seed=5)):
        assert torch.equal(got, want)
    for got, want in zip(lk.rsvd(M, 2, seed=np.arange(3)), lk.rsvd(M, 2, seed=[0, 1, 2])):
        assert torch.equal(got, want)
