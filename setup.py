"""Build script for limuon-kernels.

Two packages ship together:
  * ``limuon_kernels`` (the op registry, reference kernels and the compiled ``limuon_kernels._C``),
  * ``limuon`` (the torch.optim-style front-end, sources under ``python/limuon``).

The C++ extension is compiled against the torch that is already installed, so build with
``pip install --no-build-isolation`` (or ``pip wheel --no-build-isolation --no-deps -w dist .``,
``python -m build --wheel --no-isolation``). A wheel with the extension is a platform wheel whose
metadata pins ``torch==<the version it was compiled against>``, because the C++ ABI is tied to it.
When torch cannot be imported (or ``LIMUON_SKIP_EXT=1``), the build degrades to a pure-Python package
with a warning and the loose ``torch>=2.9``; ``limuon_kernels.HAS_C_EXT`` then reports False and every
op runs on its reference implementation. The GPU kernels are Triton kernels, compiled at run time:
there is no CUDA code to build, and ``LIMUON_BUILD_CUDA=1`` is refused rather than ignored.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
# Written next to the compiled _C by build_ext; read by limuon_kernels/_extension.py (same name there).
TORCH_VERSION_FILE = "_C_torch_version.txt"


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


def _torch_pin(torch) -> str:
    """The requirement a wheel with ``_C`` carries: the public version it was compiled against.

    The local label is dropped: ``torch==2.13.0`` matches ``2.13.0+cpu`` and ``2.13.0+cu130`` (PEP 440
    ignores a candidate's local label when the specifier has none), whose C++ ABI is the same, so a wheel
    built on a CPU machine installs next to the CUDA build of the same torch. ``_extension.load`` compares
    the same public versions at import.
    """
    return f"torch=={str(torch.__version__).split('+', 1)[0]}"


def get_extensions_and_cmdclass() -> tuple[list, dict]:
    if _flag("LIMUON_BUILD_CUDA"):
        sys.exit(
            "error: LIMUON_BUILD_CUDA=1: limuon-kernels has no CUDA C++ code to build. Its GPU kernels are "
            "Triton kernels, compiled at run time for the GPU they run on (TORCH_CUDA_ARCH_LIST does not "
            "apply either); install triton next to it. Unset LIMUON_BUILD_CUDA to build the C++ CPU "
            "extension."
        )
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

    # Relative to ROOT (setuptools wants relative source paths), whatever the working directory.
    sources = sorted(
        os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    )
    # No hard-coded -std: BuildExtension picks the standard the installed torch headers need.
    # -g0 overrides the -g of Python's own CFLAGS: the debug info made _C 18 MB instead of 0.4 MB, in every
    # wheel. The symbol table stays, so backtraces still name the kernels; LIMUON_DEBUG=1 builds with -g.
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"] if os.name != "nt" else ["/O2"]
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
    return [ext], {"build_ext": _with_torch_version_file(BuildExtension.with_options(use_ninja=True))}


def _with_torch_version_file(build_ext: type) -> type:
    """``build_ext`` that also writes ``limuon_kernels/_C_torch_version.txt`` next to the built ``_C``.

    The file holds the ``torch.__version__`` that ``_C`` is compiled against. ``_extension.load`` reads it
    before importing ``_C``: importing runs ``_C``'s kernel registrations, so a version check made after
    the import (``_C.TORCH_VERSION``) comes too late to keep wrong-ABI kernels out of the dispatcher.
    Written wherever ``_C`` lands: the build folder (wheels, which take every file there) or, for
    ``pip install -e .`` (build_ext in place), the source tree, where ``.gitignore`` ignores it.
    """

    class BuildExtWithTorchVersion(build_ext):
        def run(self) -> None:
            super().run()  # leaves self.inplace as the caller set it, so the paths below are where _C is
            import torch

            for ext in self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(ext.name))
                with open(os.path.join(folder, TORCH_VERSION_FILE), "w", encoding="utf-8") as out:
                    out.write(f"{torch.__version__}\n")

    return BuildExtWithTorchVersion


ext_modules, cmdclass = get_extensions_and_cmdclass()
# An sdist is built against whichever torch is installed where it is built into a wheel: it keeps the
# loose requirement (its PKG-INFO marks Requires-Dist as Dynamic), and the wheel gets the pin.
if ext_modules and "sdist" not in sys.argv[1:]:
    import torch

    install_requires = [_torch_pin(torch)]
else:
    install_requires = ["torch>=2.9"]
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
    # Only the two packages (with subpackages such as limuon_kernels.triton): no tests, bench or scripts.
    packages=[
        *find_packages(ROOT, include=["limuon_kernels", "limuon_kernels.*"]),
        *find_packages(os.path.join(ROOT, "python"), include=["limuon", "limuon.*"]),
    ],
    package_dir={"limuon_kernels": "limuon_kernels", "limuon": "python/limuon"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=8", "numpy", "ruff", "build"],
        "triton": ["triton>=3.6"],
    },
    zip_safe=False,
)
