"""Kernel throughput of every public limuon_kernels op, on every available backend, next to its peers.

What it measures: wall time of one call of ``newton_schulz``, ``rsvd``, ``storm_update_``,
``lowrank_storm``, ``mars_update_`` and ``lowrank_axpby`` per provider, where a provider is a
limuon backend (``"torch"`` = the eager reference, ``"cpp"`` = the C++ CPU kernels, ``"triton"`` on
CUDA; whichever ``available_backends()`` lists) or a peer timed in the same run:
``torch.optim.Muon``'s own Newton–Schulz (looped over the batch, as Muon does per parameter),
``torch.svd_lowrank`` (same sketch width and power iterations) and a plain eager 3-op STORM update.
Shapes are the weights of GPT-2 small (= DistilGPT2's), GPT-2 medium and ViT-S/16, a stack of
GPT-2 small's 12 attention-sized matrices, and a 4096² square.

How to read it: median and p20/p80 are milliseconds per call (GPU: ``triton.testing.do_bench``;
CPU: ``torch.utils.benchmark`` blocked_autorange). ``throughput`` is FLOP/s for Newton–Schulz and
RSVD (the dense formulas counted below) and effective GB/s (useful bytes read + written once) for
the elementwise ops, so an unfused eager peer shows a *lower* GB/s than the bytes it really moves.
``%peak`` compares with a dense matmul (same compute dtype) or a DRAM-sized tensor copy measured
on this machine in this run; above 100% means the working set sat in cache. ``speedup`` is the
reference provider's median over this row's median; rows with another compute dtype (Muon: bf16)
are not the same arithmetic. Results go to ``bench/results/kernels-<device>-<date>.json`` (one
list of records per run). CPU timings share the cores with anything else running: each record
keeps the 1-minute load average (``loadavg_1m``).

    PYTHONPATH=. python bench/bench_kernels.py --quick [--ops rsvd,storm_update_] [--out -]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
from _common import format_table, log, measure, run_meta, warn_if_loaded, write_records

import limuon_kernels as lk
from limuon_kernels.ns_coefficients import KELLER

try:  # torch.optim.Muon's Newton–Schulz (torch >= 2.9; private, so optional)
    from torch.optim._muon import _zeropower_via_newtonschulz as muon_ns
except ImportError:
    muon_ns = None

OPS = ("newton_schulz", "rsvd", "storm_update_", "lowrank_storm", "mars_update_", "lowrank_axpby")
NS_STEPS = 5  # torch.optim.Muon's default ns_steps
RANK, OVERSAMPLE, POWER_ITERS = 16, 5, 0  # paper ranks r = 8/16 (ALGORITHM.md); op defaults otherwise
MOMENTUM, GAMMA = 0.9, 0.025
# GPT-2 small / DistilGPT2 (HF Conv1D layout in x out): attn.c_proj, attn.c_attn, mlp.c_fc, mlp.c_proj;
# GPT-2 medium (d=1024) and ViT-S/16 (d=384, qkv 384x1152, MLP 1536) likewise; GPT-2 small's 12
# attention projections as one batch; a 4096² square (7B-class hidden size).
GPT2_SMALL = [(768, 768), (768, 2304), (768, 3072), (3072, 768)]
GPT2_MEDIUM = [(1024, 1024), (1024, 3072), (1024, 4096), (4096, 1024)]
VIT_S16 = [(384, 384), (384, 1152), (384, 1536), (1536, 384)]
SHAPES = [*GPT2_SMALL, *GPT2_MEDIUM, *VIT_S16, (12, 768, 768), (4096, 4096)]
QUICK_CPU_SHAPES = [(768, 768), (768, 3072), (3, 768, 768)]

Fn = Callable[[], object]


def case_name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(batch, m, n) of a (..., m, n) shape."""
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def make_case(op: str, shape: tuple[int, ...], dev: torch.device) -> tuple[float, str, torch.dtype, Fn, dict]:
    """(work, kind, compute dtype, limuon call, {peer name: (call, compute dtype)}) for one op and shape.

    ``work`` is FLOPs (kind "flop") or bytes (kind "byte"); every input is fp32.
    """
    f32 = torch.float32
    batch, m, n = dims(shape)
    x = torch.randn(shape, device=dev)
    if op == "newton_schulz":
        # Per iteration A = X Xᵀ (2s²l), A·A (2s³), B·X (2s²l) with s = min side, l = max side.
        s, l = min(m, n), max(m, n)
        flops = NS_STEPS * batch * (4 * s * s * l + 2 * s**3)
        peers = {}
        if muon_ns is not None:
            mats = list(x.reshape(-1, m, n))
            peers["torch.optim.Muon"] = (
                lambda: [muon_ns(g, KELLER, NS_STEPS, 1e-7) for g in mats],
                torch.bfloat16,  # Muon always casts to bf16
            )
        return flops, "flop", lk.get_ns_compute_dtype(dev), lambda: lk.newton_schulz(x, steps=NS_STEPS), peers
    if op == "rsvd":
        # Counted: sketch Y = MΩ (2mnk) and B = QᵀM (2mnk), QR of Y (2mk²); each power iteration adds
        # MᵀQ and MZ (4mnk) and two QRs (2mk² + 2nk²). Not counted: the k×n SVD and U = QŨ (small).
        k, q = min(RANK + OVERSAMPLE, m, n), POWER_ITERS
        flops = batch * ((4 + 4 * q) * m * n * k + (1 + q) * 2 * m * k * k + q * 2 * n * k * k)
        peers = {"torch.svd_lowrank": (lambda: torch.svd_lowrank(x, q=k, niter=q), f32)}
        return flops, "flop", f32, lambda: lk.rsvd(x, RANK, OVERSAMPLE, POWER_ITERS), peers
    g_new, g_old = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    size, elem = x.numel(), x.element_size()
    if op == "storm_update_":  # read m, g_new, g_old; write m
        eager = lambda: x.sub_(g_old).mul_(MOMENTUM).add_(g_new)  # noqa: E731
        call = lambda: lk.storm_update_(x, g_new, g_old, MOMENTUM)  # noqa: E731
        return 4 * size * elem, "byte", f32, call, {"eager 3-op": (eager, f32)}
    if op == "mars_update_":  # read b, g; write b and the returned d
        return 4 * size * elem, "byte", f32, lambda: lk.mars_update_(x, g_new, MOMENTUM, GAMMA), {}
    U, V = torch.randn(*shape[:-1], RANK, device=dev), torch.randn(*shape[:-2], n, RANK, device=dev)
    S = torch.rand(*shape[:-2], RANK, device=dev)
    factors = (U.numel() + S.numel() + V.numel()) * elem
    if op == "lowrank_storm":  # read U, S, V, g_new, g_old; write the result
        call = lambda: lk.lowrank_storm(U, S, V, g_new, g_old, MOMENTUM)  # noqa: E731
        return factors + 3 * size * elem, "byte", f32, call, {}
    if op == "lowrank_axpby":  # read U, S, V, g; write the result
        return factors + 2 * size * elem, "byte", f32, lambda: lk.lowrank_axpby(U, S, V, g_new, 0.5, 1.0), {}
    raise ValueError(f"Invalid op: {op!r}; expected one of {OPS}")


def peak(kind: str, dtype: torch.dtype, dev: torch.device, quick: bool, cache: dict[str, float]) -> float:
    """Measured roof in FLOP/s (square matmul in ``dtype``) or bytes/s (copy: read + write)."""
    key = f"matmul {str(dtype).removeprefix('torch.')}" if kind == "flop" else "copy"
    if key not in cache:
        cuda = dev.type == "cuda"
        if kind == "flop":
            size = 8192 if cuda else 1024
            a = torch.randn(size, size, device=dev, dtype=dtype)
            cache[key] = 2 * size**3 / (measure(lambda: a @ a, cuda, quick)[0] / 1e3)
        else:
            src = torch.empty((1 << 28) if cuda else (1 << 25), device=dev)
            dst = torch.empty_like(src)
            cache[key] = 2 * src.numel() * src.element_size() / (measure(lambda: dst.copy_(src), cuda, quick)[0] / 1e3)
    return cache[key]


def providers(dev: torch.device) -> list[str]:
    """limuon backends that have kernels for ``dev`` (cpp: CPU tensors; triton: CUDA tensors)."""
    own = {"cpp": "cpu", "triton": "cuda"}
    return [b for b in lk.available_backends() if own.get(b, dev.type) == dev.type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (on CPU) and repetitions")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--out", default=None, help="JSON path ('-': none; default bench/results/kernels-...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if bad := [o for o in ops if o not in OPS]:
        ap.error(f"unknown op(s) {bad}; expected a subset of {list(OPS)}")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    shapes = QUICK_CPU_SHAPES if args.quick and not cuda else SHAPES
    flop_unit, flop_scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    meta, backends = run_meta(dev, args.quick), providers(dev)
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | backends {backends}")
    warn_if_loaded(meta, dev)
    torch.manual_seed(0)
    records: list[dict] = []
    peaks: dict[str, float] = {}
    start = time.perf_counter()
    for shape in shapes:
        for op in ops:
            work, kind, cdtype, call, peers = make_case(op, shape, dev)
            runs = [(b, call, cdtype) for b in backends] + [(p, f, d) for p, (f, d) in peers.items()]
            ref_ms = None
            for provider, fn, dtype in runs:
                log(f"  [{time.perf_counter() - start:6.1f}s] {case_name(shape):>12} {op:<14} {provider:<18}", "")
                lk.set_backend(provider if provider in backends else "auto")
                try:
                    med, p20, p80 = measure(fn, cuda, args.quick)
                except Exception as exc:  # a backend missing one kernel must not stop the whole run
                    log(f" failed: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    lk.set_backend("auto")
                log(f" {med:9.3f} ms")
                ref_ms = med if provider == "torch" else ref_ms
                rate = work / (med / 1e3)
                flop = kind == "flop"
                records.append({
                    **meta, "case": case_name(shape), "shape": list(shape), "op": op, "provider": provider,
                    "dtype": "float32", "compute_dtype": str(dtype).removeprefix("torch."),
                    "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                    "metric": flop_unit if flop else "GB/s", "value": rate / (flop_scale if flop else 1e9),
                    "pct_of_peak": 100 * rate / peak(kind, dtype, dev, args.quick, peaks),
                    "peak_fraction": rate / peak(kind, dtype, dev, args.quick, peaks),
                    "speedup_vs_torch": ref_ms / med if ref_ms else None,
                })  # fmt: skip
    print_table(records)
    roofs = [f"{k} {v / (1e9 if k == 'copy' else flop_scale):.1f}" for k, v in peaks.items()]
    print(f"# peaks ({flop_unit}, copy GB/s): {', '.join(roofs)} | wall {time.perf_counter() - start:.1f}s")
    write_records(records, "kernels", dev, args.out)
    return 0


def print_table(records: list[dict]) -> None:
    head = ("case", "op", "provider", "cdtype", "median ms", "p20", "p80", "throughput", "%peak", "speedup")
    rows = []
    for r in records:
        times = [f"{r[k]:.3f}" for k in ("median_ms", "p20_ms", "p80_ms")]
        speedup = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        rate = [f"{r['value']:.1f} {r['metric']}", f"{r['pct_of_peak']:.0f}%", speedup]
        rows.append((r["case"], r["op"], r["provider"], r["compute_dtype"], *times, *rate))
    print(format_table(head, rows, n_left=4))


if __name__ == "__main__":
    sys.exit(main())
