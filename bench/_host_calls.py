"""Python calls one ``optimizer.step()`` makes on the host, counted with ``sys.setprofile``.

Counted over one steady-state step (the third; the first two create state) on GPT-2 small's parameter set
at a tiny width (``_op_count.TINY``: the same 148 tensors, 48 hidden matrices in 4 shapes, so the count is
GPT-2 small's while the step takes milliseconds on a CPU). Every ``call`` event (a Python function or
method, generators' resumptions included) and ``c_call`` event (a builtin or C function called from
Python: ``len``, ``torch._foreach_add_``, ``torch.ops...``) counts one; calls inside the closure (the
assignment of gradients) are not counted. Machine-independent: the same code makes the same calls.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from _op_count import TINY
from _step_support import gpt2_specs


class CallCounter:
    """``sys.setprofile`` hook counting call/c_call events by ``file:function`` while active and not paused."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.paused = False

    def _hook(self, frame, event: str, arg: Any) -> None:
        if self.paused or event not in ("call", "c_call"):
            return
        if event == "call":
            code = frame.f_code
            self.calls[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
        else:
            self.calls[f"<c>:{getattr(arg, '__qualname__', getattr(arg, '__name__', '?'))}"] += 1

    def __enter__(self) -> CallCounter:
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(None)

    @property
    def total(self) -> int:
        return sum(self.calls.values()) - 1  # (the setprofile(None) that ends the count)


def count_step_calls(build: Callable[..., Any], provider: str, rank: int = 8, layers: int = 12) -> CallCounter:
    """The Python calls of one steady-state step of ``provider`` (``build(provider, specs, params, rank)``
    returns the bench's ``Setup``) on GPT-2 small's parameter set at ``TINY`` width, on the CPU."""
    specs = gpt2_specs(layers, **TINY)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s.shape, generator=gen)) for s in specs]
    grads = [[torch.randn(s.shape, generator=gen) for s in specs] for _ in range(2)]
    setup = build(provider, specs, params, rank)
    counter = CallCounter()
    calls = [0]

    def closure() -> None:
        paused, counter.paused = counter.paused, True
        for p, g in zip(params, grads[calls[0] % 2]):
            p.grad = g
        calls[0] += 1
        counter.paused = paused

    for _ in range(2):
        closure()
        setup.step(closure)
    closure()
    with counter:
        setup.step(closure)
    return counter
