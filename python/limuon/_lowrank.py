"""LiMuon's Option #2 on the owners of a bucket's matrices: the momentum from the stored low-rank factors
``U diag(S) Vᵀ``, and its compression back to rank ``r`` by a seeded randomized SVD.

Shapes: a bucket's stacks are ``(B, m, n)`` over its matrices (``Bucket``: a parameter holds one, or with
``matrix_view="batch"`` several consecutive ones); the factors of one parameter are ``U (m, r)``, ``S (r)``,
``V (n, r)``, or ``(..., m, r)``, ``(..., r)``, ``(..., n, r)`` for a stacked parameter ``(..., m, n)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import limuon_kernels as lk
from limuon._buckets import Bucket, unit_count
from limuon._checks import is_batched, matrix_shape

FACTORS = ("U", "S", "V")


class LowRankMomentumMixin:
    """Methods of ``LiMuon`` (a ``HybridOptimizer`` with stacked state) for Option #2."""

    state: Any
    param_groups: list[dict]

    def _low_rank(self, group: dict, p: Tensor) -> bool:
        return group["rank"] is not None and group["rank"] < min(matrix_shape(p, group["matrix_view"]))

    def _check_factor_views(self) -> None:
        """Refuse, before anything changes, low-rank factors stored for the other ``matrix_view`` (the
        group's view was changed, or a checkpoint saved with the other one was loaded)."""
        index = 0
        for group in self.param_groups:
            view = group["matrix_view"]
            for p in group["params"]:
                st = self.state.get(p)
                U = st.get("U") if isinstance(st, dict) else None
                if isinstance(U, Tensor):
                    m = matrix_shape(p, view)[0]
                    want = (*p.shape[:-2], m) if is_batched(p, view) else (m,)
                    if tuple(U.shape[:-1]) != want:
                        raise ValueError(
                            f"Invalid matrix_view: {view!r} for {self.param_label(index, p)}: its "
                            f"low-rank factor U has shape {tuple(U.shape)}, stored under the other matrix_view; "
                            "keep the matrix_view the state was created with. Nothing was changed"
                        )
                index += 1

    def _lowrank_momentum(self, bucket: Bucket, owned: list[int], G: Tensor, G_old: Tensor | None,
                          coefficients: list[float], x_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Option #2 on the owner: ``(buf, X, sqnorm)`` of ``lk.lowrank_momentum_ns_input`` from the stored factors
        of the parameters ``owned`` (bucket positions) and their gradients ``G`` (whole matrices, ``(B_own, m, n)``).

        Parameters whose stored rank differs (the group's rank changed while some skipped steps) are
        computed in separate batches, since their factors cannot be stacked together."""
        params = [bucket.params[j] for j in owned]
        leads = [bucket.leads[j] for j in owned]
        for p, j in zip(params, owned):
            if "U" not in self.state[p]:  # (checked on every rank before the step: see _lost_state)
                raise RuntimeError(f"LiMuon has no low-rank factors for {self.param_label(bucket.indices[j], p)}")
        if G.shape[0] == 0:  # (no matrix here: a rank holding none of a stacked parameter's experts)
            return G, G.to(x_dtype), G.new_zeros(0, dtype=torch.float32)
        by_rank: dict[int, list[int]] = {}
        for k, p in enumerate(params):
            by_rank.setdefault(self.state[p]["U"].shape[-1], []).append(k)
        if len(by_rank) == 1:
            U, S, V = (self.stacked_state(params, key, leads=leads) for key in FACTORS)
            return lk.lowrank_momentum_ns_input(U, S, V, G, G_old, coefficients, x_dtype)
        counts = [unit_count(lead) for lead in leads]
        starts = [sum(counts[:k]) for k in range(len(counts))]
        buf, X = torch.empty_like(G), torch.empty_like(G, dtype=x_dtype)
        sqnorm = G.new_empty(G.shape[0], dtype=torch.float64 if G.dtype == torch.float64 else torch.float32)
        for ks in by_rank.values():
            rows = [starts[k] + e for k in ks for e in range(counts[k])]
            sub = [params[k] for k in ks]
            U, S, V = (self.stacked_state(sub, key, leads=[leads[k] for k in ks]) for key in FACTORS)
            buf[rows], X[rows], sqnorm[rows] = lk.lowrank_momentum_ns_input(
                U, S, V, G[rows], None if G_old is None else G_old[rows], coefficients, x_dtype)
        return buf, X, sqnorm

    def _compress(self, group: dict, bucket: Bucket, layout: Any, buf_own: Tensor, steps: Tensor,
                  skip: Tensor) -> None:
        """Option #2: the owners replace the momentum of their matrices by its randomized SVD, in place in the
        stored factors when they have this rank (else in new ones, zero where the step is skipped). Under DDP
        the factors are then all-gathered (replicated state, like everything else there); under FSDP2 they
        stay on the owner (for stacked parameters sharded on the expert dim: on every rank, each keeping the
        factors of its own matrices, as ``DTensor``s sharded like the parameter).

        Seeds: ``derive_seed(seed, i, t)`` for parameter ``i`` at its step ``t`` (``steps``: the bucket's step
        counters, on the device); matrix ``e`` (its global index) of a stacked parameter: ``derive_seed(seed, i,
        e, t)``. The kernels finish each seed from its key and the counter on the device."""
        params, owned = bucket.params, layout.owned_params
        (m, n), r = layout.shape, group["rank"]
        holders, leads = [params[j] for j in owned], [bucket.leads[j] for j in owned]
        factors = self._factors_in_place(holders, leads, r, buf_own) if layout.mode != "replicated" else None
        in_place = factors is not None
        if factors is None and layout.mode == "replicated":  # (copies of this rank's share: kept if skipped)
            held = self._factors_in_place(params, bucket.leads, r, None)
            factors = None if held is None else tuple(layout.to_owners(f).clone() for f in held)
        if factors is None:  # (new state, or a new rank: "raise" has read the flag before this)
            factors = tuple(buf_own.new_zeros(shape, dtype=torch.float32)
                            for shape in ((buf_own.shape[0], m, r), (buf_own.shape[0], r), (buf_own.shape[0], n, r)))
        if buf_own.shape[0] > 0:
            cache = self.step_cache()
            units = [(j, extra) for j in owned for extra in bucket.unit_keys(j)]
            keys = cache.seed_keys(group["seed"], tuple((bucket.indices[j], *extra) for j, extra in units),
                                   buf_own.device)
            rows = tuple(j for j, _ in units)
            unit_steps = steps if rows == tuple(range(len(params))) else \
                steps.index_select(0, cache.index(rows, steps.device))
            lk.rsvd_update_(*factors, buf_own, group["oversample"], group["power_iters"], keys, unit_steps, skip)
        if layout.mode == "replicated":
            factors = tuple(layout.from_owners(f) for f in factors)
            holders, leads = params, bucket.leads
        if not in_place:
            for name, factor in zip(FACTORS, factors):
                self.adopt_stacked_state(holders, name, factor, leads)
        if any("momentum_buffer" in self.state[p] for p in params):
            self.drop_state(params, "momentum_buffer")

    def _factors_in_place(self, holders: list[Tensor], leads: list, rank: int, buf_own: Tensor | None
                          ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The stacked factors of ``holders`` when every one has them at ``rank`` (and, given ``buf_own``, one
        per matrix of it): updated in place. Else None."""
        if not holders or any(self.state[p].get("U") is None or self.state[p]["U"].shape[-1] != rank
                              for p in holders):
            return None
        factors = tuple(self.stacked_state(holders, key, leads=leads) for key in FACTORS)
        return factors if buf_own is None or factors[0].shape[0] == buf_own.shape[0] else None
