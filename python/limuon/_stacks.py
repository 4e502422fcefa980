"""Stacked optimizer state: the state of the matrices of one bucket lives in one ``(B, ...)`` tensor.

Each parameter's state entry is a view of its slice, so torch's state_dict format is unchanged while a
step updates the whole bucket in one kernel launch. When the set of matrices stepped together changes
(a matrix without a gradient this step, MoE experts, a state dict just loaded) the entries are stacked
anew. Invariant: a stacked tensor is only ever referenced by the state of its own members. Whenever some
members move to a new stack, the others are copied into a stack of their own, so the old storage is
freed and every parameter's state exists exactly once, whatever the gradient pattern (what
``torch.save`` writes is then exactly the memory table of docs/ALGORITHM.md §5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from limuon._distributed import is_dtensor, local, wrap_like

#: state entries shaped like their parameter (stored as a DTensor sharded like it under FSDP2)
PARAM_SHAPED_STATE = ("momentum_buffer", "last_update", "exp_avg", "exp_avg_sq")


def _storage_key(t: Tensor) -> int | None:
    """An id of the memory behind ``t`` (None for an empty storage, which holds nothing to free)."""
    storage = local(t).untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


def is_inner_slice(value: Any) -> bool:
    """A ``DTensor`` whose local tensor is part of a larger storage (a bucket's stacked state): torch.save
    cannot pickle it when it starts inside the storage, and would write the whole storage otherwise."""
    if not is_dtensor(value):
        return False
    held = local(value)
    return held.storage_offset() != 0 or held.untyped_storage().nbytes() != held.numel() * held.element_size()


class StackedStateMixin:
    """Methods of an ``Optimizer`` (``self.state``) that keep per-bucket state stacked."""

    state: Any

    def _stack_registry(self) -> dict[tuple, Tensor]:
        # Not part of torch's pickled optimizer state (__getstate__): rebuilt lazily after a copy.
        return self.__dict__.setdefault("_stacks", {})

    def stacked_state(self, params: list[Tensor], name: str, slice_shape: tuple[int, ...] | None = None) -> Tensor:
        """The (B, ...) tensor whose slice ``i`` is ``state[params[i]][name]`` (stacking once if needed)."""
        stacks = self._stack_registry()
        stacked = stacks.get((name, tuple(id(p) for p in params)))
        states = [self.state[p] for p in params]
        if stacked is not None and all(local(st[name]).data_ptr() == stacked[i].data_ptr()
                                       for i, st in enumerate(states)):
            return stacked
        parts = [local(st[name]) if slice_shape is None else local(st[name]).reshape(slice_shape) for st in states]
        return self.adopt_stacked_state(params, name, torch.stack(parts))

    def adopt_stacked_state(self, params: list[Tensor], name: str, stacked: Tensor) -> Tensor:
        """Make slice ``i`` of ``stacked`` the state ``name`` of ``params[i]`` (a view, shaped like the
        parameter for parameter-shaped state: for a ``DTensor`` parameter, a ``DTensor`` sharded alike)."""
        self._release_stacks(params, name)
        self._set_views(params, name, stacked)
        return stacked

    def drop_state(self, params: list[Tensor], name: str) -> None:
        """Remove state ``name`` of ``params`` (the storage goes once nothing else uses it)."""
        self._release_stacks(params, name)
        for p in params:
            if p in self.state:
                self.state[p].pop(name, None)

    def _set_views(self, params: list[Tensor], name: str, stacked: Tensor) -> None:
        for p, part in zip(params, stacked.unbind(0)):
            self.state[p][name] = wrap_like(p, part.view(local(p).shape)) if name in PARAM_SHAPED_STATE else part
        self._stack_registry()[(name, tuple(id(p) for p in params))] = stacked

    def _release_stacks(self, params: list[Tensor], name: str) -> None:
        """Before the state ``name`` of ``params`` is replaced: every other parameter whose state ``name``
        shares memory with theirs (the rest of a stack they were part of) gets a stack of its own."""
        ids = {id(p) for p in params}
        stacks = self._stack_registry()
        own = stacks.get((name, tuple(id(p) for p in params)))
        self._forget(ids, name)
        held = {k for p in params if isinstance(v := self._entry(p, name), Tensor) and (k := _storage_key(v))}
        if not held or (own is not None and held == {_storage_key(own)}):
            return  # nothing stored, or one stack of exactly these parameters: nobody else to move
        rest: dict[tuple, list[Tensor]] = {}
        for q, st in self.state.items():
            v = st.get(name) if isinstance(st, dict) and id(q) not in ids else None
            if isinstance(v, Tensor) and _storage_key(v) in held:
                rest.setdefault((tuple(local(v).shape), v.dtype, local(v).device), []).append(q)
        for members in rest.values():
            self._forget({id(q) for q in members}, name)
            self._set_views(members, name, torch.stack([local(self.state[q][name]) for q in members]))

    def _forget(self, ids: set[int], name: str) -> None:
        """Drop the registry entries of the stacks of state ``name`` that hold any of ``ids``."""
        stacks = self._stack_registry()
        for key in [k for k in stacks if k[0] == name and ids.intersection(k[1])]:
            del stacks[key]

    def _entry(self, p: Tensor, name: str) -> Any:
        st = self.state.get(p)
        return st.get(name) if isinstance(st, dict) else None
