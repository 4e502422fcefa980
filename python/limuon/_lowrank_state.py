"""LiMuon's own state-dict handling: state kept in its own dtype, and Option #2's low-rank factors,
which under FSDP2 live on each matrix's owner rank only (gathered for ``state_dict()``, dropped on the
other ranks after ``load_state_dict``). The factors of a ``matrix_view="batch"`` parameter sharded on its
expert dim are ``DTensor``s sharded like it instead: every rank keeps those of its own matrices, and
torch's state dict and torch.distributed.checkpoint handle them as they handle the parameter."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from limuon._checks import is_batched, matrix_shape
from limuon._distributed import adapt_rows, is_dtensor, local
from limuon._lowrank import FACTORS


class LowRankStateMixin:
    """State-dict methods of ``LiMuon`` (mixed into a ``HybridOptimizer``)."""

    # State whose dtype is not the parameter's: torch's load_state_dict would cast it to the
    # parameter dtype (the bf16 restore buffer to fp32, fp32 RSVD factors to a bf16 param's dtype).
    _OWN_DTYPE_KEYS = ("last_update", "U", "S", "V")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = self.adapt_layouts(self._complete_groups(state_dict))
        kept: dict[Any, dict[str, Tensor]] = {}
        state = {}
        for pid, st in state_dict["state"].items():
            st = dict(st) if isinstance(st, dict) else st
            kept[pid] = {k: st.pop(k) for k in self._OWN_DTYPE_KEYS if k in st} if isinstance(st, dict) else {}
            state[pid] = st
        kept = self._adapt_factors(state_dict, kept)  # (refused before anything changes)
        state_dict["state"] = state
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for k, v in kept.get(pid, {}).items():
                self.state[p][k] = v.to(device=p.device)
        self._drop_foreign_factors()
        self._remember_modes()  # the loaded state belongs to the loaded groups' modes

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict. Under FSDP2 the low-rank factors of each matrix live on its owner
        rank only; here they are gathered from their owners (one broadcast per such matrix, a collective:
        every rank must call this), so every rank's state dict, a full state dict gathered on rank 0 and a
        torch.distributed.checkpoint hold all of them, and can be loaded at any world size."""
        state_dict = super().state_dict()
        if self.distribution().sharded_group is None:
            return state_dict
        gathered = self._gather_factors()
        if gathered:
            state_dict["state"] = dict(state_dict["state"])
            for idx, factors in gathered.items():
                state_dict["state"][idx] = {**state_dict["state"].get(idx, {}), **factors}
        return state_dict

    def _adapt_factors(self, state_dict: dict[str, Any], kept: dict[Any, dict[str, Tensor]]
                       ) -> dict[Any, dict[str, Tensor]]:
        """``kept`` with the low-rank factors of stacked parameters laid out as the parameters (``adapt_rows``:
        a whole tensor saved by one process is cut to this rank's matrices under FSDP2)."""
        saved = [(pid, g.get("matrix_view", "flatten")) for g in state_dict["param_groups"] for pid in g["params"]]
        params = self._all_params()
        if len(saved) != len(params):
            return kept  # torch's load_state_dict explains what does not match
        out = dict(kept)
        for index, ((pid, view), p) in enumerate(zip(saved, params)):
            if is_batched(p, view) and kept.get(pid):
                label = self.param_label(index, p)
                out[pid] = {k: adapt_rows(label, k, p, v) if k in FACTORS else v for k, v in kept[pid].items()}
        return out

    def _sharded_matrices(self) -> list[tuple[int, Tensor]]:
        """The row-sharded ``DTensor`` matrices (index, parameter): those whose factors live on one owner."""
        out, idx = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if self._is_matrix(group, p) and is_dtensor(p) and not is_batched(p, group["matrix_view"]):
                    out.append((idx, p))
                idx += 1
        return out

    def _gather_factors(self) -> dict[int, dict[str, Tensor]]:
        """``{param index: {"U", "S", "V"}}`` of the sharded matrices whose factors another rank owns."""
        distribution = self.distribution()
        group = distribution.sharded_group
        world, rank = distribution.shard_world_rank()
        matrices = self._sharded_matrices()
        mine = {i: (self.state[p]["U"].shape[-1], self.state[p]["U"].dtype) for i, p in matrices
                if distribution.owns(p) and "U" in self.state.get(p, {})}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
        out = {}
        for i, p in matrices:
            owner = distribution.owner(p, world)
            if i not in everyone[owner]:
                continue
            (r, dtype), (m, n) = everyone[owner][i], matrix_shape(p)
            if owner == rank:
                st = self.state[p]
                flat = torch.cat([st[k].reshape(-1).to(dtype) for k in ("U", "S", "V")])
            else:
                flat = torch.empty((m + 1 + n) * r, dtype=dtype, device=local(p).device)
            dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
            if owner != rank:
                U, S, V = flat.split([m * r, r, n * r])
                out[i] = {"U": U.view(m, r), "S": S, "V": V.view(n, r)}
        return out

    def _drop_foreign_factors(self) -> None:
        """After loading under FSDP2: keep the factors of the matrices this rank owns, drop the others."""
        distribution = self.distribution()
        if distribution.sharded_group is None:
            return
        for _, p in self._sharded_matrices():
            if not distribution.owns(p):
                for k in ("U", "S", "V"):
                    self.state.get(p, {}).pop(k, None)

    def _lost_state(self, items: list[tuple[int, Tensor, Tensor | None]]) -> list[bool] | None:
        # An owned low-rank matrix (under FSDP2, where only owners hold factors) without its factors.
        distribution = self.distribution()
        if distribution.sharded_group is None:
            return None
        groups = [g for g in self.param_groups for _ in g["params"]]
        lost = []
        for (_, p, g), group in zip(items, groups):
            st = self.state.get(p, {})
            # (the factors of a stacked parameter sharded on the expert dim are on every rank)
            lost.append(g is not None and self._is_matrix(group, p) and is_dtensor(p)
                        and (is_batched(p, group["matrix_view"]) or distribution.owns(p))
                        and self._state_kind(group, p) == "lowrank" and "U" not in st)
        return lost
