"""Triton kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package never touches the GPU driver (docs/DESIGN.md §6): kernel modules are imported
by whoever needs them, and ``triton_usable()`` decides lazily whether they can run here.

The compiled kernels are written and tuned for NVIDIA GPUs of compute capability 8.0 (Ampere) and
newer: they use bf16 and tf32 ``tl.dot``, which older NVIDIA GPUs do not have, and their tile lists are
sized for NVIDIA's shared memory. A ROCm build of torch reports AMD GPUs through ``torch.cuda`` with a
made-up capability (an MI300 says 9.4, which must not be mistaken for Hopper), so it is refused too.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["MIN_CAPABILITY", "clear_cache", "interpreting", "triton_usable", "unsupported_gpu_reason"]

MIN_CAPABILITY = (8, 0)


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. missing libcuda stubs) counts as absent
        return False
    return True


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: the kernels run in Triton's interpreter, on CPU tensors, on any machine.

    Read on every call, so a test setup that sets it late is honoured.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


# A constant to torch.compile: Dynamo calls it while tracing instead of tracing into the driver queries
# (on the cached function itself the mark would be lost: Dynamo looks through functools.cache's wrapper).
@torch.compiler.assume_constant_result
def unsupported_gpu_reason(device: torch.device | None = None) -> str | None:
    """Why the compiled Triton kernels cannot run on CUDA ``device`` (None: the current one); None if they can.

    Asks the driver on the first call per device and caches the answer (``clear_cache`` forgets it).
    Only meaningful when ``torch.cuda.is_available()``.
    """
    return _unsupported_gpu_reason(device)


@functools.cache
def _unsupported_gpu_reason(device: torch.device | None) -> str | None:
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    if torch.version.hip is not None:
        found = f"{name} (ROCm/HIP {torch.version.hip}, reported as capability {major}.{minor})"
    elif (major, minor) < MIN_CAPABILITY:
        found = f"{name} sm_{major}{minor}"
    else:
        return None
    need_major, need_minor = MIN_CAPABILITY
    return (
        f"the Triton kernels need an NVIDIA GPU with compute capability >= {need_major}.{need_minor} "
        f"(sm_{need_major}{need_minor}); found {found}"
    )


def triton_usable() -> bool:
    """Whether the Triton kernels can run in this process.

    True when ``triton`` imports and either ``TRITON_INTERPRET=1`` (the interpreter runs them on CPU
    tensors) or the current CUDA device is an NVIDIA GPU of compute capability >= 8.0.
    """
    if not _triton_importable():
        return False
    if interpreting():
        return True
    return torch.cuda.is_available() and unsupported_gpu_reason() is None


def clear_cache() -> None:
    """Forget the cached hardware answers (after faking the device in a test, or changing the visible GPUs)."""
    _triton_importable.cache_clear()
    _unsupported_gpu_reason.cache_clear()
