"""``python -m limuon_kernels.info``: what to paste into a bug report.

Prints the package version, the torch the C++ extension was built against and the torch running,
whether ``limuon_kernels._C`` loaded (and why not), the Triton version and whether it can compile
for the current GPU, the available backends and the device.
"""

from __future__ import annotations

import platform
import sys

import torch

import limuon_kernels
from limuon_kernels import _extension, backend


def _triton_status() -> tuple[str, str]:
    """(version, whether it compiles a shipped kernel for this machine's GPU)."""
    try:
        import triton
    except Exception as exc:  # a broken triton install is worth reporting, not crashing on
        return "not installed", f"no ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return triton.__version__, "no CUDA device (the kernels run only under TRITON_INTERPRET=1, on CPU tensors)"
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


def collect() -> dict[str, str]:
    """The report as ordered (label, value) pairs."""
    triton_version, triton_compiles = _triton_status()
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "limuon-kernels": limuon_kernels.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch (running)": torch.__version__,
        "torch (extension built against)": _extension.BUILT_WITH_TORCH or "unknown (no extension)",
        "C++ extension _C": "loaded" if _extension.HAS_C_EXT else f"not loaded: {_extension.LOAD_ERROR}",
        "CUDA (torch)": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "triton compiles for this GPU": triton_compiles,
        "available backends": ", ".join(backend.available_backends()),
        "selected backend": backend.get_backend(),
        "device": device,
    }


def main() -> None:
    report = collect()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}} : {value}")


if __name__ == "__main__":
    main()
