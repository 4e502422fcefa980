"""Every shipped Triton kernel config compiles for sm_90 and sm_80 without spilling, on a machine
without a GPU (``python -m limuon_kernels.compile_check``).

Runs in subprocesses: under ``TRITON_INTERPRET=1`` (set by conftest when there is no GPU)
``@triton.jit`` yields functions that cannot be compiled, so the check needs a fresh interpreter
without it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from limuon_kernels.compile_check import kernel_modules

pytestmark = pytest.mark.slow
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(args, timeout=900):
    return subprocess.run(
        [sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("module", kernel_modules())
def test_module_compiles_for_sm90_and_sm80(module):
    proc = _run(["-m", "limuon_kernels.compile_check", "--arch", "90", "--arch", "80", "--module", module])
    report = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert "sm_90" in proc.stdout and "sm_80" in proc.stdout, report
    assert " 0 failed" in proc.stdout, report


def test_failures_are_reported(tmp_path):
    """A config that cannot compile and one that needs too much shared memory make the check fail;
    a module without COMPILE_TARGETS is an error too."""
    script = textwrap.dedent(
        """
        import io, sys
        import triton, triton.language as tl
        from limuon_kernels import compile_check as cc
        from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget

        @triton.jit
        def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

        @triton.jit
        def dot(x_ptr, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + o[:, None] * BLOCK + o[None, :])
            tl.store(x_ptr + o[:, None] * BLOCK + o[None, :], tl.dot(x, x))

        targets = [
            ("demo", KernelTarget("copy", copy, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
                                  [KernelConfig({"BLOCK": 1024})])),
            ("demo", KernelTarget("copy-bad", copy, {"x_ptr": "*fp32", "n": "i32"}, [KernelConfig({"BLOCK": 1024})])),
            ("demo", KernelTarget("dot-big", dot, {"x_ptr": "*fp32"}, [KernelConfig({"BLOCK": 128}, num_warps=8)])),
        ]
        rows = cc.run([86], targets=targets, out=io.StringIO())  # sm_86: 99 KB of shared memory
        print([(r.kernel, r.ok, r.error) for r in rows])
        _, errors = cc.discover(["_compile_targets"])
        print(errors[0].error)
        """
    )
    path = tmp_path / "demo_targets.py"  # @triton.jit needs its source in a file
    path.write_text(script)
    proc = _run([str(path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    results = {kernel: (ok, error) for kernel, ok, error in eval(lines[-2])}
    assert results["copy"] == (True, None)
    assert not results["copy-bad"][0] and "missing ['y_ptr']" in results["copy-bad"][1]
    assert not results["dot-big"][0] and "shared memory" in results["dot-big"][1]
    assert "no COMPILE_TARGETS" in lines[-1]
