"""Ops one ``optimizer.step()`` dispatches, and how many of them read a value back to the host.

Counted with a ``TorchDispatchMode`` over one steady-state step (the third; the first two create state)
on GPT-2 small's parameter set at a tiny width (``gpt2_specs(12, d=16, vocab=64, context=32)``: the same
48 hidden matrices in 4 shapes, 2 embeddings, 98 vectors, so the count is GPT-2 small's while the step
takes milliseconds on a CPU). A ``limuon::`` op counts as one, whatever its kernel does inside; an
``aten._local_scalar_dense`` is a host read (``.item()``, ``bool(t)``, ``.tolist()``: a GPU stall). In
exact mode the closure's own ops (forward/backward, here the assignment of gradients) are not counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from _step_support import gpt2_specs
from torch.utils._python_dispatch import TorchDispatchMode

TINY = dict(d=16, vocab=64, context=32)
HOST_READ = "aten._local_scalar_dense.default"


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active and not ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_reads(self) -> int:
        return self.ops[HOST_READ]


def count_step(build: Callable[..., Any], provider: str, rank: int = 8, device: str = "cpu",
               layers: int = 12) -> OpCounter:
    """The ops of one steady-state step of ``provider`` (``build(provider, specs, params, rank)`` returns the
    bench's ``Setup``) on GPT-2 small's parameter set at ``TINY`` width."""
    specs = gpt2_specs(layers, **TINY)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s.shape, generator=gen).to(device)) for s in specs]
    grads = [[torch.randn(s.shape, generator=gen).to(device) for s in specs] for _ in range(2)]
    setup = build(provider, specs, params, rank)
    counter = OpCounter()
    calls = [0]

    def closure() -> None:
        paused, counter.paused = counter.paused, True
        for p, g in zip(params, grads[calls[0] % 2]):
            p.grad = g.clone()
        calls[0] += 1
        counter.paused = paused

    for _ in range(2):
        closure()
        setup.step(closure)
    closure()
    with counter:
        setup.step(closure)
    return counter
