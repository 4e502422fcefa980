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
                            f"Invalid matrix_view: {view!r} for parameter {index} (shape {tuple(p.shape)}): its "
                            f"low-rank factor U has shape {tuple(U.shape)}, stored under the other matrix_view; "
                            "keep the matrix_view the state was created with. Nothing was changed"
                        )
                index += 1

    def _lowrank_momentum(self, group: dict, bucket: Bucket, owned: list[int], G: Tensor, G_old: Tensor | None,
                          mu: float) -> tuple[Tensor, Tensor]:
        """Option #2 on the owner: the new momentum ``buf`` and the orthogonaliser input from the stored
        factors of the parameters ``owned`` (bucket positions) and their gradients ``G`` (whole matrices,
        ``(B_own, m, n)``).

        Parameters whose stored rank differs (the group's rank changed while some skipped steps) are
        computed in separate batches, since their factors cannot be stacked together."""
        params = [bucket.params[j] for j in owned]
        leads = [bucket.leads[j] for j in owned]
        for p, j in zip(params, owned):
            if "U" not in self.state[p]:  # (checked on every rank before the step: see _lost_state)
                raise RuntimeError(
                    f"LiMuon has no low-rank factors for parameter {bucket.indices[j]} (shape {tuple(p.shape)})")
        if G.shape[0] == 0:  # (no matrix here: a rank holding none of a stacked parameter's experts)
            return G, G
        by_rank: dict[int, list[int]] = {}
        for k, p in enumerate(params):
            by_rank.setdefault(self.state[p]["U"].shape[-1], []).append(k)
        if len(by_rank) == 1:
            return self._lowrank_momentum_batch(group, params, leads, G, G_old, mu)
        counts = [unit_count(lead) for lead in leads]
        starts = [sum(counts[:k]) for k in range(len(counts))]
        buf, ns_in = torch.empty_like(G), torch.empty_like(G)
        for ks in by_rank.values():
            rows = [starts[k] + e for k in ks for e in range(counts[k])]
            if not rows:
                continue
            b, x = self._lowrank_momentum_batch(group, [params[k] for k in ks], [leads[k] for k in ks], G[rows],
                                                None if G_old is None else G_old[rows], mu)
            buf[rows], ns_in[rows] = b, x
        return buf, ns_in

    def _lowrank_momentum_batch(self, group: dict, params: list[Tensor], leads: list, G: Tensor,
                                G_old: Tensor | None, mu: float) -> tuple[Tensor, Tensor]:
        mode, gamma = group["variance_reduction"], group["gamma"]
        U, S, V = (self.stacked_state(params, k, leads=leads) for k in FACTORS)
        if mode == "exact":
            buf = lk.lowrank_storm(U, S, V, G, G_old, mu)
            return buf, buf
        if mode == "none":
            buf = lk.lowrank_axpby(U, S, V, G, mu, 1.0 - mu)
            return buf, buf
        buf = lk.lowrank_axpby(U, S, V, G, mu, (1.0 - gamma) * (1.0 - mu) / mu)
        return buf, buf.mul(mu).add_(G, alpha=gamma)

    def _compress(self, group: dict, bucket: Bucket, layout: Any, buf_own: Tensor) -> None:
        """Option #2: the owners replace the momentum of their matrices by its randomized SVD. Under DDP
        the factors are then all-gathered (replicated state, like everything else there); under FSDP2
        they stay on the owner (for stacked parameters sharded on the expert dim: on every rank, each
        keeping the factors of its own matrices, as ``DTensor``s sharded like the parameter).

        Seeds: ``derive_seed(seed, i, t)`` for parameter ``i`` at its step ``t``; matrix ``e`` (its global
        index) of a stacked parameter: ``derive_seed(seed, i, t, e)``."""
        params, owned = bucket.params, layout.owned_params
        if buf_own.shape[0] > 0:
            seeds = [lk.derive_seed(group["seed"], bucket.indices[j], int(self.state[params[j]]["step"]), *extra)
                     for j in owned for extra in bucket.unit_keys(j)]
            factors = lk.rsvd(buf_own, group["rank"], group["oversample"], group["power_iters"], seed=seeds)
        else:  # (an all-gather below still needs this rank's empty share)
            (m, n), r = layout.shape, group["rank"]
            factors = tuple(buf_own.new_empty(shape, dtype=torch.float32) for shape in ((0, m, r), (0, r), (0, n, r)))
        holders, leads = [params[j] for j in owned], [bucket.leads[j] for j in owned]
        if layout.mode == "replicated":
            factors = tuple(layout.from_owners(f) for f in factors)
            holders, leads = params, bucket.leads
        for name, factor in zip(FACTORS, factors):
            self.adopt_stacked_state(holders, name, factor, leads)
        self.drop_state(params, "momentum_buffer")
