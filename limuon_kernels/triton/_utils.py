"""Launch helpers shared by the kernel modules of ``limuon_kernels.triton``.

Nothing here queries the GPU driver at import time (docs/DESIGN.md §6).
"""

from __future__ import annotations

import struct
from typing import Any

import torch
import triton
import triton.language as tl


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function, possibly wrapped by ``@triton.autotune``) runs in
    Triton's interpreter. ``@triton.jit`` decides when the module is imported (it reads
    ``TRITON_INTERPRET`` then), so ask the kernel object rather than the environment."""
    from triton.runtime.interpreter import InterpretedFunction

    while isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def launch_tuned(kernel: triton.runtime.Autotuner, grid, *args, **kwargs) -> None:
    """Launch an autotuned kernel; in the interpreter run its first config directly.

    The autotuner benchmarks with ``driver.active``, which does not exist without a GPU, so under
    ``TRITON_INTERPRET=1`` the first shipped config stands in for the tuned one.
    """
    if is_interpreted(kernel):
        config = kernel.configs[0]
        kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
    else:
        kernel[grid](*args, **kwargs)


def acc_dtype(*tensors: torch.Tensor) -> tl.dtype:
    """The arithmetic dtype of an op on ``tensors``, as the reference computes it: fp64 when any input
    is fp64 (``torch.promote_types(t.dtype, float32)`` per tensor, then promotion), fp32 otherwise."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def split_scalar(x: float) -> tuple[float, float, float]:
    """``x`` as ``hi + mid + lo``, each exactly representable in fp32 (``hi`` = fp32(x), round to nearest).

    Triton passes Python floats to kernels as fp32 (and the interpreter turns them into fp32
    constants); three fp32 parts carry all 53 bits of a double, so fp64 kernels see the exact
    hyperparameter while fp32 kernels use ``hi``, the value a plain fp32 argument would have.
    """

    def f32(v: float) -> float:
        return struct.unpack("f", struct.pack("f", v))[0]

    hi = f32(x)
    mid = f32(x - hi)
    return hi, mid, f32(x - hi - mid)


@triton.jit
def scalar_arg(hi, mid, lo, acc: tl.constexpr):
    """A hyperparameter passed as ``split_scalar``'s three parts, in the arithmetic dtype ``acc``."""
    if acc == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr):
    """``x.to(dtype)``, fp64 → bf16/fp16 through fp32: the interpreter's direct cast of fp64 to a
    16-bit float is garbage (Triton 3.9). The double rounding differs from a direct one only for
    values within 2⁻²⁹ relative of a 16-bit tie."""
    if x.dtype == tl.float64 and dtype.primitive_bitwidth == 16:
        return x.to(tl.float32).to(dtype)
    else:
        return x.to(dtype)


def next_pow2_at_least_16(x: int, cap: int) -> int:
    """Block size for a small inner dimension: a power of two, at least 16 (``tl.dot``'s minimum), at most cap."""
    return min(cap, max(16, triton.next_power_of_2(x)))


_TL_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def ptr(dtype: torch.dtype) -> str:
    """Triton type string of a pointer to ``dtype`` (``"*fp32"``...), for ``COMPILE_TARGETS``."""
    return "*" + _TL_TYPE[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
