"""Gradient checks before a step: sparse, complex and missing gradients (host-side, no tensor reads), and
the message that names a non-finite gradient once the device flag (``_nonfinite.StepGuard``) was read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from limuon._distributed import local, reduce_flags
from limuon._naming import positional_label


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; the step was refused and nothing was changed."""


Items = list[tuple[int, Tensor, Tensor | None]]
#: ``label(index, param)``: how a message names a parameter (``_naming``)
Label = Callable[[int, Tensor], str]


def check_gradient_types(items: Items, what: str = "gradient", label: Label = positional_label) -> None:
    """Refuse sparse or complex gradients; ``items`` are (param index, param, grad or None)."""
    for idx, p, g in items:
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(f"The {what} of {label(idx, p)} is sparse; limuon supports dense gradients only")
        if g.is_complex():
            raise RuntimeError(f"The {what} of {label(idx, p)} is complex; limuon supports real tensors only")


def check_presence(items: Items, what: str = "gradient", group: Any = None, required: bool = False,
                   lost_state: list[bool] | None = None, label: Label = positional_label) -> None:
    """Refuse a missing gradient where one is ``required``, and state this rank lacks (``lost_state[j]``:
    it owns matrix ``j`` but lacks its low-rank factors). With a process ``group`` every rank must agree:
    the flags of all ranks are combined with one all-reduce (the distributed step's one host read), so a
    gradient that exists on some ranks only fails the step on every rank instead of hanging a collective."""
    check_gradient_types(items, what, label)
    if not items:
        return
    present = [g is not None for _, _, g in items]
    lost = lost_state if lost_state is not None else [False] * len(items)
    if group is None:
        anywhere, everywhere = present + lost, present + lost
    else:
        flags = torch.tensor([present, lost], dtype=torch.int32).reshape(-1)
        anywhere, everywhere = (t.tolist() for t in reduce_flags(group, flags))
    n = len(items)
    for j, (idx, p, _) in enumerate(items):
        if anywhere[j] and not everywhere[j]:
            raise RuntimeError(
                f"{label(idx, p)[0].upper()}{label(idx, p)[1:]} has a {what} on some ranks and none on others; every "
                "rank must step the same parameters. The step was skipped and nothing was changed"
            )
        if required and not anywhere[j]:
            raise RuntimeError(
                f"The closure produced no {what} for {label(idx, p)}; it must run backward through the same "
                "parameters every time it is called"
            )
    lost_somewhere = [j for j, flag in enumerate(anywhere[n:]) if flag]
    if lost_somewhere:
        idx, p, _ = items[lost_somewhere[0]]
        raise RuntimeError(
            f"The optimizer has no low-rank factors (U, S, V) for {label(idx, p)} on the rank that owns it. "
            "Restore optimizer state with the optimizer's own state_dict() (which gathers "
            "them from their owners under FSDP2) or torch.distributed.checkpoint. Nothing was changed"
        )


def nonfinite_message(checked: list[tuple[str, Items]], group: Any = None, label: Label = positional_label) -> str:
    """Name the first non-finite gradient of ``checked`` ((what, items) pairs). Called only after the device
    flag said there is one, on every rank alike (an error path: it reads the gradients back, and with a
    process ``group`` combines every rank's findings with one all-reduce, so every rank names it)."""
    flat = [(what, idx, p, g) for what, items in checked for idx, p, g in items]
    bad = torch.tensor([g is not None and not bool(torch.isfinite(local(g)).all()) for _, _, _, g in flat],
                       dtype=torch.int32)
    if group is not None:
        bad = reduce_flags(group, bad)[0]
    where = " on at least one rank" if group is not None else ""
    for (what, idx, p, _), flag in zip(flat, bad.tolist()):
        if flag:
            return (f"The {what} of {label(idx, p)} is not finite{where} (it contains NaN or Inf); the step was "
                    "skipped and no parameter or optimizer state was changed")
    return ("A gradient is not finite (it contains NaN or Inf); the step was skipped and no parameter or optimizer "
            "state was changed")
