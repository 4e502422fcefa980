"""Ahead-of-time compile check of every shipped Triton kernel config, without a GPU.

    python -m limuon_kernels.compile_check [--arch 90] [--arch 80] [--module NAME] [-k SUBSTRING]

Imports every module of ``limuon_kernels/triton/`` (except ``_``-prefixed ones), reads its
``COMPILE_TARGETS`` (format: ``limuon_kernels/triton/_compile_targets.py``) and builds each config
for each requested arch (default: 90 and 80) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` — PTX and cubin, no driver.
Registers, stack frame and local memory come from ``cuobjdump --dump-resource-usage`` on the cubin
(the binary ships in the triton wheel, ``triton/backends/nvidia/bin/``; a compiled kernel's own
``n_regs``/``n_spills`` are only filled in when it is loaded on a device); spill bytes from
``ptxas -v`` run again on the kernel's PTX (a stack frame alone is no spill: libdevice's slow-path
sin/cos, used by ``tl.randn``, keeps a small local array). Prints one table row per
(kernel, config) and exits 1 if any module lacks ``COMPILE_TARGETS``, any config fails to compile,
spills registers, or needs more shared memory than the arch has.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Shared memory one block may use (the opt-in maximum), per compute capability.
_MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


@dataclass
class Row:
    module: str
    kernel: str
    config: str
    arch: int
    regs: int | None = None
    shared: int | None = None
    stack: int | None = None
    spill: int | None = None
    local: int | None = None
    mma: str = ""
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")


def find_cuobjdump() -> str | None:
    import triton

    candidates = [
        os.environ.get("TRITON_CUOBJDUMP_PATH", ""),
        str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"),
        shutil.which("cuobjdump") or "",
    ]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_ptxas(arch: int) -> list[str]:
    """ptxas binaries to try for ``arch``: the one this triton compiles with first, then the others."""
    import triton

    found = []
    try:  # triton >= 3.5
        from triton.backends.nvidia.compiler import get_ptxas

        found.append(get_ptxas(arch).path)
    except Exception:
        pass
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found += [os.environ.get("TRITON_PTXAS_PATH", ""), str(bin_dir / "ptxas-blackwell"), str(bin_dir / "ptxas")]
    found.append(shutil.which("ptxas") or "")
    return list(dict.fromkeys(p for p in found if p and os.path.isfile(p)))


def spill_bytes(ptx: str, ptxas_candidates: list[str]) -> int | None:
    """Spill stores + loads (bytes, all functions of the module) that ``ptxas -v`` reports for
    ``ptx``, with the arch of its ``.target`` line; None when no ptxas here accepts it."""
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if target is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for ptxas in ptxas_candidates:
            cmd = [ptxas, "-v", "-lineinfo", f"--gpu-name={target.group(1)}", path, "-o", os.path.join(tmp, "k.o")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stdout + proc.stderr)
                return sum(int(st) + int(ld) for st, ld in found)
    return None


def resource_usage(cubin: bytes, cuobjdump: str) -> dict[str, int]:
    """``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}`` of the (single) kernel in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run(
            [cuobjdump, "--dump-resource-usage", path], check=True, capture_output=True, text=True
        ).stdout
    line = next((ln for ln in text.splitlines() if "REG:" in ln), "")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def kernel_modules() -> list[str]:
    """Names of the kernel modules of ``limuon_kernels/triton/`` (without importing them)."""
    import limuon_kernels.triton as pkg

    return sorted(i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_"))


def discover(modules: list[str] | None = None) -> tuple[list[tuple[str, object]], list[Row]]:
    """``[(module name, KernelTarget)]`` from every kernel module (or those named), plus error rows
    for modules that fail to import or have no ``COMPILE_TARGETS``."""
    import limuon_kernels.triton as pkg
    from limuon_kernels.triton._compile_targets import as_kernel_target

    targets, errors = [], []
    for short in modules if modules is not None else kernel_modules():
        try:
            module = importlib.import_module(f"{pkg.__name__}.{short}")
        except Exception as exc:
            errors.append(Row(short, "-", "-", 0, error=f"import failed: {type(exc).__name__}: {exc}"))
            continue
        found = getattr(module, "COMPILE_TARGETS", None)
        if not found:
            errors.append(Row(short, "-", "-", 0, error="module defines no COMPILE_TARGETS"))
            continue
        for entry in found:
            try:
                targets.append((short, as_kernel_target(entry)))
            except Exception as exc:
                errors.append(Row(short, "-", "-", 0, error=f"bad COMPILE_TARGETS entry: {exc}"))
    return targets, errors


def _ast_source(fn, signature: dict, constexprs: dict, divisible: tuple[str, ...] = ()):
    """An ``ASTSource`` for the installed triton. 3.2+ (incl. 3.6, 3.9): name-keyed signature listing
    constexprs as ``"constexpr"``, constexprs by name, attrs keyed by argument-index paths.
    3.0/3.1: index-keyed signature of the runtime arguments only and ``constants=`` by index."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    signature = {a: t for a, t in signature.items() if not (t == "constexpr" and a in constexprs)}
    unknown = sorted((set(signature) | set(constexprs)) - set(names))
    both = sorted(set(signature) & set(constexprs))
    missing = [a for a in names if a not in signature and a not in constexprs]
    if unknown or both or missing:
        raise ValueError(f"signature/constexprs do not match the arguments {names}: unknown {unknown}, "
                         f"given twice {both}, missing {missing}")  # fmt: skip
    consts = dict(constexprs)
    consts.update({k: v for k, v in signature.items() if isinstance(v, int)})  # JIT-style "== 1" specialisation
    types = {k: v for k, v in signature.items() if not isinstance(v, int)}
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        full = {a: ("constexpr" if a in consts else types[a]) for a in names}
        # pointers 16-byte aligned, as the JIT specialises torch allocations
        aligned = [i for i, a in enumerate(names) if a in types and (types[a].startswith("*") or a in divisible)]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        return ASTSource(fn, full, constexprs=consts, attrs=attrs)
    legacy_sig = {i: types[a] for i, a in enumerate(names) if a in types}
    return ASTSource(fn, legacy_sig, constants={names.index(k): v for k, v in consts.items()})


def compile_one(module: str, target, config, arch: int, cuobjdump: str | None) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget

    row = Row(module, target.name, config.label, arch)
    start = time.perf_counter()
    try:
        fn = target.fn
        if not hasattr(fn, "arg_names") or not hasattr(fn, "cache_key"):
            raise TypeError(f"{fn!r} is not a JITFunction (is TRITON_INTERPRET set?)")
        src = _ast_source(fn, dict(target.signature), target.all_constexprs(config), target.divisible_by_16)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:
        row.error = f"compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
        row.seconds = time.perf_counter() - start
        return row
    row.seconds = time.perf_counter() - start
    meta = compiled.metadata
    row.shared = meta["shared"] if isinstance(meta, dict) else getattr(meta, "shared", None)
    ptx = compiled.asm.get("ptx", "")
    row.mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    if cuobjdump is None:
        row.error = "cuobjdump not found: cannot read registers and spills"
        return row
    usage = resource_usage(compiled.asm["cubin"], cuobjdump)
    row.regs, row.stack, row.local = usage.get("REG"), usage.get("STACK", 0), usage.get("LOCAL", 0)
    row.spill = spill_bytes(ptx, find_ptxas(arch))
    limit = _MAX_SHARED.get(arch)
    problems = []
    if row.spill:
        problems.append(f"spills {row.spill} B (ptxas -v spill stores + loads)")
    elif row.spill is None and (row.local or row.stack):  # no ptxas could tell: assume the worst
        problems.append(f"may spill: local {row.local} B, stack {row.stack} B (ptxas -v unavailable)")
    if limit is not None and row.shared is not None and row.shared > limit:
        problems.append(f"shared memory {row.shared} B > {limit} B available on sm_{arch}")
    if problems:
        row.error = "; ".join(problems)
    return row


def run(
    archs: list[int], select: str | None = None, modules: list[str] | None = None, out=sys.stdout, targets=None
) -> list[Row]:
    """Compile every target of ``modules`` (default: all) for ``archs``, or the given
    ``[(module, KernelTarget)]``; prints the table to ``out`` as it goes; returns the rows."""
    rows = []
    if targets is None:
        targets, rows = discover(modules)
    cuobjdump = find_cuobjdump()
    widths = (("regs", 5), ("shared", 7), ("stack", 5), ("spill", 5), ("local", 5), ("mma", 6))
    cols = " ".join(f"{c:>{w}}" for c, w in widths)
    header = f"{'arch':<6} {'kernel':<40} {cols} {'s':>5}  config"
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        print(f"{'':<6} {row.module + ': ' + row.error}", file=out)
    for arch in archs:
        for module, target in targets:
            for config in target.configs:
                if not config.applies_to(arch):
                    continue
                name = f"{module}.{target.name}"
                if select and select not in name:
                    continue
                row = compile_one(module, target, config, arch, cuobjdump)
                rows.append(row)

                def fmt(v):
                    return "?" if v is None else str(v)

                print(
                    f"sm_{arch:<3} {name:<40} {fmt(row.regs):>5} {fmt(row.shared):>7} {fmt(row.stack):>5} "
                    f"{fmt(row.spill):>5} {fmt(row.local):>5} {row.mma:>6} {row.seconds:>5.1f}  {row.config}"
                    + ("" if row.ok else f"  FAIL: {row.error}"),
                    file=out,
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(_MAX_SHARED),
                        help="compute capability to build for (repeatable; default: 90 and 80)")  # fmt: skip
    parser.add_argument("--module", action="append", help="only this kernel module, e.g. newton_schulz (repeatable)")
    parser.add_argument("-k", dest="select", help="only kernels whose 'module.kernel' name contains this")
    args = parser.parse_args(argv)
    if _interpreting():
        # @triton.jit under the interpreter yields functions that cannot be compiled: start afresh
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "limuon_kernels.compile_check", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode
    rows = run(args.arch or [90, 80], args.select, args.module)
    failed = [r for r in rows if not r.ok]
    compiled = sum(1 for r in rows if r.error is None or not r.error.startswith(("compile", "import", "module")))
    print(f"\n{len(rows)} kernel configs checked, {compiled} compiled, {len(failed)} failed")
    for r in failed:
        print(f"FAILED sm_{r.arch} {r.module}.{r.kernel} [{r.config}]: {r.error}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
