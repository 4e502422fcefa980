"""One bucket of LiMuon's step: state bookkeeping around the functional core (``_functional``).

Per bucket (same-shape matrices of one group): gather the gradients, one fused momentum pass, Newton–Schulz
whose last iteration updates the parameters, and for Option #2 the RSVD that compresses the momentum. Every
write is skipped on the device when the step's non-finite flag is set; nothing is read back to the host.

Shapes: "local" tensors are this rank's rows of every matrix of the bucket, ``(B, m_loc, n)``; "own" tensors
are the whole matrices this rank owns, ``(B_own, m, n)``. Without distribution both are ``(B, m, n)`` and the
moves between them are the identity (see _distributed.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import limuon_kernels as lk
from limuon import _functional as F
from limuon._buckets import Bucket
from limuon._checks import lr_scale
from limuon._functional import apply_update_, momentum_coefficients
from limuon._lowrank import FACTORS
from limuon._nonfinite import StepGuard

#: momentum (μ = 1 − β) when none is given, per variance-reduction mode: measured, see the README's
#: momentum grid (exact STORM diverges from the one-gradient modes' best μ)
DEFAULT_MOMENTUM = {"exact": 0.7, "approx": 0.95, "none": 0.95}


def momentum_of(group: dict) -> float:
    """The group's momentum μ: its own, or the default of its variance-reduction mode."""
    mu = group["momentum"]
    return float(DEFAULT_MOMENTUM[group["variance_reduction"]] if mu is None else mu)


class LiMuonBucketStepMixin:
    """``LiMuon._step_bucket`` and its helpers (mixed into ``LiMuon``)."""

    state: Any

    def _step_bucket(self, group: dict, bucket: Bucket, old_grads: dict[int, Tensor], record: bool,
                     guard: StepGuard) -> None:
        """One bucket's update; ``record``: keep ``last_update`` for exact mode's next second gradient."""
        params = bucket.params
        layout = self.distribution().layout(params, bucket.shape, bucket.counts, bucket.whole)
        kind, low_rank = self._state_kind(group, params[0]), self._low_rank(group, params[0])
        if self._changes_form(group, bucket, kind, low_rank, record):
            self._settle(guard)  # "raise" reads the flag before state is created or replaced
        exact = group["variance_reduction"] == "exact" and kind != "first"
        G = bucket.stack([p.grad for p in params])
        G_old = bucket.stack([old_grads[id(p)] for p in params]) if exact else None
        coefficients = momentum_coefficients(group["variance_reduction"], kind == "first", momentum_of(group),
                                             group["gamma"])
        orth = self._orthogonalizer(group, bucket)
        skip = guard.found_on(G.device)
        steps = self._step_counters(bucket)

        # 1. New momentum and the orthogonaliser input (dense: this rank's rows; low-rank: on the owner).
        if kind == "lowrank":
            G_own = layout.to_owners(G)
            G_old_own = layout.to_owners(G_old) if G_old is not None else None
            buf, X, sqnorm = self._lowrank_momentum(bucket, layout.owned_params, G_own, G_old_own, coefficients,
                                                    orth.x_dtype)
        else:
            buf = self._dense_momentum(bucket, kind)
            X, sqnorm = lk.momentum_ns_input_(buf, G, G_old, coefficients, orth.x_dtype, skip)
        steps.add_(guard.ok_on(steps.device))

        # 2. Orthogonalise and update the parameters (recording the update for exact mode).
        delta = self._restore_buffer(bucket) if record else None
        lr = self.step_cache().lr(group, G.device)
        wd, scale = float(group["weight_decay"]), lr_scale(group["adjust_lr_fn"], *bucket.shape)
        if layout.mode == "local":
            F.update_fused(X, sqnorm, bucket.local_params, lr, wd, scale, orth, skip, delta)
        else:
            O = layout.from_owners(F.orthogonalize(X if kind == "lowrank" else layout.to_owners(X), orth, skip))
            apply_update_(bucket.local_params, O, lr, wd, scale, bucket.counts, skip, delta)

        # 3. Keep the momentum for the next step: compressed to rank r (by its owner), or dense.
        self._keep_momentum(group, bucket, layout, kind, low_rank, buf, steps, skip)

    def _keep_momentum(self, group: dict, bucket: Bucket, layout: Any, kind: str, low_rank: bool, buf: Tensor,
                       steps: Tensor, skip: Tensor) -> None:
        """``buf`` is this rank's rows of the new dense momentum (dense kinds) or the owned matrices' (low-rank)."""
        params, leads = bucket.params, bucket.leads
        if low_rank:
            self._compress(group, bucket, layout, buf if kind == "lowrank" else layout.to_owners(buf), steps, skip)
            return
        if kind == "lowrank":  # back to Option #1: every rank keeps its rows of the dense momentum
            buf = layout.from_owners(buf)
            buf = torch.where(skip != 0, torch.zeros((), dtype=buf.dtype, device=buf.device), buf)
        if kind != "dense":
            self.adopt_stacked_state(params, "momentum_buffer", buf, leads)
            for key in FACTORS:
                self.drop_state(params, key)

    def _changes_form(self, group: dict, bucket: Bucket, kind: str, low_rank: bool, record: bool) -> bool:
        """This step creates or replaces state rather than updating it in place: the first step, a switch
        between dense and low-rank momentum, a changed rank, a new restore buffer (exact mode turned on)."""
        states = [self.state[p] for p in bucket.params]
        rank_changed = low_rank and any("U" in st and st["U"].shape[-1] != group["rank"] for st in states)
        new_buffer = record and any("last_update" not in st for st in states)
        return kind == "first" or low_rank != (kind == "lowrank") or rank_changed or new_buffer

    def _dense_momentum(self, bucket: Bucket, kind: str) -> Tensor:
        """The stacked momentum buffer of a dense bucket; for a first step (and a low-rank one becoming dense)
        a zero one: it is not read (α = 0), and stays zero when the step is skipped."""
        if kind == "dense":
            return self.stacked_state(bucket.params, "momentum_buffer", bucket.local_shape, bucket.leads)
        return _zeros(bucket, bucket.local_params[0].dtype)

    def _step_counters(self, bucket: Bucket) -> Tensor:
        """The bucket's step counters, one per parameter, as one stacked fp32 tensor on their device."""
        for p in bucket.params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=bucket.local_params[0].device)
        return self.stacked_state(bucket.params, "step", ())

    def _restore_buffer(self, bucket: Bucket) -> Tensor:
        """The stacked bf16 ``last_update`` the update writes ``W_k − W_{k+1}`` into (exact mode)."""
        params, states = bucket.params, [self.state[p] for p in bucket.params]
        if all("last_update" in st for st in states):
            return self.stacked_state(params, "last_update", bucket.local_shape, bucket.leads)
        return self.adopt_stacked_state(params, "last_update", _zeros(bucket, torch.bfloat16), bucket.leads)


def _zeros(bucket: Bucket, dtype: torch.dtype) -> Tensor:
    """A zero ``(B, m_local, n)`` stack for the bucket's matrices on this rank."""
    return torch.zeros((sum(bucket.counts), *bucket.local_shape), dtype=dtype, device=bucket.local_params[0].device)
