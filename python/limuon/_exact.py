"""Exact mode's second gradient: ``g(W_{k−1}; ξ_k)``, the gradient at the previous iterate on this
step's batch (docs/ALGORITHM.md §2, "exact mode and the closure").

Every parameter that is moved back keeps ``last_update = W_{k−1} − W_k`` in bf16 (state key
``"last_update"``); a parameter that did not step keeps a zero one. For the second closure call the
parameters are moved back by it, the random number generators are put back to where they were before
the first call (dropout draws the same masks: the same sample ξ), and afterwards parameters, gradients
and generators are restored exactly as they were after the first call (also when the closure raises).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from limuon._distributed import local
from limuon._gradients import check_gradients

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


def previous_iterate_gradients(
    params: list[Tensor],
    movers: list[Tensor],
    needed: list[tuple[int, Tensor]],
    state: dict,
    closure: Callable[[], Any],
    rng_before: tuple,
    process_group: Any,
) -> dict[int, Tensor]:
    """``{id(p): g(W_{k−1})}`` for the ``needed`` (index, parameter) pairs.

    ``params``: every parameter of the optimizer (their gradients are saved and put back);
    ``movers``: those moved back by their ``last_update`` for the call. The transient memory is one
    copy of the movers (restored bit for bit afterwards, not by subtracting the update again).
    """
    saved_grads = [p.grad for p in params]
    saved_weights = [local(p).clone() for p in movers]
    rng_after = rng_state()
    try:
        set_rng_state(rng_before)
        for p in params:
            p.grad = None
        torch._foreach_add_([local(p) for p in movers],
                            [local(state[p]["last_update"]).view_as(local(p)) for p in movers])
        with torch.enable_grad():
            closure()
        wanted = [(i, p, p.grad) for i, p in needed]
        check_gradients(wanted, what="gradient at the previous iterate (second closure call)",
                        group=process_group, required=True)
        return {id(p): g for _, p, g in wanted}
    finally:
        set_rng_state(rng_after)
        for p, w in zip(movers, saved_weights):
            local(p).copy_(w)
        for p, g in zip(params, saved_grads):
            p.grad = g
