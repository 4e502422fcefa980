"""``_extension.load``: ``limuon_kernels._C`` is imported only when the file next to it names the running torch.

Importing ``_C`` runs its ``TORCH_LIBRARY_IMPL`` registrations, so a ``_C`` built for another torch must be
refused before the import. Each case runs in a fresh interpreter on a copy of the installed package (the
built ``_C`` included) whose ``_C_torch_version.txt`` is rewritten or removed; the working tree is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import limuon_kernels

PACKAGE = Path(limuon_kernels.__file__).parent
VERSION_FILE = "_C_torch_version.txt"  # the name setup.py writes and _extension.load reads
PUBLIC = torch.__version__.split("+", 1)[0]

pytestmark = pytest.mark.skipif(not limuon_kernels.HAS_C_EXT, reason="the C++ extension is not built")

PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import limuon_kernels as lk
        from limuon_kernels import info
        report = info.collect()
    m, g_new, g_old = torch.ones(3, 4), torch.full((3, 4), 2.0), torch.full((3, 4), 0.5)
    lk.storm_update_(m, g_new, g_old, 0.9)  # m <- g_new + 0.9 (m - g_old) = 2 + 0.9 * 0.5 = 2.45
    print(json.dumps({
        "package": lk.__file__,
        "imported": "limuon_kernels._C" in sys.modules,
        "cpu_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("limuon::storm_update_", "CPU"),
        "has_c_ext": lk.HAS_C_EXT,
        "backends": lk.available_backends(),
        "built_with": report["torch (extension built against)"],
        "status": report["C++ extension _C"],
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught if "limuon" in str(w.message)],
        "storm_ok": bool(torch.allclose(m, torch.full((3, 4), 2.45))),
    }))
    """
)


def _probe(tmp_path: Path, version: str | None, stand_in: str | None = None) -> dict:
    """Import a copy of the package whose version file says ``version`` (None: no file) in a new interpreter.

    ``stand_in``: put a module reporting ``TORCH_VERSION = stand_in`` in ``sys.modules`` as ``_C`` first,
    as a ``_C`` copied in without its version file would report.
    """
    copy = tmp_path / "site" / "limuon_kernels"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    version_file = copy / VERSION_FILE
    version_file.unlink(missing_ok=True)
    if version is not None:
        version_file.write_text(version + "\n")
    prelude = ""
    if stand_in is not None:
        prelude = (
            "import sys, types; fake = types.ModuleType('limuon_kernels._C'); "
            f"fake.TORCH_VERSION = {stand_in!r}; sys.modules['limuon_kernels._C'] = fake\n"
        )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "LIMUON_BACKEND")}
    env["PYTHONPATH"] = str(copy.parent)  # ahead of the editable install's finder and of site-packages
    proc = subprocess.run([sys.executable, "-c", prelude + PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).parent == copy, result["package"]  # the copy ran, not the working tree
    assert result["storm_ok"], result  # the ops work either way (reference kernels on a refusal)
    return result


def test_matching_version_file_loads_the_extension(tmp_path):
    """The control: with the file naming this torch, ``_C`` is imported and its CPU kernels are registered."""
    got = _probe(tmp_path, torch.__version__)
    assert got["imported"] and got["cpu_kernel"] and got["has_c_ext"], got
    assert "cpp" in got["backends"] and got["status"] == "loaded"
    assert got["warnings"] == []


def test_another_local_build_of_the_same_torch_loads(tmp_path):
    """+cpu and +cu130 builds of one torch release share the C++ ABI (the wheel pins the public version)."""
    got = _probe(tmp_path, f"{PUBLIC}+cu130")
    assert got["imported"] and got["has_c_ext"], got


def test_another_torch_is_refused_before_import(tmp_path):
    got = _probe(tmp_path, "2.0.0+cpu")
    assert not got["imported"], "_C was imported: its kernel registrations already ran"
    assert not got["cpu_kernel"], "a C++ CPU kernel of another torch is registered"
    assert not got["has_c_ext"] and "cpp" not in got["backends"]
    assert got["built_with"] == "2.0.0+cpu"
    assert len(got["warnings"]) == 1, got["warnings"]
    (message,) = got["warnings"]
    assert message.startswith("RuntimeWarning: limuon_kernels._C was built against torch 2.0.0+cpu")
    assert f"but torch {torch.__version__} is running" in message
    assert "pip install --no-build-isolation" in message
    assert got["status"].startswith("not loaded: limuon_kernels._C was built against torch 2.0.0+cpu")


def test_missing_version_file_is_refused_before_import(tmp_path):
    got = _probe(tmp_path, None)
    assert not got["imported"] and not got["cpu_kernel"] and not got["has_c_ext"], got
    assert len(got["warnings"]) == 1, got["warnings"]
    assert VERSION_FILE in got["warnings"][0] and "is missing" in got["warnings"][0]
    assert "pip install --no-build-isolation" in got["warnings"][0]
    assert got["built_with"].startswith("unknown")


def test_C_reporting_another_torch_is_still_refused_after_import(tmp_path):
    """The second check: a ``_C`` whose file matches but which reports another torch (copied in alone)."""
    got = _probe(tmp_path, torch.__version__, stand_in="2.0.0+cpu")
    assert not got["has_c_ext"] and "cpp" not in got["backends"]
    assert got["built_with"] == "2.0.0+cpu"
    (message,) = got["warnings"]
    assert "built against torch 2.0.0+cpu" in message and torch.__version__ in message


def test_build_wrote_the_version_file_next_to_C():
    """setup.py writes the torch ``_C`` is compiled against next to it (in place for ``pip install -e .``)."""
    from limuon_kernels import _C

    if Path(_C.__file__).parent != PACKAGE:
        pytest.skip("_C is not next to the package's sources")
    assert (PACKAGE / VERSION_FILE).read_text().strip() == _C.TORCH_VERSION == torch.__version__
