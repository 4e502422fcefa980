"""Shared pytest setup for the limuon-kernels and limuon test suites.

The environment variable must come first: ``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel
module is imported, and CI has no GPU, so the Triton kernels run in the interpreter there.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import limuon_kernels
from limuon_kernels import backend as _backend_mod
from limuon_kernels import ops as _ops_mod

HAS_CUDA = torch.cuda.is_available()

# One intra-op thread by default: the test tensors are tiny, and on a busy 2-core machine OpenMP's
# spinning threads made the suite ~6x slower. Tests that exercise multi-threaded kernels raise it
# themselves (see ``threads``); LIMUON_TEST_THREADS overrides the default.
DEFAULT_THREADS = int(os.environ.get("LIMUON_TEST_THREADS", "1"))
torch.set_num_threads(DEFAULT_THREADS)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolate_global_state():
    """Every test starts from the default backend selection and NS compute dtypes, and leaves them so.

    Saves the module state itself (not just ``"auto"``), so a ``LIMUON_BACKEND`` set by whoever runs
    the suite keeps applying to the tests that do not pick a backend themselves.
    """
    selected = _backend_mod._selected
    ns_dtypes = dict(_ops_mod._NS_COMPUTE_DTYPE)
    torch.manual_seed(0)
    yield
    _backend_mod._selected = selected
    _ops_mod._NS_COMPUTE_DTYPE.clear()
    _ops_mod._NS_COMPUTE_DTYPE.update(ns_dtypes)


@pytest.fixture(params=limuon_kernels.available_backends(), ids=str)
def backend(request):
    """Each concrete backend of this process in turn, selected with ``set_backend``; yields its name."""
    limuon_kernels.set_backend(request.param)
    try:
        yield request.param
    finally:
        limuon_kernels.set_backend("auto")


# CUDA is only parametrized where present (marked ``gpu``), so CPU runs carry no skipped duplicates.
_DEVICES = ["cpu", *([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else [])]


@pytest.fixture(params=_DEVICES, ids=str)
def device(request):
    """Each device kind present, as a ``torch.device``: CPU always, CUDA when there is one."""
    return torch.device(request.param)


@pytest.fixture
def dev(backend, device):
    """Device of a test that runs on every (backend, device) pair; skips the pairs that cannot run
    (cpp on CUDA, triton on CPU without the interpreter), as the backend itself reports them."""
    try:
        _backend_mod.resolve(device)
    except RuntimeError as exc:
        pytest.skip(f"backend {backend!r} cannot run on {device.type}: {exc}")
    return device


@pytest.fixture
def threads():
    """Call ``threads(n)`` to run the rest of the test with ``n`` intra-op threads (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def gen():
    """A CPU generator with a fixed seed, for reproducible inputs independent of the global RNG."""
    return torch.Generator().manual_seed(1234)
