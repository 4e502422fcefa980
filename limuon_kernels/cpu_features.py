"""What this CPU can do for bf16 matrix products, as torch reports it (no probing of our own).

torch multiplies bf16 matrices on x86 CPUs through oneDNN, which runs them natively on CPUs with
AVX512-BF16 (Cooper Lake, Zen 4 and newer) or AMX (Sapphire Rapids and newer). Elsewhere bf16 matmuls
are emulated, slower than fp32 (25–90× on the machines we measured: one 768×768 NS5 took 9.4 s in bf16
and 0.10 s in fp32).
``torch.backends.cpu.get_cpu_capability()`` cannot tell: in torch 2.13 it says only "DEFAULT", "VSX",
"Z VECTOR", "NO AVX", "AVX2", "AVX512" or "SVE256" (the vector ISA of ATen's own kernels), so the
feature queries ``torch.cpu._is_<feature>_supported`` are asked instead (``torch._C._cpu`` where an older
torch keeps them; a torch with neither gets fp32).
"""

from __future__ import annotations

import functools
import os

import torch

# (torch's feature name in ``_is_<name>_supported``, the name people know it by)
BF16_MATMUL_FEATURES = (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))


def _has_feature(name: str) -> bool | None:
    """Whether torch reports CPU feature ``name``; None when this torch has no query for it."""
    for owner in (torch.cpu, getattr(torch._C, "_cpu", None)):
        query = getattr(owner, f"_is_{name}_supported", None)
        if query is not None:
            return bool(query())
    return None


@functools.cache
def bf16_matmul_support() -> tuple[bool, str]:
    """(whether bf16 matmuls run natively on this CPU, the reason in words). Asked once per process;
    ``bf16_matmul_support.cache_clear()`` forgets the answer."""
    answers = {label: _has_feature(name) for name, label in BF16_MATMUL_FEATURES}
    found = " and ".join(label for label, has in answers.items() if has)
    if found and not torch.backends.mkldnn.is_available():
        return False, f"the CPU has {found}, but this torch is built without oneDNN, which bf16 matmuls need to use it"
    if found:
        return True, f"the CPU has {found}: bf16 matmuls run natively, several times faster than fp32"
    if all(has is None for has in answers.values()):
        return False, "this torch does not say whether the CPU has AVX512-BF16/AMX: fp32 is never the slow choice"
    return False, "no AVX512-BF16/AMX: bf16 matmuls are emulated and 25–90× slower than fp32 (where measured)"


#: the environment variable that overrides the CPU's default Newton–Schulz dtype (unset or empty: this
#: machine's choice), so that any machine can reproduce another's default
NS_DTYPE_ENV = "LIMUON_CPU_NS_DTYPE"
_ENV_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.cache
def default_ns_dtype() -> tuple[torch.dtype, str]:
    """(the CPU's default Newton–Schulz matmul dtype, the reason in words): ``LIMUON_CPU_NS_DTYPE``
    (``bfloat16`` or ``float32``) when set, else bf16 where ``bf16_matmul_support`` says bf16 matmuls run
    natively and fp32 elsewhere. Read once per process (``default_ns_dtype.cache_clear()`` re-reads)."""
    value = os.environ.get(NS_DTYPE_ENV, "")
    native, why = bf16_matmul_support()
    if value:
        if value not in _ENV_DTYPES:
            raise ValueError(f"Invalid {NS_DTYPE_ENV}={value!r}; expected one of {', '.join(_ENV_DTYPES)} "
                             "(or unset for this machine's choice)")
        slow = " (bf16 matmuls are emulated on this CPU: expect 25–90× slower Newton–Schulz)" \
            if value == "bfloat16" and not native else ""
        return _ENV_DTYPES[value], f"set by {NS_DTYPE_ENV}={value}{slow}; this machine's own choice: {why}"
    return (torch.bfloat16 if native else torch.float32), why


# A constant to torch.compile: Dynamo calls it while tracing rather than tracing into torch.cpu's queries,
# which it refuses (a graph break in every compiled step that calls newton_schulz on CPU). Not on the
# cached function itself: Dynamo looks through functools.cache's wrapper, and its mark with it.
@torch.compiler.assume_constant_result
def has_native_bf16_matmul() -> bool:
    """Whether bf16 matmuls run natively on this CPU (``bf16_matmul_support`` says why)."""
    return bf16_matmul_support()[0]


@torch.compiler.assume_constant_result
def default_ns_dtype_constant() -> torch.dtype:
    """``default_ns_dtype()[0]``, a constant to torch.compile (see above)."""
    return default_ns_dtype()[0]
