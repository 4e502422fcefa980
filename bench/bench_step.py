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
there), at least 3 and until a time budget is spent. ``state_bytes`` is the persistent optimizer
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
transient workspace). On CPU both are null: torch's CPU allocator keeps no peak counter,
tracemalloc does not see its allocations, and the process RSS high-water mark is neither per
optimizer nor resettable.

Newton–Schulz on CPU runs in fp32 by default (~70 ms per 768×768 matrix on a 2-core EPYC), so a
GPT-2-small step takes 10 s or more there. ``--quick`` on CPU therefore keeps DistilGPT2's first 2
of its 6 layers (with the full embeddings), and says so in ``case``; on CUDA ``--quick`` is all of
DistilGPT2. Results go to ``bench/results/step-<device>-<date>.json`` (one list of records per run);
each record keeps the 1-minute load average (``loadavg_1m``), since CPU timings share the cores.

    PYTHONPATH=.:python python bench/bench_step.py --quick [--providers adamw,muon] [--out -]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import format_table, log, measure, run_meta, summarize_ms, time_call, warn_if_loaded, write_records
from torch import Tensor
from torch.optim import Optimizer

import limuon
import limuon_kernels as lk

D_MODEL, VOCAB, CONTEXT = 768, 50257, 1024
MODELS = {"gpt2": 12, "distilgpt2": 6}  # GPT-2 small and DistilGPT2: same widths, 12 and 6 layers
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


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: ``role`` is "matrix" (hidden weight), "embedding" or "vector" (1-D)."""

    name: str
    shape: tuple[int, ...]
    role: str


def gpt2_specs(layers: int) -> list[ParamSpec]:
    """GPT-2's parameters (HF names and Conv1D in×out layout) with ``layers`` blocks; LM head tied to wte."""
    d = D_MODEL
    specs = [ParamSpec("wte", (VOCAB, d), "embedding"), ParamSpec("wpe", (CONTEXT, d), "embedding")]
    for i in range(layers):
        h = f"h.{i}"
        specs += [ParamSpec(f"{h}.ln_1.weight", (d,), "vector"), ParamSpec(f"{h}.ln_1.bias", (d,), "vector")]
        specs += [ParamSpec(f"{h}.attn.c_attn.weight", (d, 3 * d), "matrix"),
                  ParamSpec(f"{h}.attn.c_attn.bias", (3 * d,), "vector"),
                  ParamSpec(f"{h}.attn.c_proj.weight", (d, d), "matrix"),
                  ParamSpec(f"{h}.attn.c_proj.bias", (d,), "vector")]  # fmt: skip
        specs += [ParamSpec(f"{h}.ln_2.weight", (d,), "vector"), ParamSpec(f"{h}.ln_2.bias", (d,), "vector")]
        specs += [ParamSpec(f"{h}.mlp.c_fc.weight", (d, 4 * d), "matrix"),
                  ParamSpec(f"{h}.mlp.c_fc.bias", (4 * d,), "vector"),
                  ParamSpec(f"{h}.mlp.c_proj.weight", (4 * d, d), "matrix"),
                  ParamSpec(f"{h}.mlp.c_proj.bias", (d,), "vector")]  # fmt: skip
    return [*specs, ParamSpec("ln_f.weight", (d,), "vector"), ParamSpec("ln_f.bias", (d,), "vector")]


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
    from limuon._common import _FUSED_ADAMW_DEVICES  # AdamW inside limuon: torch's fused kernel where it exists

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


class GradFeeder:
    """A closure that 'evaluates' gradients by assigning precomputed ones and times itself.

    Call ``k`` of a step (``begin_step`` resets ``k``) assigns gradient set ``k`` (mod the number of
    sets): set A at the current weights, set B at the previous ones in exact mode.
    """

    def __init__(self, params: list[Tensor], grad_sets: list[list[Tensor]]) -> None:
        self.params, self.grad_sets = params, grad_sets
        self.k = 0
        self.seconds = 0.0  # host time spent in calls since the last reset_clock
        self.steps = 0

    def begin_step(self) -> None:
        self.k = 0
        self.steps += 1

    def reset_clock(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def __call__(self) -> None:
        t0 = time.perf_counter()
        for p, g in zip(self.params, self.grad_sets[self.k % len(self.grad_sets)]):
            p.grad = g
        self.k += 1
        self.seconds += time.perf_counter() - t0


def state_bytes(optimizers: list[Optimizer], only: list[Tensor] | None = None) -> tuple[int, int, dict[str, int]]:
    """(state bytes, storage bytes, state bytes per key) of every tensor in the optimizers' state
    (of the parameters in ``only``, if given).

    State bytes: the bytes the state tensors cover, aliased bytes counted once (the per-parameter
    entries of a stacked bucket are disjoint views of one storage: together they count the storage
    once). Storage bytes: the full size of the storages they live in, i.e. the memory held; larger
    when a state tensor is a slice of a bigger buffer.
    """
    spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    sizes: dict[tuple[str, int], int] = {}
    keep = None if only is None else {id(p) for p in only}
    for opt in optimizers:
        for p, st in opt.state.items():
            if keep is not None and id(p) not in keep:
                continue
            for key, t in st.items():
                if not isinstance(t, Tensor) or t.numel() == 0:
                    continue
                storage = t.untyped_storage()
                sid = (str(t.device), storage.data_ptr())
                sizes[sid] = storage.nbytes()
                start = t.storage_offset() * t.element_size()
                extent = (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
                spans.setdefault(sid, []).append((start, start + extent, key))
    total = 0
    by_key: dict[str, int] = {}
    for parts in spans.values():
        end = 0  # union of the byte ranges of this storage, attributed to the key that first covers them
        for lo, hi, key in sorted(parts, key=lambda part: part[0]):  # stable: ties go to the first seen
            new = max(0, hi - max(lo, end))
            if new:
                total += new
                by_key[key] = by_key.get(key, 0) + new
            end = max(end, hi)
    return total, sum(sizes.values()), by_key


@dataclass(frozen=True)
class Reps:
    """CPU sampling: at least ``min_n`` timed steps, then more until ``budget_s`` is spent or ``max_n``."""

    min_n: int = 3
    max_n: int = 10
    budget_s: float = 5.0
    warmup: int = 2


QUICK_REPS, FULL_REPS = Reps(3, 10, 8.0), Reps(5, 25, 30.0)


def bench_provider(provider: str, specs: list[ParamSpec], dev: torch.device, *, quick: bool = True,
                   reps: Reps | None = None, rank: int = RANK, seed: int = 0) -> dict[str, Any]:
    """Time ``provider``'s step on fresh parameters shaped by ``specs``; one record (without run metadata)."""
    cuda = dev.type == "cuda"
    reps = reps or (QUICK_REPS if quick else FULL_REPS)
    gen = torch.Generator(device=dev).manual_seed(seed)
    params = [torch.randn(s.shape, device=dev, generator=gen).mul_(0.02).requires_grad_() for s in specs]
    setup = build(provider, specs, params, rank)
    n_sets = 2 if setup.uses_closure else 1
    grad_sets = [[torch.randn(s.shape, device=dev, generator=gen) for s in specs] for _ in range(n_sets)]
    feeder = GradFeeder(params, grad_sets)
    feeder()  # the gradients of the providers that take no closure

    def one_step() -> None:
        feeder.begin_step()
        setup.step(feeder if setup.uses_closure else None)

    for _ in range(reps.warmup):
        one_step()
    peak = extra = None
    if cuda:
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        one_step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        extra = peak - before
        feeder.reset_clock()
        med, p20, p80 = measure(one_step, cuda=True, quick=quick)
        closure_ms = 1e3 * feeder.seconds / max(feeder.steps, 1)
        med, p20, p80 = (t - closure_ms for t in (med, p20, p80))
        n_timed = feeder.steps
    else:
        samples, closure_s, spent = [], [], 0.0
        while len(samples) < reps.max_n and (len(samples) < reps.min_n or spent < reps.budget_s):
            feeder.reset_clock()
            t = time_call(one_step)
            spent += t
            samples.append(t - feeder.seconds)
            closure_s.append(feeder.seconds)
        med, p20, p80 = summarize_ms(samples)
        closure_ms = summarize_ms(closure_s)[0]
        n_timed = len(samples)
    total, storage_total, by_key = state_bytes(setup.optimizers)
    matrix_total = state_bytes(setup.optimizers, [p for s, p in zip(specs, params) if s.role == "matrix"])[0]
    record = {
        "provider": PROVIDERS[provider], "provider_id": provider, "grad_evals": n_sets,
        "median_ms": med, "p20_ms": p20, "p80_ms": p80, "closure_ms": closure_ms if setup.uses_closure else 0.0,
        "timed_steps": n_timed, "warmup_steps": reps.warmup,
        "state_bytes": total, "matrix_state_bytes": matrix_total, "state_storage_bytes": storage_total,
        "state_by_key": by_key,
        "peak_bytes": peak, "peak_step_extra_bytes": extra,
        "param_bytes": sum(p.numel() * p.element_size() for p in params), "n_params": sum(p.numel() for p in params),
        "n_tensors": len(params), "n_matrices": sum(s.role == "matrix" for s in specs), **setup.info,
    }  # fmt: skip
    return record


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
            "matrices MB", "peak MB")  # fmt: skip
    adamw = {r["case"]: r["state_bytes"] for r in records if r["provider_id"] == "adamw"}
    rows = []
    for r in records:
        ratio = f"{r['state_bytes'] / adamw[r['case']]:.3f}x" if adamw.get(r["case"]) else "-"
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        times = [f"{r[k]:.1f}" for k in ("median_ms", "p20_ms", "p80_ms")]
        mb = [f"{r['state_bytes'] / 2**20:.2f}", ratio, f"{r['matrix_state_bytes'] / 2**20:.2f}"]
        rows.append((r["case"], r["provider"], str(r["grad_evals"]), *times, f"{r['closure_ms']:.3f}", *mb, peak))
    print(format_table(head, rows, n_left=2))


def main(argv: list[str] | None = None) -> int:
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
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    default = ",".join(p for p in PROVIDERS if p != "muon-bf16" or not cuda)
    providers = [p.strip() for p in (args.providers or default).split(",") if p.strip()]
    models = [m.strip() for m in (args.models or ("distilgpt2" if args.quick else "distilgpt2,gpt2")).split(",")]
    if bad := [p for p in providers if p not in PROVIDERS] + [m for m in models if m not in MODELS]:
        ap.error(f"unknown provider(s)/model(s) {bad}; expected {list(PROVIDERS)} and {list(MODELS)}")
    if args.rank != RANK:
        PROVIDERS.update({k: v.replace(f"r={RANK}", f"r={args.rank}") for k, v in PROVIDERS.items()})
    meta = run_meta(dev, args.quick, bench="step")
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | load {meta['loadavg_1m']:.2f}")
    warn_if_loaded(meta, dev)
    records: list[dict] = []
    start = time.perf_counter()
    for case, model, layers in cases(models, args.layers, args.quick, cuda):
        specs = gpt2_specs(layers)
        for provider in providers:
            gc.collect()  # the previous provider's tensors, before this one allocates
            if cuda:
                torch.cuda.empty_cache()
            log(f"  [{time.perf_counter() - start:6.1f}s] {case:<28} {PROVIDERS[provider]:<24}", "")
            rec = bench_provider(provider, specs, dev, quick=args.quick, rank=args.rank)
            log(f" {rec['median_ms']:9.1f} ms")
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
