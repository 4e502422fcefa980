"""Stacked optimizer state: the state of the matrices of one bucket lives in one ``(B, ...)`` tensor.

Each parameter's state entry is a view of its slice, so torch's state_dict format is unchanged while a
step updates the whole bucket in one kernel launch. A parameter may own several consecutive slices (the
matrices of a ``matrix_view="batch"`` parameter; ``leads``: their leading dimensions): its entries are
then views with those leading dimensions (parameter-shaped state shaped as the parameter, the low-rank
factors as ``(..., m, r)``, ``(..., r)``, ``(..., n, r)``; under FSDP2, ``DTensor``s sharded on dim 0 as
the parameter is). When the set of matrices stepped together changes (a matrix without a gradient this
step, MoE experts, a state dict just loaded) the entries are stacked anew. Invariant: a stacked tensor
is only ever referenced by the state of its own members. Whenever some members move to a new stack,
each of the others is copied into storage of its own, so the old storage is freed and every
parameter's state exists exactly once, whatever the gradient pattern (what ``torch.save`` writes is
then exactly the memory table of docs/ALGORITHM.md §5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from limuon._buckets import unit_count
from limuon._distributed import is_dtensor, local, wrap_like, wrap_rows

Leads = list[tuple[int, ...] | None] | None

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

    def _stack_registry(self) -> dict[tuple, tuple[Tensor, tuple]]:
        # Not part of torch's pickled optimizer state (__getstate__): rebuilt lazily after a copy.
        return self.__dict__.setdefault("_stacks", {})

    def stacked_state(self, params: list[Tensor], name: str, slice_shape: tuple[int, ...] | None = None,
                      leads: Leads = None) -> Tensor:
        """The (B, ...) tensor whose slices are the state ``name`` of ``params`` (stacking once if needed):
        ``unit_count(leads[i])`` consecutive slices per parameter (one each when ``leads`` is None), shaped
        ``slice_shape`` (default: the entry's own trailing shape)."""
        leads = [None] * len(params) if leads is None else leads
        counts = [unit_count(lead) for lead in leads]
        held = self._stack_registry().get((name, tuple(id(p) for p in params)))
        if held is not None and self._is_stack_of(held, params, name, counts):
            return held[0]
        parts = []
        for p, lead, count in zip(params, leads, counts):
            entry = local(self.state[p][name])
            trailing = slice_shape if slice_shape is not None else entry.shape[0 if lead is None else len(lead):]
            parts.append(entry.reshape(count, *trailing))
        return self.adopt_stacked_state(params, name, torch.cat(parts), leads)

    def _is_stack_of(self, held: tuple[Tensor, tuple], params: list[Tensor], name: str, counts: list[int]) -> bool:
        """Every entry is still the view the stack was made with (identity: no tensor op, no address read,
        so torch.compile traces it too)."""
        stacked, views = held
        return sum(counts) == stacked.shape[0] and all(self.state[p][name] is v for p, v in zip(params, views))

    def adopt_stacked_state(self, params: list[Tensor], name: str, stacked: Tensor, leads: Leads = None) -> Tensor:
        """Make the slices of ``stacked`` the state ``name`` of ``params`` (``unit_count(leads[i])`` consecutive
        slices each, as views: see the module docstring)."""
        self._release_stacks(params, name)
        self._set_views(params, name, stacked, [None] * len(params) if leads is None else leads)
        return stacked

    def drop_state(self, params: list[Tensor], name: str) -> None:
        """Remove state ``name`` of ``params`` (the storage goes once nothing else uses it)."""
        self._release_stacks(params, name)
        for p in params:
            if p in self.state:
                self.state[p].pop(name, None)

    def _set_views(self, params: list[Tensor], name: str, stacked: Tensor, leads: list) -> None:
        offset, views = 0, []
        for p, lead in zip(params, leads):
            count = unit_count(lead)
            self.state[p][name] = _state_view(p, name, stacked[offset: offset + count], lead)
            views.append(self.state[p][name])
            offset += count
        self._stack_registry()[(name, tuple(id(p) for p in params))] = (stacked, tuple(views))

    def _release_stacks(self, params: list[Tensor], name: str) -> None:
        """Before the state ``name`` of ``params`` is replaced: every other parameter whose state ``name``
        shares memory with theirs (the rest of a stack they were part of) gets a copy of its own."""
        ids = {id(p) for p in params}
        stacks = self._stack_registry()
        own = stacks.get((name, tuple(id(p) for p in params)))
        others = self._forget(ids, name)
        if torch.compiler.is_compiling():
            # (storages cannot be traced: the registry's stacks are what is shared then; a checkpoint's
            # views of one storage are copied apart on the first eager step or load)
            for q, st in self.state.items():
                if id(q) in others and isinstance(st.get(name), Tensor):
                    st[name] = wrap_like(st[name], local(st[name]).clone())
            return
        held = set()
        for p in params:
            entry = self._entry(p, name)
            key = _storage_key(entry) if isinstance(entry, Tensor) else None
            if key:
                held.add(key)
        if not held or (own is not None and held == {_storage_key(own[0])}):
            return  # nothing stored, or one stack of exactly these parameters: nobody else to move
        for q, st in self.state.items():
            v = st.get(name) if isinstance(st, dict) and id(q) not in ids else None
            if isinstance(v, Tensor) and _storage_key(v) in held:
                self._forget({id(q)}, name)
                st[name] = wrap_like(v, local(v).clone())  # (a DTensor stays laid out as it was)

    def _forget(self, ids: set[int], name: str) -> set[int]:
        """Drop the registry entries of the stacks of state ``name`` that hold any of ``ids``; returns the ids
        of the other parameters those stacks held."""
        stacks, others = self._stack_registry(), set()
        for key in [k for k in stacks if k[0] == name and ids.intersection(k[1])]:
            others.update(set(key[1]) - ids)
            del stacks[key]
        return others

    def _entry(self, p: Tensor, name: str) -> Any:
        st = self.state.get(p)
        return st.get(name) if isinstance(st, dict) else None


def _state_view(p: Tensor, name: str, part: Tensor, lead: tuple[int, ...] | None) -> Tensor:
    """The state entry ``name`` of parameter ``p`` from its ``(count, ...)`` slices of a stack."""
    if name in PARAM_SHAPED_STATE:
        return wrap_like(p, part.view(local(p).shape))
    if lead is None:
        return part[0]
    return wrap_rows(p, part.view(*lead, *part.shape[1:]))
