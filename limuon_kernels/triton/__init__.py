"""Triton kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Importing this package never touches the GPU driver (DESIGN.md §6): kernel modules are imported
by whoever needs them, and ``triton_usable()`` decides lazily whether they can run here.
"""

from __future__ import annotations

import functools
import os

__all__ = ["triton_usable"]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. missing libcuda stubs) counts as absent
        return False
    return True


def triton_usable() -> bool:
    """Whether the Triton kernels can run in this process.

    True when ``triton`` imports and either a CUDA device is present or ``TRITON_INTERPRET=1``
    (then the kernels run in Triton's interpreter on CPU tensors). The environment is read on
    every call, so a test setup that sets ``TRITON_INTERPRET`` later is honoured.
    """
    if not _triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()
