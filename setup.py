"""Build script for limuon-kernels.

Two packages ship together:
  * ``limuon_kernels`` (the op registry, reference kernels and the compiled ``limuon_kernels._C``),
  * ``limuon`` (the torch.optim-style front-end, sources under ``python/limuon``).

The C++ extension is compiled against the torch that is already installed, so build with
``pip install --no-build-isolation``. When torch cannot be imported (or ``LIMUON_SKIP_EXT=1``), the
build degrades to a pure-Python package with a warning; ``limuon_kernels.HAS_C_EXT`` then reports False
and every op runs on its reference implementation.
"""

from __future__ import annotations

import glob
import os
import platform
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cpu_isa_flags(torch) -> list[str]:
    """Compile ATen's AVX2 vector code when the building machine has AVX2 (``LIMUON_CPU_BASELINE=1`` opts out).

    Without ``CPU_CAPABILITY_AVX2``, ``at::vec::Vectorized`` is a portable array type that the compiler
    vectorises only sometimes (the low-rank epilogue stayed scalar) and its bf16/fp16 conversions go
    element by element. Like torchao's CPU kernels we build for the machine that compiles, so a build
    made with these flags needs an AVX2 CPU; ``CPU_CAPABILITY=AVX2`` names the inline namespace as ATen's
    own AVX2 kernels do, so shared template instances are the same code.
    """
    if _flag("LIMUON_CPU_BASELINE") or os.name == "nt" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def get_extensions_and_cmdclass() -> tuple[list, dict]:
    if _flag("LIMUON_SKIP_EXT"):
        warnings.warn("LIMUON_SKIP_EXT=1: building limuon-kernels without its C++ extension.", stacklevel=1)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:  # pragma: no cover - exercised only on machines without torch
        warnings.warn(
            f"torch could not be imported at build time ({exc}); building limuon-kernels as pure Python. "
            "Install torch first and rebuild with `pip install --no-build-isolation -e .` to get the "
            "C++ CPU kernels.",
            stacklevel=1,
        )
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # No hard-coded -std: BuildExtension picks the standard the installed torch headers need.
    cxx_flags = ["-O3", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"] if os.name != "nt" else ["/O2"]
    if _flag("LIMUON_DEBUG"):
        cxx_flags = ["-O0", "-g"]
    if os.name != "nt":
        # No fused multiply-adds the source does not ask for: the kernels round after every operation,
        # as the eager reference does, so their fp32/bf16/fp16 results match it bit for bit.
        cxx_flags += ["-ffp-contract=off", *_cpu_isa_flags(torch)]
    # _C.TORCH_VERSION, checked at import against the running torch. Unquoted (csrc/module.cpp
    # stringifies it): a quoted define survives either the shell ninja runs commands in or a build
    # without one, never both. PEP 440 versions hold no character the shell would interpret.
    cxx_flags.append(f"-DLIMUON_TORCH_VERSION={torch.__version__}")
    ext = CppExtension(
        name="limuon_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if os.name != "nt" else [],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = get_extensions_and_cmdclass()
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="limuon-kernels",
    version=VERSION,
    description="Fast LiMuon and Muon optimizers for PyTorch: fused Triton and C++ kernels",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["limuon_kernels", "limuon"],
    package_dir={"limuon_kernels": "limuon_kernels", "limuon": "python/limuon"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.9"],
    extras_require={
        "test": ["pytest>=8", "numpy", "ruff"],
        "triton": ["triton>=3.6"],
    },
    zip_safe=False,
)
