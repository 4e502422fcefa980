"""Exact mode's second gradient: ``g(W_{k−1}; ξ_k)``, the gradient at the previous iterate on this
step's batch (docs/ALGORITHM.md §2, "exact mode and the closure").

Every parameter that is moved back keeps ``last_update = W_{k−1} − W_k`` in bf16 (state key
``"last_update"``); a parameter that did not step keeps a zero one. A step calls the closure first at
``W_{k−1}`` (the parameters moved back by it) and then at ``W_k``, with the random number generators
replayed so that both calls draw the same sample ξ; the second call's loss is the one returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from limuon._distributed import local
from limuon._gradients import Label, check_presence
from limuon._naming import positional_label

RESTORE_SCOPES = ("all", "matrices")

MISSING_CLOSURE = (
    "LiMuon with variance_reduction='exact' needs a closure: call opt.step(closure) where closure() "
    "zeroes the gradients, runs forward and backward on the same batch every time it is called and returns "
    "the loss (it is called twice per step from the second step on); or choose variance_reduction='approx' "
    "(one gradient per step, no closure). Nothing was changed"
)


def rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The CPU generator's state and, when CUDA is in use, every CUDA device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def closure_at_previous_iterate(
    params: list[Tensor], movers: list[Tensor], state: dict, closure: Callable[[], Any]
) -> dict[int, Tensor | None]:
    """Call ``closure`` with ``movers`` moved back by their ``last_update`` (to ``W_{k−1}``) and return
    ``{id(p): gradient}`` of every parameter in ``params`` from that call.

    This is the FIRST of exact mode's two calls, so that the last one runs at the current weights: the
    loss ``step`` returns, what training loops such as Lightning keep from the last closure call, and
    BatchNorm statistics all belong to ``W_k``. Afterwards the movers are restored bit for bit (from a
    transient copy, not by subtracting the update again), every ``.grad`` is ``None`` for the next call
    (so a closure that zeroes gradients in place cannot overwrite these), and the random number
    generators are back where they were, so the next call draws the same dropout masks: the same ξ.
    If the closure raises, parameters, gradients and generators are put back as they were.
    """
    saved_grads = [p.grad for p in params]
    held = [local(p) for p in movers]
    # one launch; x·1 is x bit for bit (except a subnormal under torch.set_flush_denormal(True), flushed to 0)
    saved_weights = torch._foreach_mul(held, 1.0) if held else []
    rng = rng_state()
    ok = False
    try:
        for p in params:
            p.grad = None
        if movers:
            torch._foreach_add_(held, [_as_param(local(state[p]["last_update"]), h) for p, h in zip(movers, held)])
        with torch.enable_grad():
            closure()
        grads = {id(p): p.grad for p in params}
        ok = True
    finally:
        set_rng_state(rng)
        if held:
            torch._foreach_copy_(held, saved_weights)
        for p, g in zip(params, saved_grads):
            p.grad = None if ok else g
    return grads


def _as_param(t: Tensor, held: Tensor) -> Tensor:
    return t if t.shape == held.shape else t.view(held.shape)


PREVIOUS = "gradient at the previous iterate (closure call at W_{k-1})"


def previous_gradients(needed: list[tuple[int, Tensor]], grads: dict[int, Tensor | None],
                       process_group: Any, label: Label = positional_label) -> list[tuple[int, Tensor, Tensor | None]]:
    """The gradients at ``W_{k−1}`` of the ``needed`` (index, matrix) pairs as (index, param, grad) items, each
    required (on every rank), else the step is refused with nothing changed. (Their finiteness is part of
    the step's device flag.)"""
    wanted = [(i, p, grads.get(id(p))) for i, p in needed]
    check_presence(wanted, what=PREVIOUS, group=process_group, required=True, label=label)
    return wanted
