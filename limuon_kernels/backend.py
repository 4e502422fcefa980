"""Backend selection: which implementation of the ``limuon::`` ops runs for a given tensor.

Backends:
  * ``"torch"``  – the plain-PyTorch reference kernels (``reference.py``); every device.
  * ``"cpp"``    – the fused C++ kernels of ``limuon_kernels._C``; CPU tensors.
  * ``"triton"`` – the fused Triton kernels; CUDA tensors on NVIDIA GPUs of compute capability >= 8.0
    (CPU tensors under ``TRITON_INTERPRET=1``).
  * ``"auto"``   – the fastest available for the tensor's device (the default): ``cpp`` on CPU when
    built, ``triton`` on CUDA when triton is installed and the GPU is supported, else ``torch``. On an
    unsupported GPU (older than sm_80, or an AMD GPU under ROCm) one warning per GPU kind says why.

``set_backend`` and the environment variable ``LIMUON_BACKEND`` choose; ``set_backend`` wins.
"""

from __future__ import annotations

import os
import warnings

import torch

from limuon_kernels import _extension
from limuon_kernels import triton as _triton_pkg  # the package only: triton itself is imported lazily

BACKENDS = ("auto", "torch", "cpp", "triton")
_selected: str | None = None
_warned: set[str] = set()  # the unsupported-GPU reasons already warned about (once per process each)


def triton_usable() -> bool:
    """Triton imports and can run here: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU tensors)."""
    from limuon_kernels.triton import triton_usable as usable

    return usable()


def _gpu_problem(device: torch.device) -> str | None:
    """Why the compiled Triton kernels cannot run on ``device`` (a CUDA device); None if they can, or if
    that does not apply (no triton, the interpreter runs them, or no CUDA: ``triton_usable`` decides)."""
    if not _triton_pkg._triton_importable() or _triton_pkg.interpreting() or not torch.cuda.is_available():
        return None
    return _triton_pkg.unsupported_gpu_reason(device)


def _triton_missing_reason() -> str:
    """Why ``"triton"`` is not in ``available_backends()``, for error messages."""
    if not _triton_pkg._triton_importable():
        return "the triton package is not installed (or fails to import)"
    if torch.cuda.is_available():
        return _triton_pkg.unsupported_gpu_reason() or "the current CUDA device is not supported"
    return "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors)"


def reset_hardware_cache() -> None:
    """Forget the cached GPU queries and the warnings already given (for tests that fake the GPU)."""
    _triton_pkg.clear_cache()
    _warned.clear()


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
        why = _triton_missing_reason() if name == "triton" else _extension.LOAD_ERROR
        raise ValueError(
            f"Backend {name!r} is not available in this process; available: {available_backends()}"
            + (f" ({why})" if why else "")
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
        if device.type != "cuda":
            return "torch"
        problem = _gpu_problem(device)
        if problem is not None:
            if problem not in _warned:
                _warned.add(problem)
                warnings.warn(f"limuon: {problem}: using the reference PyTorch kernels", RuntimeWarning,
                              stacklevel=3)
            return "torch"
        return "triton" if triton_usable() else "torch"
    if name == "cpp":
        if not _extension.HAS_C_EXT:
            raise RuntimeError(f"LIMUON backend 'cpp' requested but unavailable: {_extension.LOAD_ERROR}")
        if device.type != "cpu":
            raise RuntimeError(f"LIMUON backend 'cpp' has kernels for CPU tensors only, got a {device.type} tensor")
    if name == "triton":
        problem = _gpu_problem(device) if device.type == "cuda" else None
        if problem is not None:
            raise RuntimeError(f"LIMUON backend 'triton' cannot run on {device}: {problem}")
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
