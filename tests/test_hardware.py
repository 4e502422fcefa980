"""The Triton backend only where its kernels are supported: NVIDIA GPUs of compute capability >= 8.0.

The GPU is faked (``torch.cuda.is_available``/``get_device_capability``/``get_device_name`` and
``torch.version.hip``, with ``TRITON_INTERPRET`` unset), so these run on CPU machines; the cached hardware
answers and the warnings already given are reset around every test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import limuon_kernels as lk
from limuon_kernels import backend, info
from limuon_kernels import triton as triton_pkg

pytestmark = pytest.mark.skipif(not triton_pkg._triton_importable(), reason="triton is not installed")

NEED = "the Triton kernels need an NVIDIA GPU with compute capability >= 8.0 (sm_80); found"
GPUS = {  # name, capability, torch.version.hip, what the found-part of the reason says (None: supported)
    "sm_75": ("Tesla T4", (7, 5), None, "Tesla T4 sm_75"),
    "sm_80": ("NVIDIA A100-SXM4-80GB", (8, 0), None, None),
    "sm_90": ("NVIDIA H100 80GB HBM3", (9, 0), None, None),
    "rocm_9.4": ("AMD Instinct MI300X", (9, 4), "6.2.41133", "AMD Instinct MI300X (ROCm/HIP 6.2.41133, reported as "
                 "capability 9.4)"),
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Call ``fake_gpu(key)`` to make torch report the GPU ``GPUS[key]`` (compiled kernels, no interpreter)."""

    def install(key: str) -> None:
        name, capability, hip, _ = GPUS[key]
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.delenv("LIMUON_BACKEND", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.version, "hip", hip)
        backend.reset_hardware_cache()

    backend.reset_hardware_cache()
    yield install
    backend.reset_hardware_cache()  # before monkeypatch restores torch: nothing faked stays cached


def _reason(key: str) -> str | None:
    found = GPUS[key][3]
    return None if found is None else f"{NEED} {found}"


@pytest.mark.parametrize("key", list(GPUS))
def test_available_backends_and_auto(fake_gpu, key):
    fake_gpu(key)
    supported = _reason(key) is None
    assert ("triton" in lk.available_backends()) == supported
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # our own once-only rule, not Python's default filter, must hold
        for device in ("cuda", "cuda:0", "cuda"):
            assert backend.resolve(torch.device(device)) == ("triton" if supported else "torch")
        assert backend.resolve(torch.device("cpu")) == ("cpp" if lk.HAS_C_EXT else "torch")
    ours = [str(w.message) for w in caught if "limuon" in str(w.message)]
    if supported:
        assert ours == []
    else:
        assert ours == [f"limuon: {_reason(key)}: using the reference PyTorch kernels"]
        assert caught[0].category is RuntimeWarning


@pytest.mark.parametrize("key", list(GPUS))
def test_set_backend_triton(fake_gpu, key):
    fake_gpu(key)
    reason = _reason(key)
    if reason is None:
        lk.set_backend("triton")
        assert backend.resolve(torch.device("cuda")) == "triton"
        return
    with pytest.raises(ValueError, match=r"Backend 'triton' is not available") as err:
        lk.set_backend("triton")
    assert reason in str(err.value)
    assert lk.get_backend() == "auto"  # the refused choice is not kept


@pytest.mark.parametrize("key", ["sm_75", "rocm_9.4"])
def test_env_var_triton_on_unsupported_gpu_is_a_clear_error(fake_gpu, monkeypatch, key):
    fake_gpu(key)
    monkeypatch.setenv("LIMUON_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="'triton' cannot run on cuda") as err:
        backend.resolve(torch.device("cuda"))
    assert _reason(key) in str(err.value)


def test_interpreter_still_runs_triton_on_cpu_tensors(fake_gpu, monkeypatch):
    """TRITON_INTERPRET=1 runs the kernels in the interpreter whatever the GPU: CI's way of testing them."""
    fake_gpu("sm_75")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in lk.available_backends()
    lk.set_backend("triton")
    assert backend.resolve(torch.device("cpu")) == "triton"
    G = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    X = lk.newton_schulz(G, compute_dtype=torch.float32)
    # orthogonalised: singular values in NS5's band around 1, from G's spread
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.5 and s.max() < 1.3, s


@pytest.mark.parametrize(
    "key, capability, arch",
    [("sm_80", (8, 0), 80), ("sm_80", (8, 6), 80), ("sm_90", (9, 0), 90), ("sm_90", (10, 0), 90),
     ("sm_90", (12, 0), 80), ("sm_75", None, None), ("rocm_9.4", None, None)],
)
def test_arch_key(fake_gpu, monkeypatch, key, capability, arch):
    from limuon_kernels.triton.newton_schulz import _arch_key

    fake_gpu(key)
    if capability is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if arch is not None:
        assert _arch_key(torch.device("cuda")) == arch
        return
    with pytest.raises(RuntimeError, match=r"need an NVIDIA GPU") as err:  # a ROCm 9.4 is not Hopper
        _arch_key(torch.device("cuda"))
    assert _reason(key) in str(err.value)


@pytest.mark.parametrize("key", ["sm_75", "rocm_9.4"])
def test_info_says_why_triton_is_not_used(fake_gpu, monkeypatch, key):
    fake_gpu(key)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    report = info.collect()
    want = f"no: {_reason(key)}; CUDA tensors use the reference PyTorch kernels"
    assert report["Triton kernels for this GPU"] == want
    assert report["triton compiles for this GPU"].startswith("not tried")  # never compiled for a ROCm "sm_94"
    assert "triton" not in report["available backends"]
    if key == "rocm_9.4":
        assert report["device"] == "cuda: AMD Instinct MI300X (ROCm, capability 9.4)"


def test_no_driver_query_at_import(tmp_path):
    """Importing the packages asks the GPU nothing (docs/DESIGN.md §6): the first op or info does."""
    script = textwrap.dedent(
        """
        import torch
        asked = []
        for name in ("get_device_capability", "get_device_name", "get_device_properties"):
            setattr(torch.cuda, name, lambda *a, name=name, **k: asked.append(name))
        import limuon_kernels, limuon, limuon_kernels.backend, limuon_kernels.info, limuon_kernels.triton
        assert asked == [], asked
        print("lazy ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert "lazy ok" in proc.stdout, proc.stderr
