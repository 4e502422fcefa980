"""Batches of same-shape matrices (buckets) and the orthogonalised update applied to them.

A bucket's unit is a matrix, not a parameter: with ``matrix_view="flatten"`` (and for 2-D parameters)
each parameter is one matrix; with ``matrix_view="batch"`` a parameter ``(..., m, n)`` is
``prod(shape[:-2])`` matrices ``m×n`` (mixture-of-experts weights, fused per-head projections), which
are stacked, orthogonalised and compressed with every other ``m×n`` matrix of the group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from limuon._checks import is_batched, matrix_shape
from limuon._distributed import is_dtensor, local, local_rows


@dataclass
class Bucket:
    """Same-shape, same-dtype, same-device matrices of one param group, processed as one batch.

    ``shape`` is the global 2-D shape of each matrix; ``local_shape`` the part of it this rank holds
    (fewer rows for a matrix sharded by FSDP2, else the same). Per parameter ``j``: ``leads[j]`` is
    ``None`` for a parameter that is one matrix, else the leading dimensions of the matrices this rank
    holds (``shape[:-2]``, fewer experts for a ``DTensor`` sharded on dim 0); ``first_unit[j]`` is the
    global index of the first of them. ``whole``: every rank holds whole matrices (stacked ``DTensor``
    parameters sharded on the expert dim), so nothing moves between ranks.
    """

    shape: tuple[int, int]
    local_shape: tuple[int, int]
    whole: bool = False
    params: list[Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    leads: list[tuple[int, ...] | None] = field(default_factory=list)
    first_unit: list[int] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        """How many matrices of the stack each parameter holds on this rank."""
        return [unit_count(lead) for lead in self.leads]

    def stack(self, tensors: list[Tensor]) -> Tensor:
        """This rank's parts of per-parameter tensors (shaped like the parameters) as one ``(B, m_local, n)``
        stack: a flattened matrix contributes one slice, a stacked parameter one per matrix."""
        held = [local(t) for t in tensors]
        if all(t.shape == self.local_shape for t in held):  # (one op, not a view per parameter and a cat)
            return torch.stack(held)
        return torch.cat([t.reshape(c, *self.local_shape) for t, c in zip(held, self.counts)])

    def unit_keys(self, j: int) -> list[tuple[int, ...]]:
        """Per matrix of parameter ``j`` on this rank, the keys its RSVD seed takes after (group seed, parameter
        index, step): none for a parameter that is one matrix (so seeds are what they were before
        ``matrix_view`` existed), ``(e,)`` for matrix ``e`` (its global index) of a stacked parameter."""
        if self.leads[j] is None:
            return [()]
        return [(self.first_unit[j] + e,) for e in range(self.counts[j])]

    @property
    def local_params(self) -> list[Tensor]:
        return [local(p) for p in self.params]


def unit_count(lead: tuple[int, ...] | None) -> int:
    """Matrices held by a parameter with leading dimensions ``lead`` (``None``: one matrix)."""
    return 1 if lead is None else math.prod(lead)


def local_lead(p: Tensor, view: str) -> tuple[int, int, tuple[int, ...] | None]:
    """(rows held, first matrix held, leading dims held) of parameter ``p`` on this rank, under ``view``."""
    held = local(p)
    if not is_batched(p, view):
        return held.shape[0], 0, None
    lead = tuple(held.shape[:-2])
    inner = math.prod(p.shape[1:-2])  # matrices per index of dim 0 (the sharded one under FSDP2)
    first = local_rows(p)[0] * inner if is_dtensor(p) else 0
    return p.shape[-2], first, lead


def make_buckets(params: list[Tensor], indices: list[int], view: str = "flatten",
                 key: Callable[[Tensor], Any] = lambda p: None) -> list[Bucket]:
    """Group the matrices of ``params`` (one group, ``matrix_view=view``) by (2-D shape, dtype, device,
    key(p)), keeping first-appearance order. Sharded and plain tensors never share a bucket, nor do
    row-sharded and expert-sharded ``DTensor``s (their matrices move between ranks differently)."""
    buckets: dict[Any, Bucket] = {}
    for p, idx in zip(params, indices):
        shape = matrix_shape(p, view)
        whole = is_dtensor(p) and is_batched(p, view)
        rows, first, lead = local_lead(p, view)
        k = (shape, p.dtype, p.device, is_dtensor(p), whole, key(p))
        b = buckets.setdefault(k, Bucket(shape=shape, local_shape=(rows, shape[1]), whole=whole))
        b.params.append(p)
        b.indices.append(idx)
        b.leads.append(lead)
        b.first_unit.append(first)
    return list(buckets.values())
