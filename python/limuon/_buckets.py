"""Batches of same-shape matrices (buckets) and the orthogonalised update applied to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from limuon._checks import matrix_shape
from limuon._distributed import is_dtensor, local


@dataclass
class Bucket:
    """Same-shape, same-dtype, same-device matrices of one param group, processed as one batch.

    ``shape`` is the global 2-D shape; ``local_shape`` the part this rank holds (fewer rows for a
    parameter sharded by FSDP2, else the same).
    """

    shape: tuple[int, int]
    local_shape: tuple[int, int]
    params: list[Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def stack(self, tensors: list[Tensor]) -> Tensor:
        """Stack this rank's parts of per-parameter tensors as ``(B, m_local, n)`` (conv weights flattened)."""
        return torch.stack([local(t).reshape(self.local_shape) for t in tensors])

    @property
    def local_params(self) -> list[Tensor]:
        return [local(p) for p in self.params]


def make_buckets(params: list[Tensor], indices: list[int], key: Callable[[Tensor], Any] = lambda p: None
                 ) -> list[Bucket]:
    """Group matrices by (2-D shape, dtype, device, key(p)), keeping first-appearance order."""
    buckets: dict[Any, Bucket] = {}
    for p, idx in zip(params, indices):
        k = (matrix_shape(p), p.dtype, p.device, is_dtensor(p), key(p))  # sharded and plain: never one batch
        shape = matrix_shape(p)
        b = buckets.setdefault(k, Bucket(shape=shape, local_shape=(local(p).shape[0], shape[1])))
        b.params.append(p)
        b.indices.append(idx)
    return list(buckets.values())


def apply_update(params: list[Tensor], O: Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """``W ← W·(1 − lr·wd) − lr·scale·O`` for every matrix of the batch (decoupled weight decay);
    ``params`` are the tensors this rank holds (local shards), ``O`` their part of the update."""
    updates = [o.view_as(p) for o, p in zip(O.unbind(0), params)]
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr * scale)
