"""``python -m limuon_kernels.info``: what to paste into a bug report.

Prints the package version, the torch the C++ extension was built against and the torch running,
whether ``limuon_kernels._C`` loaded (and why not), the Triton version, whether the Triton kernels are
used for the GPU (and why not) and compile for it, the available backends, the device, and the
Newton–Schulz matmul dtype per device with the reason for it.
"""

from __future__ import annotations

import platform
import sys

import torch

import limuon_kernels
from limuon_kernels import _extension, backend, ops
from limuon_kernels import triton as triton_pkg


def _triton_used_for_gpu() -> str:
    """Whether backend ``"auto"`` runs CUDA tensors on the Triton kernels, and why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    problem = triton_pkg.unsupported_gpu_reason()
    if problem is not None:
        return f"no: {problem}; CUDA tensors use the reference PyTorch kernels"
    if not triton_pkg.triton_usable():
        return "no: the triton package is not installed (or fails to import); CUDA tensors use the reference kernels"
    return "yes (backend 'auto' runs CUDA tensors on them)"


def _triton_status() -> tuple[str, str]:
    """(version, whether it compiles a shipped kernel for this machine's GPU)."""
    try:
        import triton
    except Exception as exc:  # a broken triton install is worth reporting, not crashing on
        return "not installed", f"no ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return triton.__version__, "no CUDA device (the kernels run only under TRITON_INTERPRET=1, on CPU tensors)"
    if triton_pkg.unsupported_gpu_reason() is not None:  # e.g. a ROCm "9.4" is no NVIDIA arch to compile for
        return triton.__version__, "not tried (the GPU is not supported, see above)"
    from limuon_kernels import compile_check

    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    targets, errors = compile_check.discover(["storm"])
    if errors or not targets:
        return triton.__version__, f"unknown ({errors[0].error if errors else 'no kernel to compile'})"
    module, target = targets[0]
    row = compile_check.compile_one(module, target, target.configs[0], arch, cuobjdump=None)
    if row.error and row.error.startswith("compile failed"):
        return triton.__version__, f"no, for sm_{arch} ({row.error})"
    return triton.__version__, f"yes, for sm_{arch}"


def _ns_dtype(device: str) -> str:
    dtype = str(ops.get_ns_compute_dtype(device)).removeprefix("torch.")
    return f"{dtype} ({ops.ns_compute_dtype_reason(device)})"


def collect() -> dict[str, str]:
    """The report as ordered (label, value) pairs."""
    triton_version, triton_compiles = _triton_status()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"ROCm, capability {major}.{minor}" if torch.version.hip is not None else f"sm_{major}{minor}"
        device = f"cuda: {torch.cuda.get_device_name()} ({arch})"
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    ns_dtypes = {"Newton–Schulz dtype (cpu)": _ns_dtype("cpu")}
    if torch.cuda.is_available():
        ns_dtypes["Newton–Schulz dtype (cuda)"] = _ns_dtype("cuda")
    return {
        "limuon-kernels": limuon_kernels.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch (running)": torch.__version__,
        "torch (extension built against)": _extension.BUILT_WITH_TORCH or "unknown (no extension)",
        "C++ extension _C": "loaded" if _extension.HAS_C_EXT else f"not loaded: {_extension.LOAD_ERROR}",
        "CUDA (torch)": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "Triton kernels for this GPU": _triton_used_for_gpu(),
        "triton compiles for this GPU": triton_compiles,
        "available backends": ", ".join(backend.available_backends()),
        "selected backend": backend.get_backend(),
        "device": device,
        **ns_dtypes,
    }


def main() -> None:
    report = collect()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}} : {value}")


if __name__ == "__main__":
    main()
