"""Gradient checks before a step: sparse, complex, missing and non-finite gradients (on every rank)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from limuon._distributed import local, reduce_flags


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; the step was refused and nothing was changed."""


def check_gradients(items: list[tuple[int, Tensor, Tensor | None]], what: str = "gradient",
                    group: Any = None, required: bool = False, lost_state: list[bool] | None = None) -> None:
    """Refuse sparse, complex or non-finite gradients; ``items`` are (param index, param, grad or None).

    A ``None`` gradient is skipped, or refused when ``required``. With a process ``group`` every rank
    must see the same thing: the flags of all ranks are combined with one all-reduce, so a NaN in one
    rank's shard, or a gradient that exists on some ranks only, fails the step on every rank (instead of
    one rank raising while the others wait in a collective). One host synchronisation in all.
    ``lost_state[j]``: this rank owns matrix ``j`` but lacks its low-rank factors (checked alike).
    """
    for idx, p, g in items:
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(
                f"The {what} of parameter {idx} (shape {tuple(p.shape)}) is sparse; limuon supports dense "
                "gradients only"
            )
        if g.is_complex():
            raise RuntimeError(
                f"The {what} of parameter {idx} (shape {tuple(p.shape)}) is complex; limuon supports real "
                "tensors only"
            )
    if not items:
        return
    present = [g is not None for _, _, g in items]
    if group is None and not required and not all(present):
        items = [it for it, has in zip(items, present) if has]
        present = [True] * len(items)
        if not items:
            return
    nonfinite = [not finite for finite in _all_finite([g for _, _, g in items])]
    lost = lost_state if lost_state is not None else [False] * len(items)
    flags = torch.tensor([present, nonfinite, lost], dtype=torch.int32).reshape(-1)
    anywhere, everywhere = (t.tolist() for t in reduce_flags(group, flags))
    n = len(items)
    for j, (idx, p, _) in enumerate(items):
        if anywhere[j] and not everywhere[j]:
            raise RuntimeError(
                f"Parameter {idx} (shape {tuple(p.shape)}) has a {what} on some ranks and none on others; every "
                "rank must step the same parameters. The step was skipped and nothing was changed"
            )
        if required and not anywhere[j]:
            raise RuntimeError(
                f"The closure produced no {what} for parameter {idx} (shape {tuple(p.shape)}); it must run "
                "backward through the same parameters every time it is called"
            )
    lost_somewhere = [j for j, flag in enumerate(anywhere[2 * n:]) if flag]
    if lost_somewhere:
        idx, p, _ = items[lost_somewhere[0]]
        raise RuntimeError(
            f"The optimizer has no low-rank factors (U, S, V) for parameter {idx} (shape {tuple(p.shape)}) on the "
            "rank that owns it. Restore optimizer state with the optimizer's own state_dict() (which gathers "
            "them from their owners under FSDP2) or torch.distributed.checkpoint. Nothing was changed"
        )
    bad = [j for j, flag in enumerate(anywhere[n: 2 * n]) if flag]
    if bad:
        idx, p, _ = items[bad[0]]
        where = " on at least one rank" if group is not None else ""
        raise NonFiniteGradientError(
            f"The {what} of parameter {idx} (shape {tuple(p.shape)}) is not finite{where} (it contains NaN or "
            "Inf); the step was skipped and no parameter or optimizer state was changed"
        )


def _all_finite(grads: list[Tensor | None]) -> list[bool]:
    """Per gradient (``None``: True): no NaN or Inf in it. One host synchronisation.

    A sum is NaN or ±Inf when any element is, and is one fast read of the tensor (``isfinite().all()``
    takes ~30× longer on CPU); a non-finite sum can also come from overflow of finite values, so the
    gradients it flags are checked exactly."""
    sums = [local(g).sum(dtype=torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None)
            for g in grads if g is not None]
    if not sums:
        return [True] * len(grads)
    device = sums[0].device  # (parameters may live on several devices: the flags go to one)
    ok = iter(torch.isfinite(torch.stack([s.to(device) for s in sums])).tolist())
    finite = [True if g is None else next(ok) for g in grads]
    return [f or bool(torch.isfinite(local(g)).all()) for f, g in zip(finite, grads)]
