"""Backend selection: which implementation of the ``limuon::`` ops runs for a given tensor.

Backends:
  * ``"torch"``  – the plain-PyTorch reference kernels (``reference.py``); every device.
  * ``"cpp"``    – the fused C++ kernels of ``limuon_kernels._C``; CPU tensors.
  * ``"triton"`` – the fused Triton kernels; CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``).
  * ``"auto"``   – the fastest available for the tensor's device (the default): ``cpp`` on CPU when
    built, ``triton`` on CUDA when triton is installed, else ``torch``.

``set_backend`` and the environment variable ``LIMUON_BACKEND`` choose; ``set_backend`` wins.
"""

from __future__ import annotations

import os

import torch

from limuon_kernels import _extension

BACKENDS = ("auto", "torch", "cpp", "triton")
_selected: str | None = None


def triton_usable() -> bool:
    """Triton imports and can run here: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU tensors)."""
    from limuon_kernels.triton import triton_usable as usable

    return usable()


def available_backends() -> list[str]:
    """The concrete backends usable in this process (``"torch"`` is always there)."""
    found = ["torch"]
    if _extension.HAS_C_EXT:
        found.append("cpp")
    if triton_usable():
        found.append("triton")
    return found


def set_backend(name: str) -> None:
    """Force a backend for every op (``"auto"`` restores the per-device default)."""
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r}; expected one of {BACKENDS}")
    if name not in ("auto", *available_backends()):
        raise ValueError(
            f"Backend {name!r} is not available in this process; available: {available_backends()}"
            + (f" ({_extension.LOAD_ERROR})" if name == "cpp" and _extension.LOAD_ERROR else "")
        )
    global _selected
    _selected = name


def get_backend() -> str:
    """The selected backend name (``set_backend`` first, then ``LIMUON_BACKEND``, else ``"auto"``)."""
    if _selected is not None:
        return _selected
    env = os.environ.get("LIMUON_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"Invalid LIMUON_BACKEND: {env!r}; expected one of {BACKENDS}")
    return env


def resolve(device: torch.device) -> str:
    """The concrete backend that runs ops on tensors of ``device``."""
    name = get_backend()
    if name == "auto":
        if device.type == "cpu":
            return "cpp" if _extension.HAS_C_EXT else "torch"
        return "triton" if device.type == "cuda" and triton_usable() else "torch"
    if name == "cpp":
        if not _extension.HAS_C_EXT:
            raise RuntimeError(f"LIMUON backend 'cpp' requested but unavailable: {_extension.LOAD_ERROR}")
        if device.type != "cpu":
            raise RuntimeError(f"LIMUON backend 'cpp' has kernels for CPU tensors only, got a {device.type} tensor")
    if name == "triton":
        if not triton_usable():
            raise RuntimeError(
                "LIMUON backend 'triton' requested but unavailable: it needs the triton package and a CUDA "
                "device (or TRITON_INTERPRET=1 for CPU tensors)"
            )
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("LIMUON backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"LIMUON backend 'triton' has kernels for CUDA tensors only, got a {device.type} tensor")
    return name
