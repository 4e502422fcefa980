"""Loads the compiled C++ extension ``limuon_kernels._C`` if it is there and usable.

Importing ``_C`` registers the C++ CPU kernels of the ``limuon::`` ops with the dispatcher, so it must
happen after ``ops.py`` has defined the schemas. A missing or broken extension is not fatal: every op
keeps its reference implementation, and one warning says how to rebuild.
"""

from __future__ import annotations

import importlib
import warnings

import torch

HAS_C_EXT: bool = False
LOAD_ERROR: str | None = None
BUILT_WITH_TORCH: str | None = None

_REBUILD_HINT = (
    "limuon-kernels runs on its reference PyTorch kernels only. To get the C++ CPU kernels, rebuild "
    "against the installed torch: `pip install --no-build-isolation -e .` (or reinstall the wheel "
    "built for this torch)."
)


def load() -> bool:
    """Import ``limuon_kernels._C`` once; record why it failed if it did."""
    global HAS_C_EXT, LOAD_ERROR, BUILT_WITH_TORCH
    if HAS_C_EXT or LOAD_ERROR is not None:
        return HAS_C_EXT
    try:
        ext = importlib.import_module("limuon_kernels._C")
    except ImportError as exc:
        LOAD_ERROR = f"limuon_kernels._C could not be imported: {exc}"
    else:
        BUILT_WITH_TORCH = getattr(ext, "TORCH_VERSION", None)
        running = torch.__version__.split("+")[0]
        if BUILT_WITH_TORCH is not None and BUILT_WITH_TORCH.split("+")[0] != running:
            LOAD_ERROR = (
                f"limuon_kernels._C was built against torch {BUILT_WITH_TORCH} but torch {torch.__version__} "
                "is running"
            )
        else:
            HAS_C_EXT = True
    if not HAS_C_EXT:
        warnings.warn(f"{LOAD_ERROR}. {_REBUILD_HINT}", RuntimeWarning, stacklevel=3)
    return HAS_C_EXT
