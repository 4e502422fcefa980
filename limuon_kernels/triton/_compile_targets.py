"""What ``python -m limuon_kernels.compile_check`` compiles: the ``COMPILE_TARGETS`` format.

Every module in ``limuon_kernels/triton/`` (except those starting with ``_``) exposes a module-level
list ``COMPILE_TARGETS: list[KernelTarget]`` with one entry per ``@triton.jit`` kernel (or per kernel
variant, when a constexpr flag such as ``NORMALIZE`` changes the code) and, in each entry, one
``KernelConfig`` per configuration the launcher can actually pick (every autotune config, every
fixed choice). The compile check builds each (target, config) for sm_90 and sm_80 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` on a machine without a GPU and
fails when one does not compile, spills registers, or needs more shared memory than the arch has.

Example (a module's tail)::

    from limuon_kernels.triton._compile_targets import KernelConfig, KernelTarget

    COMPILE_TARGETS = [
        KernelTarget(
            name="storm_update",
            fn=_storm_update_kernel,                       # the @triton.jit function itself
            signature={                                    # every NON-constexpr argument, in any order
                "m_ptr": "*fp32", "g_new_ptr": "*bf16", "g_old_ptr": "*bf16",
                "n": "i64", "momentum": "fp32",
                "stride_col": 1,                           # an int: compiled as the value 1, the way the
            },                                             # JIT specialises integer arguments equal to 1
            constexprs={"UPCAST": False},                  # constexprs common to every config (optional)
            configs=[
                KernelConfig({"BLOCK": 1024}, num_warps=4, num_stages=1),
                KernelConfig({"BLOCK": 4096}, num_warps=8, num_stages=1, archs=(90,)),   # sm_90 only
            ],
        ),
    ]

Type strings are Triton's: ``*fp32``, ``*bf16``, ``*fp16``, ``*i32``, ``i32``, ``i64``, ``fp32``,
``i1``, .... An argument may also be listed as ``"constexpr"`` in ``signature`` if its value is in
the constexprs. Pointer arguments are compiled as 16-byte aligned (as torch allocations are, and as
the JIT specialises them); integer arguments named in ``divisible_by_16`` are compiled as multiples
of 16 (only where every real launch passes one). Use the dtypes the GPU path really launches with
(bf16 NS inputs, fp32 state). A config may also be written as a plain dict
``dict(constexprs={...}, num_warps=4, num_stages=3)``; ``KernelTarget`` normalises it.

``as_kernel_target`` also accepts the flat one-config dict
``{"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "divisible_by_16"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: constexpr values plus ``num_warps``/``num_stages``.

    ``archs``: the compute capabilities (as 80, 90, ...) this config is shipped for; ``None`` means
    every arch the compile check builds. ``name`` is a short label for the report (default: the
    constexpr values and warps/stages).
    """

    constexprs: Mapping[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    archs: tuple[int, ...] | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        values = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{values} w{self.num_warps} s{self.num_stages}"

    def applies_to(self, arch: int) -> bool:
        return self.archs is None or arch in self.archs


@dataclass(frozen=True)
class KernelTarget:
    """One ``@triton.jit`` kernel (or variant) and the configs shipped for it.

    ``signature`` maps every non-constexpr argument to a Triton type string (or to the int 1, see the
    module docstring); ``constexprs`` holds constexpr values shared by all configs, merged under
    each config's own. Together they must name every argument of ``fn`` exactly once.
    """

    name: str
    fn: Any
    signature: Mapping[str, str | int]
    configs: Sequence[KernelConfig | Mapping[str, Any]]
    constexprs: Mapping[str, Any] = field(default_factory=dict)
    divisible_by_16: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        configs = tuple(c if isinstance(c, KernelConfig) else KernelConfig(**c) for c in self.configs)
        object.__setattr__(self, "configs", configs)
        if not configs:
            raise ValueError(f"KernelTarget {self.name!r} has no configs")
        fn = self.fn
        while hasattr(fn, "fn") and not hasattr(fn, "cache_key"):  # an Autotuner/Heuristics wrapper
            fn = fn.fn
        object.__setattr__(self, "fn", fn)

    def all_constexprs(self, config: KernelConfig) -> dict[str, Any]:
        return {**self.constexprs, **config.constexprs}


def as_kernel_target(entry: KernelTarget | Mapping[str, Any]) -> KernelTarget:
    """``entry`` itself, or a ``KernelTarget`` built from the flat one-config dict form."""
    if isinstance(entry, KernelTarget):
        return entry
    if not isinstance(entry, Mapping) or "fn" not in entry:
        raise TypeError(f"a COMPILE_TARGETS entry must be a KernelTarget, got {type(entry).__name__}")
    constexprs = dict(entry.get("constexprs", {}))
    signature = {a: t for a, t in entry["signature"].items() if not (t == "constexpr" or a in constexprs)}
    pointers = {a for a, t in signature.items() if isinstance(t, str) and t.startswith("*")}
    config = KernelConfig(constexprs, num_warps=entry.get("num_warps", 4), num_stages=entry.get("num_stages", 3))
    return KernelTarget(
        entry.get("name", getattr(entry["fn"], "__name__", "?")),
        entry["fn"],
        signature,
        [config],
        divisible_by_16=tuple(a for a in entry.get("divisible_by_16", ()) if a not in pointers),
    )
