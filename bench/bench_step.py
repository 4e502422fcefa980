"""Time of one ``optimizer.step()`` and the optimizer's memory on real model parameter sets.

What it measures: for the parameters of GPT-2 small (12 layers, d=768, vocab 50257, context 1024:
124.4 M numbers) and DistilGPT2 (the same with 6 layers), created as plain tensors with random
gradients (no model: only the step is timed), the wall time of one step of

- ``torch.optim.AdamW`` on every parameter (``fused=True``; ``foreach=True`` where this torch has
  no fused kernel for the device: ``adamw_impl`` records which),
- ``torch.optim.Muon`` on the hidden matrices plus a separate ``torch.optim.AdamW`` on the rest,
  both stepped and timed together (torch's Muon takes 2-D parameters only),
- ``limuon.Muon``, on CPU also with ``ns_compute_dtype=torch.bfloat16`` (torch's Muon computes
  Newton–Schulz in bf16, limuon's CPU default is fp32: this row compares like with like),
- ``limuon.LiMuon`` Option #1 (dense momentum) and Option #2 (``rank=8``), each
  in ``"exact"`` and ``"approx"`` variance-reduction mode,

with the parameters routed as a user would: the token and position embeddings (``wte``, ``wpe``;
``wte`` is also the tied LM head) in a group with ``algorithm="adamw"``, the 1-D biases and
LayerNorm gains sent to AdamW automatically, every hidden matrix (attention ``c_attn`` 768×2304,
``c_proj`` 768×768, MLP ``c_fc`` 768×3072 and ``c_proj`` 3072×768, HF Conv1D layout) to the
matrix update.

Exact mode evaluates two gradients per step through ``step(closure)``. Here the closure does no
model work: it assigns precomputed random gradients (set A on the first call of a step, set B on
the second, the one at the previous iterate) and times itself. The reported times are the step's
time *minus the closure's own time*: on CPU per timed step (exact), on CUDA the closure's mean
host time per step is subtracted from ``do_bench``'s quantiles (an upper bound on its effect; the
closure launches no GPU work). ``closure_ms`` keeps what was subtracted, so a real step costs
``median_ms`` plus two forward/backward passes. The other providers get their gradients assigned
once and call ``step()`` without a closure.

How to read it: ``median_ms`` / ``p20_ms`` / ``p80_ms`` are milliseconds per step after warm-up
steps (the first step allocates state; exact mode needs one step before it evaluates the second
gradient). CUDA: ``triton.testing.do_bench``; CPU: single timed steps (a step takes 0.1–10 s
there), as many as fit (up to 10 with ``--quick``) in the provider's time budget (``budget_s``: 12 s
with ``--quick``, set-up and warm-up included; see ``Reps``), so the run's length is known as it
starts (it prints the plan). A step too slow for that is timed once instead of warming up
(``"timeboxed": true``, ``timed_steps`` 1, ``warmup_steps`` 0: that step also allocated the state).
Where a provider computes Newton–Schulz in bf16 on a CPU without bf16 matrix instructions (a step
can take minutes there, issue #10), a step on one 384×384 matrix is timed first and scaled by
Newton–Schulz FLOPs; if that estimate exceeds the budget the step is not run and the record holds
the estimate (``"extrapolated": true``, ``measured_case``, ``measured_ms``; state fields null).
``state_bytes`` is the persistent optimizer
state: the bytes covered by every tensor in ``optimizer.state`` (``numel · element_size``), bytes
shared by several entries counted once (LiMuon and limuon.Muon keep the state of same-shape
matrices in one stacked tensor whose per-parameter entries are views of it), including the small
``step`` counters. ``matrix_state_bytes`` is the part that belongs to the hidden matrices (the
rest is AdamW's, for embeddings and 1-D parameters); ``state_by_key`` splits the total by state
key; ``state_storage_bytes`` is the size of the storages those tensors live in (the memory held:
larger when an entry is a slice of a bigger buffer, e.g. LiMuon's ``S``, the first ``r`` of the
``r + oversample`` singular values).
``peak_bytes`` (CUDA only) is ``torch.cuda.max_memory_allocated`` over one untimed step, which
includes the parameters, the gradients (two sets in exact mode) and the state;
``peak_step_extra_bytes`` is that peak minus what was allocated before the step (the step's
transient workspace). On CPU both are null (torch's CPU allocator keeps no peak counter).
``ops_per_step`` / ``host_reads_per_step``: the ops one steady-state step dispatches and how many read a
value back to the host, on GPT-2 small's parameter set at a tiny width on the same device (_op_count.py).

A GPT-2-small step takes seconds on a CPU (Newton–Schulz-bound). ``--quick`` on CPU keeps DistilGPT2's first 2
of its 6 layers (with the full embeddings), and says so in ``case``; on CUDA ``--quick`` is all of
DistilGPT2. Results go to ``bench/results/step-<device>-<date>.json`` (one list of records per run);
each record keeps the 1-minute load average (``loadavg_1m``), since CPU timings share the cores.

    PYTHONPATH=.:python python bench/bench_step.py --quick [--providers adamw,muon] [--out -]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import (
    Smaller,
    Timing,
    bf16_matmul_native,
    extrapolate,
    format_table,
    log,
    measure_within,
    print_plan,
    run_meta,
    sample_calls,
    summarize_ms,
    time_call,
    timing_note,
    warn_if_loaded,
    write_records,
)
from _op_count import count_step
from _step_support import D_MODEL, MODELS, GradFeeder, ParamSpec, gpt2_specs, state_bytes
from torch import Tensor
from torch.optim import Optimizer

import limuon
import limuon_kernels as lk

QUICK_CPU_LAYERS = 2
RANK = 8
LR, ADAMW_LR, MOMENTUM, WEIGHT_DECAY = 0.02, 3e-4, 0.95, 0.1
# provider id -> record name; LiMuon ids are limuon<option>-<variance reduction>
PROVIDERS = {
    "adamw": "torch.optim.AdamW",
    "torch-muon": "torch.optim.Muon+AdamW",
    "muon": "limuon.Muon",
    "muon-bf16": "limuon.Muon bf16 NS",  # CPU only by default: on GPUs limuon.Muon's default is bf16 already
    "limuon1-exact": "LiMuon #1 exact",
    "limuon1-approx": "LiMuon #1 approx",
    "limuon2-exact": f"LiMuon #2 r={RANK} exact",
    "limuon2-approx": f"LiMuon #2 r={RANK} approx",
}


# -- optimizers -----------------------------------------------------------------------------------

_ADAMW_IMPL: dict[str, str] = {}


def adamw_impl(dev: torch.device) -> str:
    """``"fused"`` where this torch has a fused AdamW for ``dev``, else ``"foreach"``."""
    if dev.type not in _ADAMW_IMPL:
        p = torch.zeros(2, device=dev, requires_grad=True)
        p.grad = torch.ones_like(p)
        try:
            torch.optim.AdamW([p], fused=True).step()
            _ADAMW_IMPL[dev.type] = "fused"
        except (RuntimeError, ValueError):
            _ADAMW_IMPL[dev.type] = "foreach"
    return _ADAMW_IMPL[dev.type]


def torch_adamw(params: list[Tensor], impl: str) -> Optimizer:
    return torch.optim.AdamW(params, lr=ADAMW_LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY, **{impl: True})


@dataclass
class Setup:
    """The optimizer(s) of one provider and how a step is taken."""

    optimizers: list[Optimizer]
    uses_closure: bool = False  # exact mode: step(closure) with two gradient evaluations
    info: dict[str, Any] = field(default_factory=dict)

    def step(self, closure: Callable[[], Any] | None) -> None:
        for opt in self.optimizers:
            opt.step(closure) if self.uses_closure else opt.step()


def build(provider: str, specs: list[ParamSpec], params: list[Tensor], rank: int = RANK) -> Setup:
    """The optimizer(s) of ``provider`` over ``params`` (described by ``specs``), routed as a user would."""
    mats = [p for s, p in zip(specs, params) if s.role == "matrix"]
    embs = [p for s, p in zip(specs, params) if s.role == "embedding"]
    rest = [p for s, p in zip(specs, params) if s.role != "matrix"]
    impl = adamw_impl(params[0].device)
    dev = params[0].device
    if provider == "adamw":
        return Setup([torch_adamw(params, impl)], info={"adamw_impl": impl, "ns_compute_dtype": None})
    if provider == "torch-muon":
        opts: list[Optimizer] = [torch.optim.Muon(mats, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)]
        opts += [torch_adamw(rest, impl)] if rest else []
        return Setup(opts, info={"adamw_impl": impl, "ns_compute_dtype": "bfloat16"})  # torch's Muon: always bf16
    # limuon: hidden matrices and 1-D params in one group (1-D go to AdamW), embeddings in an AdamW group
    groups: list[dict[str, Any]] = [{"params": [p for s, p in zip(specs, params) if s.role != "embedding"]}]
    groups += [{"params": embs, "algorithm": "adamw"}] if embs else []
    common = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, adamw_lr=ADAMW_LR)
    ns_dtype = str(lk.get_ns_compute_dtype(dev)).removeprefix("torch.")
    from limuon._adamw import _FUSED_ADAMW_DEVICES  # AdamW inside limuon: torch's fused kernel where it exists

    limuon_adamw = "limuon (fused)" if dev.type in _FUSED_ADAMW_DEVICES else "limuon (foreach)"
    info = {"adamw_impl": limuon_adamw, "ns_compute_dtype": ns_dtype, "backend": lk.backend.resolve(dev)}
    if provider in ("muon", "muon-bf16"):
        bf16 = provider == "muon-bf16"
        opt = limuon.Muon(groups, **common, ns_compute_dtype=torch.bfloat16 if bf16 else None)
        return Setup([opt], info={**info, "ns_compute_dtype": "bfloat16"} if bf16 else info)
    option, mode = provider.removeprefix("limuon").split("-")
    if option not in ("1", "2") or mode not in ("exact", "approx"):
        raise ValueError(f"Invalid provider: {provider!r}; expected one of {list(PROVIDERS)}")
    r = rank if option == "2" else None
    opt = limuon.LiMuon(groups, rank=r, variance_reduction=mode, **common)
    return Setup([opt], uses_closure=mode == "exact", info={**info, "rank": r, "variance_reduction": mode})


# -- measurement ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reps:
    """Sampling of one provider: ``warmup`` steps, then ``min_n`` to ``max_n`` timed steps, within ``budget_s``
    wall seconds counted from the start of its set-up (CUDA: the warm-up is not counted; steps take ms)."""

    min_n: int = 3
    max_n: int = 10
    budget_s: float = 12.0
    warmup: int = 2


QUICK_REPS, FULL_REPS = Reps(3, 10, 12.0), Reps(5, 25, 60.0)
PROBE_SHAPE = (D_MODEL // 2, D_MODEL // 2)  # the smaller case of a bf16 step on a CPU without bf16 units


def ns_flops(shape: tuple[int, ...]) -> float:
    """FLOPs of one Newton–Schulz iteration on an m×n matrix: X Xᵀ (2s²l), A·A (2s³), B·X (2s²l), s ≤ l."""
    s, l = min(shape), max(shape)
    return 4 * s * s * l + 2 * s**3


class Stepper:
    """``provider``'s optimizer(s) on fresh parameters shaped by ``specs``, fed precomputed random gradients."""

    def __init__(self, provider: str, specs: list[ParamSpec], dev: torch.device, rank: int, seed: int) -> None:
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.params = [torch.randn(s.shape, device=dev, generator=gen).mul_(0.02).requires_grad_() for s in specs]
        self.setup = build(provider, specs, self.params, rank)
        n_sets = 2 if self.setup.uses_closure else 1
        grad_sets = [[torch.randn(s.shape, device=dev, generator=gen) for s in specs] for _ in range(n_sets)]
        self.feeder = GradFeeder(self.params, grad_sets)
        self.feeder()  # the gradients of the providers that take no closure
        self.closure_s: list[float] = []  # the closure's own seconds in each timed_step

    def step(self) -> None:
        self.feeder.begin_step()
        self.setup.step(self.feeder if self.setup.uses_closure else None)

    def timed_step(self) -> float:
        """Seconds of one step without the closure's own time."""
        self.feeder.reset_clock()
        t = time_call(self.step)
        self.closure_s.append(self.feeder.seconds)
        return t - self.feeder.seconds


def smaller_step(provider: str, specs: list[ParamSpec], dev: torch.device, rank: int) -> tuple[Smaller, dict] | None:
    """Where ``provider`` would run bf16 Newton–Schulz on a CPU without bf16 units (minutes per step,
    issue #10): its step on one ``PROBE_SHAPE`` matrix, scaled by Newton–Schulz FLOPs, and its info."""
    run = Stepper(provider, [ParamSpec("probe", PROBE_SHAPE, "matrix")], dev, rank, seed=0)
    if run.setup.info.get("ns_compute_dtype") != "bfloat16" or bf16_matmul_native(dev):
        return None
    scale = sum(ns_flops(s.shape) for s in specs if s.role == "matrix") / ns_flops(PROBE_SHAPE)
    if scale <= 1:  # the case is no larger than the probe: nothing to gain
        return None
    what = f"a step on one {PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} matrix, scaled by Newton–Schulz FLOPs x{scale:.0f}"
    return Smaller(run.step, scale, what), run.setup.info


def bench_provider(provider: str, specs: list[ParamSpec], dev: torch.device, *, quick: bool = True,
                   reps: Reps | None = None, rank: int = RANK, seed: int = 0) -> dict[str, Any]:
    """Time ``provider``'s step on fresh parameters shaped by ``specs``, within ``reps.budget_s``; one record
    (without run metadata). A step the budget cannot hold is timed once (``timeboxed``) or, for bf16 on a
    CPU without bf16 units, extrapolated from a smaller case without being run (no state then: null)."""
    start = time.perf_counter()
    cuda = dev.type == "cuda"
    reps = reps or (QUICK_REPS if quick else FULL_REPS)
    probe = None if cuda else smaller_step(provider, specs, dev, rank)
    if probe is not None and (est := extrapolate(probe[0], False, reps.budget_s, start)) is not None:
        return provider_record(provider, specs, est, probe[1])
    run = Stepper(provider, specs, dev, rank, seed)
    peak = extra = None
    if cuda:
        for _ in range(reps.warmup):
            run.step()
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        run.step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        extra = peak - before
        run.feeder.reset_clock()
        timing = measure_within(run.step, reps.budget_s - (time.perf_counter() - start), cuda=True, quick=quick)
        closure_ms = 1e3 * run.feeder.seconds / max(run.feeder.steps, 1)  # mean host time, an upper bound
        timing = dataclasses.replace(timing, median_ms=timing.median_ms - closure_ms, p20_ms=timing.p20_ms - closure_ms,
                                     p80_ms=timing.p80_ms - closure_ms, calls=timing.calls or run.feeder.steps)
    else:
        timing = sample_calls(run.timed_step, reps.budget_s, warmup=reps.warmup, min_calls=reps.min_n,
                              max_calls=reps.max_n, start=start)
        closure_ms = summarize_ms(run.closure_s[-timing.calls:])[0]
    return provider_record(provider, specs, timing, run.setup.info, run, closure_ms, peak, extra)


def provider_record(provider: str, specs: list[ParamSpec], timing: Timing, info: dict, run: Stepper | None = None,
                    closure_ms: float = 0.0, peak: int | None = None, extra: int | None = None) -> dict[str, Any]:
    """One record; without ``run`` (the step was not run) the state fields are null."""
    state: tuple[Any, ...] = (None, None, None, None)
    if run is not None:
        total, storage_total, by_key = state_bytes(run.setup.optimizers)
        mats = [p for s, p in zip(specs, run.params) if s.role == "matrix"]
        state = (total, state_bytes(run.setup.optimizers, mats)[0], storage_total, by_key)
    closure = info.get("variance_reduction") == "exact"
    numel = [math.prod(s.shape) for s in specs]
    return {
        "provider": PROVIDERS[provider], "provider_id": provider, "grad_evals": 2 if closure else 1,
        **timing.fields(), "closure_ms": closure_ms if closure else 0.0,
        "timed_steps": timing.calls, "warmup_steps": timing.warmup_calls,
        **dict(zip(("state_bytes", "matrix_state_bytes", "state_storage_bytes", "state_by_key"), state)),
        "peak_bytes": peak, "peak_step_extra_bytes": extra,
        "param_bytes": 4 * sum(numel), "n_params": sum(numel),  # fp32 parameters
        "n_tensors": len(specs), "n_matrices": sum(s.role == "matrix" for s in specs), **info,
    }  # fmt: skip


# -- main -----------------------------------------------------------------------------------------


def cases(models: list[str], layers: int | None, quick: bool, cuda: bool) -> list[tuple[str, str, int]]:
    """(case name, model, layers kept) per model."""
    out = []
    for model in models:
        full = MODELS[model]
        keep = min(layers or (QUICK_CPU_LAYERS if quick and not cuda else full), full)
        out.append((model if keep == full else f"{model} ({keep} of {full} layers)", model, keep))
    return out


def print_table(records: list[dict]) -> None:
    head = ("case", "optimizer", "grads", "median ms", "p20", "p80", "closure ms", "state MB", "vs AdamW",
            "matrices MB", "peak MB", "ops", "host reads", "timing")  # fmt: skip
    adamw = {r["case"]: r["state_bytes"] for r in records if r["provider_id"] == "adamw"}
    rows = []
    for r in records:
        mb = [f"{r[k] / 2**20:.2f}" if r[k] is not None else "-" for k in ("state_bytes", "matrix_state_bytes")]
        ratio = f"{r['state_bytes'] / adamw[r['case']]:.3f}x" if adamw.get(r["case"]) and r["state_bytes"] else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        times = [f"{r[k]:.1f}" for k in ("median_ms", "p20_ms", "p80_ms")]
        note = "timeboxed, " * r["timeboxed"] + ("extrapolated" if r["extrapolated"] else f"{r['timed_steps']} steps")
        rows.append((r["case"], r["provider"], str(r["grad_evals"]), *times, f"{r['closure_ms']:.3f}", mb[0], ratio,
                     mb[1], peak, str(r["ops_per_step"]), str(r["host_reads_per_step"]), note))  # fmt: skip
    print(format_table(head, rows, n_left=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"DistilGPT2 only, fewer repetitions; on CPU only its first {QUICK_CPU_LAYERS} layers")
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N blocks of each model")
    ap.add_argument("--providers", default=None, help=f"subset of {','.join(PROVIDERS)} (default: all; "
                    "muon-bf16 on CPU only)")
    ap.add_argument("--rank", type=int, default=RANK, help="rank of LiMuon Option #2")
    ap.add_argument("--out", default=None, help="JSON path ('-': none; default bench/results/step-...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    default = ",".join(p for p in PROVIDERS if p != "muon-bf16" or not cuda)
    args.providers = [p.strip() for p in (args.providers or default).split(",") if p.strip()]
    args.models = [m.strip() for m in (args.models or ("distilgpt2" if args.quick else "distilgpt2,gpt2")).split(",")]
    if bad := [p for p in args.providers if p not in PROVIDERS] + [m for m in args.models if m not in MODELS]:
        ap.error(f"unknown provider(s)/model(s) {bad}; expected {list(PROVIDERS)} and {list(MODELS)}")
    return args


def plan(args: argparse.Namespace) -> tuple[float, str]:
    """(upper bound in seconds, how it was found): every provider's budget, set-up included."""
    n = len(args.providers) * len(args.models)
    budget = (QUICK_REPS if args.quick else FULL_REPS).budget_s
    return n * budget, f"{n} optimizers, each within {budget:g} s"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.rank != RANK:
        PROVIDERS.update({k: v.replace(f"r={RANK}", f"r={args.rank}") for k, v in PROVIDERS.items()})
    meta = run_meta(dev, args.quick, bench="step")
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | load {meta['loadavg_1m']:.2f}")
    warn_if_loaded(meta, dev)
    print_plan("step", *plan(args))
    records: list[dict] = []
    start = time.perf_counter()
    for case, model, layers in cases(args.models, args.layers, args.quick, cuda):
        specs = gpt2_specs(layers)
        for provider in args.providers:
            gc.collect()  # the previous provider's tensors, before this one allocates
            if cuda:
                torch.cuda.empty_cache()
            log(f"  [{time.perf_counter() - start:6.1f}s] {case:<28} {PROVIDERS[provider]:<24}", "")
            rec = bench_provider(provider, specs, dev, quick=args.quick, rank=args.rank)
            ops = count_step(build, provider, args.rank, str(dev))  # (GPT-2 small's parameter set, tiny width)
            rec.update(ops_per_step=ops.total, host_reads_per_step=ops.host_reads)
            log(f" {rec['median_ms']:9.1f} ms{timing_note(rec)}, {ops.total} ops, {ops.host_reads} host reads")
            records.append({**meta, "case": case, "model": model, "layers": layers, "model_layers": MODELS[model],
                            **rec, "loadavg_1m_end": os.getloadavg()[0]})  # fmt: skip
    print_table(records)
    wall = time.perf_counter() - start
    for r in records:
        r["run_wall_s"] = wall
    print(f"# wall {wall:.1f}s; state MB = bytes / 2^20; 'grads' = gradient evaluations per step")
    write_records(records, "step", dev, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
