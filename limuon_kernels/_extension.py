"""Loads the compiled C++ extension ``limuon_kernels._C`` if it is there and built for the running torch.

Importing ``_C`` registers the C++ CPU kernels of the ``limuon::`` ops with the dispatcher, so it must
happen after ``ops.py`` has defined the schemas, and only when ``_C`` matches the running torch: its
static initialisers run at import, so a ``_C`` built for another torch (another C++ ABI) would already
have put its kernels behind ``torch.ops.limuon.*`` by the time ``_C.TORCH_VERSION`` could be read. The
torch version is therefore read first from ``_C_torch_version.txt``, which ``setup.py`` writes next to
``_C`` when it builds it; ``_C`` is imported only when that file names the running torch.
``_C.TORCH_VERSION`` is checked again after the import, for a ``_C`` copied in without its file.

A missing, mismatched or broken extension is not fatal: every op keeps its reference implementation,
and one warning says why and how to rebuild.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from pathlib import Path

import torch

HAS_C_EXT: bool = False
LOAD_ERROR: str | None = None
BUILT_WITH_TORCH: str | None = None

# Same name as in setup.py (TORCH_VERSION_FILE), which writes it next to the compiled _C.
TORCH_VERSION_FILE = Path(__file__).with_name("_C_torch_version.txt")

_REBUILD_HINT = (
    "limuon-kernels runs on its reference PyTorch kernels only. To get the C++ CPU kernels, rebuild "
    "against the installed torch: `pip install --no-build-isolation -e .` (or reinstall the wheel "
    "built for this torch)."
)


def _public(version: str) -> str:
    # "2.13.0+cpu" and "2.13.0+cu130" share the C++ ABI (setup.py pins the public version too)
    return version.split("+", 1)[0]


def _read_built_with() -> str | None:
    """The torch version ``_C`` was compiled against, from the file next to it; None when absent or empty."""
    try:
        return TORCH_VERSION_FILE.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _mismatch(built_with: str) -> str | None:
    if _public(built_with) == _public(torch.__version__):
        return None
    return f"limuon_kernels._C was built against torch {built_with} but torch {torch.__version__} is running"


def _is_built() -> bool:
    """A compiled ``_C`` is there to import (found without importing it)."""
    try:
        return importlib.util.find_spec("limuon_kernels._C") is not None
    except ValueError:  # already in sys.modules without a spec, as a test's stand-in is
        return True


def _check_before_import() -> str | None:
    """Why ``_C`` must not be imported (None: import it). Sets ``BUILT_WITH_TORCH`` from the file."""
    global BUILT_WITH_TORCH
    if not _is_built():
        return "limuon_kernels._C could not be imported: it is not built (no compiled module in the package)"
    BUILT_WITH_TORCH = _read_built_with()
    if BUILT_WITH_TORCH is None:
        return (
            f"limuon_kernels._C was not imported: {TORCH_VERSION_FILE.name}, which names the torch it was built "
            f"against, is missing next to it ({TORCH_VERSION_FILE.parent}), so it may be built for another torch"
        )
    return _mismatch(BUILT_WITH_TORCH)


def load() -> bool:
    """Import ``limuon_kernels._C`` once, if it is built for the running torch; record why not otherwise."""
    global HAS_C_EXT, LOAD_ERROR, BUILT_WITH_TORCH
    if HAS_C_EXT or LOAD_ERROR is not None:
        return HAS_C_EXT
    LOAD_ERROR = _check_before_import()
    if LOAD_ERROR is None:
        try:
            ext = importlib.import_module("limuon_kernels._C")
        except ImportError as exc:
            LOAD_ERROR = f"limuon_kernels._C could not be imported: {exc}"
        else:
            BUILT_WITH_TORCH = getattr(ext, "TORCH_VERSION", None) or BUILT_WITH_TORCH
            LOAD_ERROR = _mismatch(BUILT_WITH_TORCH) if BUILT_WITH_TORCH else None
            HAS_C_EXT = LOAD_ERROR is None
    if not HAS_C_EXT:
        warnings.warn(f"{LOAD_ERROR}. {_REBUILD_HINT}", RuntimeWarning, stacklevel=3)
    return HAS_C_EXT
