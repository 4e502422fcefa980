"""Parts of bench/bench_step.py that need no optimizer: the parameter shapes of GPT-2 small and
DistilGPT2, the gradient feeder (a closure that assigns precomputed gradients and times itself) and the
optimizer-state accounting (bytes of ``optimizer.state``, shared storage counted once)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor
from torch.optim import Optimizer

D_MODEL, VOCAB, CONTEXT = 768, 50257, 1024
MODELS = {"gpt2": 12, "distilgpt2": 6}  # GPT-2 small and DistilGPT2: same widths, 12 and 6 layers


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: ``role`` is "matrix" (hidden weight), "embedding" or "vector" (1-D)."""

    name: str
    shape: tuple[int, ...]
    role: str


def gpt2_specs(layers: int, d: int = D_MODEL, vocab: int = VOCAB, context: int = CONTEXT) -> list[ParamSpec]:
    """GPT-2's parameters (HF names and Conv1D in×out layout) with ``layers`` blocks; LM head tied to wte.
    ``d``, ``vocab``, ``context``: GPT-2 small's by default (smaller ones keep the structure: op counts)."""
    specs = [ParamSpec("wte", (vocab, d), "embedding"), ParamSpec("wpe", (context, d), "embedding")]
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
