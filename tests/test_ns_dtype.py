"""The CPU's default Newton–Schulz matmul dtype follows what torch reports about the CPU.

bf16 when torch says the CPU has AVX512-BF16 or AMX (native bf16 matmuls through oneDNN), fp32 otherwise
(emulated bf16 is 25–90× slower), unless ``LIMUON_CPU_NS_DTYPE`` says otherwise. The capability queries
and the environment are faked; the cached answers are reset around every test, so the rest of the suite
sees this machine's real answer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import limuon_kernels as lk
from limuon_kernels import cpu_features, info, ops

KELLER = (3.4445, -4.7750, 2.0315)
NO_BF16 = "no AVX512-BF16/AMX: bf16 matmuls are emulated and 25–90× slower than fp32 (where measured)"


@pytest.fixture
def fake_cpu(monkeypatch):
    """``fake_cpu(avx512_bf16, amx_tile, where=torch.cpu)``: torch reports these CPU features (None: no query)."""

    def install(avx512_bf16: bool | None, amx_tile: bool | None, where=torch.cpu) -> None:
        for owner in (torch.cpu, torch._C._cpu):
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
                monkeypatch.delattr(owner, name, raising=False)
        for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx_tile)):
            if value is not None:
                monkeypatch.setattr(where, name, lambda value=value: value, raising=False)
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
        monkeypatch.delitem(ops._NS_COMPUTE_DTYPE, "cpu", raising=False)  # the default, not a suite-wide choice
        monkeypatch.delenv(cpu_features.NS_DTYPE_ENV, raising=False)  # (whoever runs the suite may set it)
        _forget()

    _forget()
    yield install
    _forget()  # before monkeypatch restores torch and the environment: nothing faked stays


def _forget() -> None:
    cpu_features.bf16_matmul_support.cache_clear()
    cpu_features.default_ns_dtype.cache_clear()


@pytest.mark.parametrize(
    "avx512_bf16, amx, dtype, reason",
    [
        (False, False, torch.float32, NO_BF16),
        (True, False, torch.bfloat16, "the CPU has AVX512-BF16: bf16 matmuls run natively"),
        (False, True, torch.bfloat16, "the CPU has AMX: bf16 matmuls run natively"),
        (True, True, torch.bfloat16, "the CPU has AVX512-BF16 and AMX: bf16 matmuls run natively"),
        (None, None, torch.float32, "this torch does not say whether the CPU has AVX512-BF16/AMX"),
    ],
    ids=["avx2_or_avx512", "avx512_bf16", "amx", "both", "unknown"],
)
def test_cpu_default_follows_the_reported_features(fake_cpu, avx512_bf16, amx, dtype, reason):
    fake_cpu(avx512_bf16, amx)
    assert lk.get_ns_compute_dtype("cpu") == dtype
    assert lk.ns_compute_dtype_reason("cpu").startswith(reason)
    assert lk.get_ns_compute_dtype("cuda") == torch.bfloat16  # other devices keep bf16 whatever the CPU
    report = info.collect()
    name = str(dtype).removeprefix("torch.")
    assert report["Newton–Schulz dtype (cpu)"] == f"{name} ({lk.ns_compute_dtype_reason('cpu')})"


def test_older_torch_queries_in_torch_C_cpu(fake_cpu):
    """Builds of torch that keep the feature queries in ``torch._C._cpu`` only are asked there."""
    fake_cpu(True, False, where=torch._C._cpu)
    assert lk.get_ns_compute_dtype("cpu") == torch.bfloat16


def test_no_onednn_means_fp32(fake_cpu, monkeypatch):
    fake_cpu(True, True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert lk.get_ns_compute_dtype("cpu") == torch.float32
    assert "built without oneDNN" in lk.ns_compute_dtype_reason("cpu")


@pytest.mark.parametrize("has_bf16", [True, False], ids=["bf16_cpu", "fp32_cpu"])
def test_overrides_win(fake_cpu, has_bf16):
    fake_cpu(has_bf16, has_bf16)
    other = torch.float32 if has_bf16 else torch.bfloat16
    saved = dict(ops._NS_COMPUTE_DTYPE)  # what tests/conftest.py's _isolate_global_state saves and restores
    lk.set_ns_compute_dtype("cpu", other)
    assert lk.get_ns_compute_dtype("cpu") == other
    assert lk.ns_compute_dtype_reason("cpu") == "set with set_ns_compute_dtype('cpu', ...)"
    ops._NS_COMPUTE_DTYPE.clear()
    ops._NS_COMPUTE_DTYPE.update(saved)
    assert lk.get_ns_compute_dtype("cpu") == (torch.bfloat16 if has_bf16 else torch.float32)


def _ns5_fp64(G: torch.Tensor) -> torch.Tensor:
    """Newton–Schulz from its definition, in fp64: X ← aX + (bA + cA²)X with A = XXᵀ, X₀ = G/‖G‖_F."""
    X = G.double() / torch.linalg.matrix_norm(G.double())
    a, b, c = KELLER
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X


@pytest.mark.parametrize("has_bf16", [True, False], ids=["bf16_cpu", "fp32_cpu"])
def test_newton_schulz_runs_in_the_default(fake_cpu, has_bf16, gen):
    """The op's default takes it: a bf16-sized error (≥ 1e-3) against fp64 on a bf16 CPU, fp32-sized
    (≤ 1e-4) elsewhere. Measured: ~1e-2 and ~1e-6."""
    fake_cpu(has_bf16, False)
    G = torch.randn(24, 40, generator=gen)
    want = _ns5_fp64(G)
    err = ((lk.newton_schulz(G).double() - want).norm() / want.norm()).item()
    if has_bf16:
        assert 1e-3 <= err <= 0.05, err
    else:
        assert err <= 1e-4, err


# -- LIMUON_CPU_NS_DTYPE: any machine reproduces another's default -----------------------------------


@pytest.mark.parametrize("has_bf16", [True, False], ids=["bf16_cpu", "fp32_cpu"])
@pytest.mark.parametrize("value, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_environment_variable_sets_the_cpu_default(fake_cpu, monkeypatch, has_bf16, value, dtype):
    fake_cpu(has_bf16, False)
    monkeypatch.setenv("LIMUON_CPU_NS_DTYPE", value)
    _forget()
    assert lk.get_ns_compute_dtype("cpu") == dtype
    reason = lk.ns_compute_dtype_reason("cpu")
    assert reason.startswith(f"set by LIMUON_CPU_NS_DTYPE={value}"), reason
    assert ("expect 25–90× slower" in reason) == (value == "bfloat16" and not has_bf16), reason  # the cost is said
    assert lk.get_ns_compute_dtype("cuda") == torch.bfloat16  # the CPU's default only
    lk.set_ns_compute_dtype("cpu", torch.float64)  # an explicit choice still wins
    assert lk.get_ns_compute_dtype("cpu") == torch.float64


@pytest.mark.parametrize("value", ["", None])
def test_unset_or_empty_is_the_machines_choice(fake_cpu, monkeypatch, value):
    fake_cpu(True, False)
    if value is not None:
        monkeypatch.setenv("LIMUON_CPU_NS_DTYPE", value)
    _forget()
    assert lk.get_ns_compute_dtype("cpu") == torch.bfloat16
    assert lk.ns_compute_dtype_reason("cpu").startswith("the CPU has AVX512-BF16")


@pytest.mark.parametrize("value", ["bf16", "float16", "Float32", "fp32 "])
def test_an_invalid_value_is_refused_naming_the_variable(fake_cpu, monkeypatch, value):
    fake_cpu(True, False)
    monkeypatch.setenv("LIMUON_CPU_NS_DTYPE", value)
    _forget()
    with pytest.raises(ValueError, match=r"Invalid LIMUON_CPU_NS_DTYPE=.*expected one of bfloat16, float32"):
        lk.get_ns_compute_dtype("cpu")


@pytest.mark.parametrize("value", ["bfloat16", "float32"])
def test_a_new_process_reads_it(value):
    """Read where the default is resolved, in a process that set it before importing anything; the
    optimizer step's Newton–Schulz runs in it (the momentum's dtype shows in the NS input's rounding)."""
    code = (
        "import torch, limuon_kernels as lk, limuon\n"
        "print(lk.get_ns_compute_dtype('cpu'))\n"
        "G = torch.randn(8, 24, generator=torch.Generator().manual_seed(0))\n"
        "want = lk.newton_schulz(G, compute_dtype=torch.float64)\n"
        "err = (lk.newton_schulz(G) - want).norm() / want.norm()\n"
        "print('bf16-sized' if err > 1e-3 else 'fp32-sized')\n"
    )
    env = {**os.environ, "LIMUON_CPU_NS_DTYPE": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"torch.{value}", "bf16-sized" if value == "bfloat16" else "fp32-sized"]
