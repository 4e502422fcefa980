#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and builds the package into it.
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run again (each step is skipped when done).
#   LIMUON_VENV   where the environment lives (default: <repo>/.venv)
#   LIMUON_TORCH  the torch requirement to install when none is importable (default: torch==2.13.0,
#                 the CPU build these machines carry; never let pip resolve a bare `torch`)
#   LIMUON_TRITON the triton requirement to install when none is importable (default: triton==3.9.0)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIMUON_VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
TORCH_REQ="${LIMUON_TORCH:-torch==2.13.0}"
TRITON_REQ="${LIMUON_TRITON:-triton==3.9.0}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # Reuse the torch of the python3 we were started with when it has one (the GPU machines ship
  # torch+triton in a venv of their own and have no network). --system-site-packages would not do:
  # from inside a venv it exposes the base interpreter's packages, not that venv's.
  if python3 -c "import torch" >/dev/null 2>&1; then
    purelib=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    python3 -c "import site; print('\n'.join(site.getsitepackages()))" > "$purelib/_limuon_parent_site.pth"
  fi
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

have() { "$PY" -c "import $1" >/dev/null 2>&1; }

have torch || "$PY" -m pip install -q "$TORCH_REQ"
# Build tools for `pip install --no-build-isolation` (torch must not be a build requirement).
have setuptools && have wheel && have ninja || "$PY" -m pip install -q "setuptools>=64" wheel ninja
# Triton: the GPU kernels, and their CPU interpreter for tests. Optional for the package itself.
have triton || "$PY" -m pip install -q "$TRITON_REQ" || echo "warning: triton could not be installed" >&2

# Build the C++ extension in place when it is missing or older than its sources.
so=$(ls "$ROOT"/limuon_kernels/_C*.so 2>/dev/null | head -n 1 || true)
stale=1
if [ -n "$so" ] && [ -z "$(find "$ROOT/csrc" "$ROOT/setup.py" -newer "$so" -type f 2>/dev/null)" ] \
   && (cd / && "$PY" -c "import limuon, limuon_kernels, sys; sys.exit(0 if limuon_kernels.HAS_C_EXT else 1)") \
      >/dev/null 2>&1; then
  stale=0
fi
# Test tools (the `test` extra). A GPU machine without network already has pytest and numpy.
have pytest && have numpy || "$PY" -m pip install -q pytest numpy
have ruff || "$PY" -m pip install -q "ruff==0.17.6" || echo "warning: ruff could not be installed" >&2
# Plots of bench/report.py (run by scripts/bench.sh); without it the report is markdown only.
have matplotlib || "$PY" -m pip install -q matplotlib || echo "warning: matplotlib could not be installed" >&2
# `python -m build` (sdists; tests/test_wheel.py uses it and skips its sdist tests without it). Asked with
# -m rather than `have`: a build/ folder in the working directory would pass for the package.
"$PY" -m build --version >/dev/null 2>&1 || "$PY" -m pip install -q build || echo "warning: build could not be installed" >&2
# PyTorch Lightning and Hugging Face's Trainer, for tests/test_integrations.py and examples/. Pinned, and
# installed under a constraint that pins the torch already here: each of them depends on torch, and pip
# must never swap it. Installed only when missing (about 30 s, 215 MB). Where that fails (a GPU machine
# without network) those tests skip; under CI=true they must run, so the set-up fails instead.
# LIMUON_NO_INTEGRATIONS=1 skips this step (the tests then skip too, except under CI=true).
INTEGRATION_REQS=(pytorch-lightning==2.6.6 transformers==5.23.0 accelerate==1.15.0)
if [ "${LIMUON_NO_INTEGRATIONS:-0}" != 1 ] && ! "$PY" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('pytorch_lightning', 'transformers', 'accelerate')))"; then
  constraints=$(mktemp)
  "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
  if ! "$PY" -m pip install -q -c "$constraints" "${INTEGRATION_REQS[@]}"; then
    if [ "${CI:-}" = true ]; then
      echo "error: could not install ${INTEGRATION_REQS[*]} (needed by tests/test_integrations.py in CI)" >&2
      rm -f "$constraints"
      exit 1
    fi
    echo "warning: ${INTEGRATION_REQS[*]} could not be installed: the integration tests will skip" >&2
  fi
  rm -f "$constraints"
fi
if [ "$stale" = 1 ]; then
  # --no-deps: torch and the test tools are already in place (see above); the build must not pull a new torch.
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
fi
(cd / && "$PY" -c "import limuon_kernels as lk; print('limuon-kernels', lk.__version__, '| backends:', lk.available_backends())")
