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
CPU: ``torch.utils.benchmark`` blocked_autorange, or single calls for slow ones), each measurement
within a time budget (``BUDGET_S``: 2 s with ``--quick``, warm-up included; bench/_common.py
``measure_within``). A row the budget cut short says so (``"timeboxed": true``, ``calls``; marked †
in the table); a bf16 peer on a CPU without bf16 matrix instructions is first timed on one matrix of a
quarter of each side and, if the extrapolation exceeds the budget, not run: its row holds the
estimate (``"extrapolated": true``, ``measured_case``; marked ‡). ``throughput`` is FLOP/s for Newton–Schulz and
RSVD (the dense formulas counted below) and effective GB/s (useful bytes read + written once) for
the elementwise ops, so an unfused eager peer shows a *lower* GB/s than the bytes it really moves.
``%peak`` compares with a dense matmul (same compute dtype) or a DRAM-sized tensor copy measured
on this machine in this run; above 100% means the working set sat in cache. ``speedup`` is the
reference provider's median over this row's median; rows with another compute dtype (Muon: bf16)
are not the same arithmetic. Results go to ``bench/results/kernels-<device>-<date>.json`` (one
list of records per run). CPU timings share the cores with anything else running: each record
keeps the 1-minute load average (``loadavg_1m``).

    PYTHONPATH=. python bench/bench_kernels.py --quick [--ops rsvd,storm_update_] [--out -]

``--ns-methods`` adds ``ns_method_rows``: newton_schulz with method "standard", "gram" and "auto" on
768×3072 and on GPT-2 small's whole matrix set (``--ops ''`` to run only those).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable

import torch
from _common import (
    Smaller,
    Timing,
    bf16_matmul_native,
    format_table,
    log,
    measure,
    measure_within,
    print_plan,
    run_meta,
    time_call,
    timing_note,
    warn_if_loaded,
    write_records,
)

import limuon_kernels as lk
from limuon_kernels.ns_coefficients import KELLER

try:  # torch.optim.Muon's Newton–Schulz (torch >= 2.9; private, so optional)
    from torch.optim._muon import _zeropower_via_newtonschulz as muon_ns
except ImportError:
    muon_ns = None

OPS = ("newton_schulz", "rsvd", "storm_update_", "lowrank_storm", "mars_update_", "lowrank_axpby")
NS_STEPS = 5  # torch.optim.Muon's default ns_steps
RANK, OVERSAMPLE, POWER_ITERS = 16, 5, 0  # paper ranks r = 8/16 (docs/ALGORITHM.md); op defaults otherwise
MOMENTUM, GAMMA = 0.9, 0.025
# GPT-2 small / DistilGPT2 (HF Conv1D layout in x out): attn.c_proj, attn.c_attn, mlp.c_fc, mlp.c_proj;
# GPT-2 medium (d=1024) and ViT-S/16 (d=384, qkv 384x1152, MLP 1536) likewise; GPT-2 small's 12
# attention projections as one batch; a 4096² square (7B-class hidden size).
GPT2_SMALL = [(768, 768), (768, 2304), (768, 3072), (3072, 768)]
GPT2_MEDIUM = [(1024, 1024), (1024, 3072), (1024, 4096), (4096, 1024)]
VIT_S16 = [(384, 384), (384, 1152), (384, 1536), (1536, 384)]
SHAPES = [*GPT2_SMALL, *GPT2_MEDIUM, *VIT_S16, (12, 768, 768), (4096, 4096)]
QUICK_CPU_SHAPES = [(768, 768), (768, 3072), (3, 768, 768)]
BUDGET_S = {True: 2.0, False: 10.0}  # CPU: wall seconds per measurement, warm-up included: --quick, full
CUDA_BUDGET_S = {True: 0.5, False: 2.0}  # CUDA: do_bench's runs take 0.1-0.3 s (its rep: 50 / 200 ms)

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (on CPU) and repetitions")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--out", default=None, help="JSON path ('-': none; default bench/results/kernels-...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ns-methods", action="store_true",
                    help="also time newton_schulz method='standard' / 'gram' / 'auto' (ns_method_rows)")  # fmt: skip
    args = ap.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if bad := [o for o in args.ops if o not in OPS]:
        ap.error(f"unknown op(s) {bad}; expected a subset of {list(OPS)}")
    return args


def plan(args: argparse.Namespace) -> tuple[float, str]:
    """(upper bound in seconds, how it was found) of the measuring time: every measurement's budget."""
    dev = torch.device(args.device)
    shapes = QUICK_CPU_SHAPES if args.quick and dev.type != "cuda" else SHAPES
    n, roofs = 0, set()
    for shape in shapes:
        for op in args.ops:
            _, kind, cdtype, _, peers = make_case(op, shape, dev)
            n += len(providers(dev)) + len(peers)
            roofs |= {(kind, d if kind == "flop" else None) for d in (cdtype, *(d for _, d in peers.values()))}
    budget = (CUDA_BUDGET_S if dev.type == "cuda" else BUDGET_S)[args.quick]
    return (n + len(roofs)) * budget, f"{n} measurements and {len(roofs)} roofs, each within {budget:g} s"


def smaller_case(op: str, shape: tuple[int, ...], provider: str, work: float, dev: torch.device) -> Smaller:
    """One matrix of a quarter of each side (1/64 of one matrix's Newton–Schulz work), same op and provider."""
    small = (max(1, shape[-2] // 4), max(1, shape[-1] // 4))
    s_work, _, _, call, peers = make_case(op, small, dev)
    fn = peers[provider][0] if provider in peers else call
    return Smaller(fn, work / s_work, f"{case_name(small)}, scaled by work x{work / s_work:.0f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ops = args.ops
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    shapes = QUICK_CPU_SHAPES if args.quick and not cuda else SHAPES
    flop_unit, flop_scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    meta, backends = run_meta(dev, args.quick), providers(dev)
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | backends {backends}")
    warn_if_loaded(meta, dev)
    print_plan("kernels", *plan(args))
    torch.manual_seed(0)
    budget = (CUDA_BUDGET_S if cuda else BUDGET_S)[args.quick]
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
                slow = dtype == torch.bfloat16 and not bf16_matmul_native(dev)  # not started blindly
                try:
                    smaller = smaller_case(op, shape, provider, work, dev) if slow else None
                    timing = measure_within(fn, budget, cuda=cuda, quick=args.quick, smaller=smaller)
                except Exception as exc:  # a backend missing one kernel must not stop the whole run
                    log(f" failed: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    lk.set_backend("auto")
                med = timing.median_ms
                log(f" {med:9.3f} ms{timing_note(timing.fields())}")
                ref_ms = med if provider == "torch" else ref_ms
                rate = work / (med / 1e3)
                flop = kind == "flop"
                records.append({
                    **meta, "case": case_name(shape), "shape": list(shape), "op": op, "provider": provider,
                    "dtype": "float32", "compute_dtype": str(dtype).removeprefix("torch."),
                    **timing.fields(),
                    "metric": flop_unit if flop else "GB/s", "value": rate / (flop_scale if flop else 1e9),
                    "pct_of_peak": 100 * rate / peak(kind, dtype, dev, args.quick, peaks),
                    "peak_fraction": rate / peak(kind, dtype, dev, args.quick, peaks),
                    "speedup_vs_torch": ref_ms / med if ref_ms else None,
                })  # fmt: skip
    if args.ns_methods:
        records += ns_method_rows(dev, args.quick, meta, backends)
    print_table(records)
    roofs = [f"{k} {v / (1e9 if k == 'copy' else flop_scale):.1f}" for k, v in peaks.items()]
    print(f"# peaks ({flop_unit}, copy GB/s): {', '.join(roofs)} | wall {time.perf_counter() - start:.1f}s")
    write_records(records, "kernels", dev, args.out)
    return 0


# -- Newton–Schulz forms: standard, Gram, auto (project issue #12) -----------------------------------

# The aspect-ratio sweep behind the "auto" rule (limuon_kernels/ns_method.py), 768×3072 (GPT-2 small's
# MLP) alone, then GPT-2 small's whole matrix set: 12 layers of each shape, stacked per shape as the
# optimizers bucket them.
NS_METHOD_SWEEP = [(p, int(p * r)) for p in (128, 256, 512) for r in (1, 1.5, 2, 3)]
NS_METHOD_CASES = [*NS_METHOD_SWEEP, (768, 3072), *[(12, m, n) for m, n in GPT2_SMALL]]
NS_METHODS = ("standard", "gram", "auto")


def ns_method_flops(method: str, batch: int, m: int, n: int) -> float:
    """Dense flops of NS_STEPS iterations: standard K(4p²q + 2p³); Gram with the restarts of
    ``limuon_kernels.ns_method.gram_restarts``: 2p²q per X Xᵀ or Q·X, 2p³ per p×p product."""
    p, q = min(m, n), max(m, n)
    if method == "standard":
        return batch * NS_STEPS * (4 * p * p * q + 2 * p**3)
    from limuon_kernels.ns_method import gram_restarts

    restarts = set(gram_restarts(NS_STEPS))
    tall_products, square, fresh = 2, 0, True  # R = X Xᵀ and the final Q·X; Q = I to start
    for k in range(1, NS_STEPS + 1):
        square += 1 + (not fresh)  # R², and P·Q unless Q = I
        if k in restarts:
            tall_products, fresh = tall_products + 2, True
        else:
            square, fresh = square + 2 * (k < NS_STEPS), False  # P², R·P² (not after the last)
    return batch * (tall_products * 2 * p * p * q + square * 2 * p**3)


def _interleaved(calls: dict[str, Fn], rounds: int, cuda: bool, budget: float, quick: bool) -> dict:
    """Timing per call. CPU: ``rounds`` rounds of one call each, in turn, after one warm-up each, so
    that load from other processes hits every method alike; CUDA: ``measure_within`` each."""
    if cuda:
        return {k: measure_within(fn, budget, cuda=True, quick=quick) for k, fn in calls.items()}
    for fn in calls.values():
        fn()
    seconds: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            seconds[k].append(time_call(fn))
    return {k: Timing.of(v, 1, None, timeboxed=False) for k, v in seconds.items()}


def ns_method_rows(dev: torch.device, quick: bool, meta: dict, backends: list[str]) -> list[dict]:
    """newton_schulz with each ``method`` on NS_METHOD_CASES, in fp32 on the CPU (where Gram's FLOP
    saving shows) and bf16 + fp32 on CUDA; ``speedup_vs_torch`` here is over the standard method of
    the same provider. Adds one ``gpt2-small-set`` row per provider and method: the sum of the four
    stacked shapes' medians."""
    cuda = dev.type == "cuda"
    rounds, budget = (2 if quick else 5), (CUDA_BUDGET_S if cuda else BUDGET_S)[quick]
    records: list[dict] = []
    peaks: dict[str, float] = {}
    for dtype in [torch.bfloat16, torch.float32] if cuda else [torch.float32]:
        roof = peak("flop", dtype, dev, quick, peaks)
        for provider in backends:
            lk.set_backend(provider)
            totals = dict.fromkeys(NS_METHODS, 0.0)
            for shape in NS_METHOD_CASES:
                x = torch.randn(shape, device=dev)
                calls = {k: functools.partial(lk.newton_schulz, x, NS_STEPS, compute_dtype=dtype, method=k)
                         for k in NS_METHODS}  # fmt: skip
                log(f"  {case_name(shape):>12} newton_schulz {provider} {dtype}: standard / gram / auto", "")
                timings = _interleaved(calls, rounds, cuda, budget, quick)
                log(" " + " / ".join(f"{t.median_ms:.1f}" for t in timings.values()) + " ms")
                batch, m, n = dims(shape)
                base = timings["standard"].median_ms
                for k, t in timings.items():
                    resolved = lk.resolve_ns_method(k, m, n, dev, dtype)
                    flops = ns_method_flops(resolved, batch, m, n)
                    row = (case_name(shape), list(shape), f"{provider} {k}", k, resolved, dtype, t.fields(), flops)
                    records.append(_ns_method_record(meta, cuda, roof, *row, base))
                    totals[k] += t.median_ms if batch == 12 else 0.0
            for k, total in totals.items():
                fields = Timing(total, total, total, None, 0, None).fields()
                shapes = [list(c) for c in NS_METHOD_CASES[1:]]
                row = ("gpt2-small-set", shapes, f"{provider} {k}", k, k, dtype, fields, None)
                records.append(_ns_method_record(meta, cuda, roof, *row, totals["standard"]))
        lk.set_backend("auto")
    return records


def _ns_method_record(meta, cuda, roof, case, shape, provider, method, resolved, dtype, fields, flops, base_ms):
    """One record in the main loop's format; ``value`` is the resolved method's own flops per second,
    ``roof`` the measured matmul FLOP/s in ``dtype``."""
    rate = flops / (fields["median_ms"] / 1e3) if flops else float("nan")
    return {
        **meta, "case": case, "shape": shape, "op": "newton_schulz", "provider": provider,
        "ns_method": method, "ns_method_resolved": resolved, "dtype": "float32",
        "compute_dtype": str(dtype).removeprefix("torch."), **fields,
        "metric": "TFLOP/s" if cuda else "GFLOP/s", "value": rate / (1e12 if cuda else 1e9),
        "pct_of_peak": 100 * rate / roof, "peak_fraction": rate / roof,
        "speedup_vs_torch": base_ms / fields["median_ms"],
    }  # fmt: skip


def print_table(records: list[dict]) -> None:
    head = ("case", "op", "provider", "cdtype", "median ms", "p20", "p80", "throughput", "%peak", "speedup")
    rows = []
    for r in records:
        times = [f"{r[k]:.3f}" for k in ("median_ms", "p20_ms", "p80_ms")]
        times[0] += " ‡" if r["extrapolated"] else " †" if r["timeboxed"] else ""
        speedup = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        rate = [f"{r['value']:.1f} {r['metric']}", f"{r['pct_of_peak']:.0f}%", speedup]
        rows.append((r["case"], r["op"], r["provider"], r["compute_dtype"], *times, *rate))
    print(format_table(head, rows, n_left=4))


if __name__ == "__main__":
    sys.exit(main())
