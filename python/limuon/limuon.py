"""LiMuon (Huang, Luo, Chen 2025): Muon with STORM variance-reduced momentum, optionally low-rank."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from limuon._buckets import make_buckets
from limuon._checks import check_choice, check_int, check_matrix_view, check_ns_group, check_number
from limuon._common import HybridOptimizer
from limuon._distributed import local
from limuon._exact import MISSING_CLOSURE, RESTORE_SCOPES, closure_at_previous_iterate, previous_gradients
from limuon._limuon_step import DEFAULT_MOMENTUM, LiMuonBucketStepMixin, momentum_of
from limuon._lowrank import LowRankMomentumMixin
from limuon._lowrank_state import LowRankStateMixin
from limuon._nonfinite import StepGuard

VARIANCE_REDUCTIONS = ("exact", "approx", "none")
ORTHOGONALIZERS = ("newton_schulz", "svd")


class LiMuon(LiMuonBucketStepMixin, LowRankMomentumMixin, LowRankStateMixin, HybridOptimizer):
    r"""LiMuon: orthogonalised STORM momentum for matrices, AdamW for the rest.

    For every matrix parameter ``W`` (ndim ≥ 2; a conv weight is treated as ``(out, in·kh·kw)``),
    with ``μ = momentum`` and ``g`` its gradient (docs/ALGORITHM.md §2)::

        exact  : M_0 = g_0;  M_k = g(W_k) + μ·(M_{k−1} − g(W_{k−1}))     both gradients on one batch
        approx : b_0 = (1−γ)/μ·g_0, d_0 = g_0;  b_k = μ·b_{k−1} + (1−γ)(1−μ)/μ·g_k,  d_k = γ·g_k + μ·b_k
        none   : M_0 = g_0;  M_k = μ·M_{k−1} + (1−μ)·g_k
        O = orth(M or d)                       Newton–Schulz (or exact SVD polar factor)
        W ← W·(1 − lr·wd) − lr·s(m, n)·O       s as torch.optim.Muon's adjust_lr_fn

    Option #1 (``rank=None``) keeps the momentum ``M`` (or ``b``) as a dense ``m×n`` tensor.
    Option #2 (``rank=r``) keeps only its randomized SVD ``U (m×r), S (r), V (n×r)`` between steps and
    uses ``U diag(S) Vᵀ`` in place of the previous momentum; ``r ≥ min(m, n)`` is Option #1.
    The RSVD of parameter ``i`` at its step ``t`` is seeded with ``derive_seed(seed, i, t)`` (matrix ``e``
    of a ``matrix_view="batch"`` parameter: ``derive_seed(seed, i, e, t)``), so runs are reproducible
    and resume exactly from a ``state_dict``.

    ``matrix_view`` (per group) says what a matrix is: ``"flatten"`` (default) sees an N-D parameter as
    one ``(shape[0], numel / shape[0])`` matrix (a conv weight as ``(out, in·kh·kw)``); ``"batch"`` sees
    ``(..., m, n)`` as ``prod(shape[:-2])`` independent ``m×n`` matrices (mixture-of-experts weights,
    fused per-head projections), each with its own momentum, orthogonalisation, low-rank factors
    (stored as ``(..., m, r)``, ``(..., r)``, ``(..., n, r)``) and ``s(m, n)``, batched with the group's
    other ``m×n`` matrices. Under FSDP2 such a parameter is sharded on its first (expert) dimension:
    each rank updates the matrices it holds, with no communication.

    ``"approx"`` (the default) takes one gradient per step and needs no closure. ``"exact"`` (the
    paper's algorithm) needs ``step(closure)`` from the first step: the closure must zero the
    gradients, run forward and backward on the same batch every time it is called, and return the
    loss. From the second step on it is called twice: the second call sees the previous iterate
    ``W_{k−1}`` of every parameter this optimizer updates (``exact_restore="all"``: matrices of every
    group and the AdamW-routed parameters), rebuilt from a bf16 copy of each parameter's last update
    (state ``last_update``, 2 bytes per element: the only persistent extra state), then restored
    bit for bit. ``exact_restore="matrices"`` moves only the matrices of exact-mode groups back (less
    memory; the second gradient is then taken at a mixed point).

    Parameters with ndim < 2, and all parameters of a group with ``algorithm="adamw"``, get AdamW
    (torch.optim.AdamW semantics) with ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay``
    (``None``: the group's ``weight_decay``) and the lr ``adamw_lr · lr / lr₀`` (lr₀: the group's lr
    when it was created, so the AdamW part follows the lr schedule's shape). ``adamw_lr`` is required
    for such parameters unless ``adjust_lr_fn="match_rms_adamw"`` (then ``lr`` serves both). One update
    per step, from the first closure call's gradient.

    Args:
        params: parameters or param groups (a group may set any argument below and ``algorithm``).
        lr: learning rate of the matrix update.
        momentum: ``μ = 1 − β`` of the paper (Muon's momentum). ``None``: the measured default of the
            group's mode (``DEFAULT_MOMENTUM``: 0.95 for approx and none, lower for exact).
        rank: ``None`` (Option #1) or the RSVD rank of the low-rank momentum (Option #2).
        oversample: extra RSVD sketch columns (``s``); power_iters: RSVD subspace iterations.
        variance_reduction: ``"approx"`` (default), ``"exact"`` or ``"none"`` (see above).
        exact_restore: ``"all"`` (default) or ``"matrices"``: what exact mode moves back (see above).
        gamma: ``γ`` of the approx mode.
        orthogonalizer: ``"newton_schulz"`` or ``"svd"`` (exact polar factor in fp32; slow).
        ns_steps, ns_coefficients, eps: Newton–Schulz iterations, coefficients (``"keller"``,
            ``"polar_express"``, one ``(a, b, c)`` triple or one triple per iteration), and the
            normalisation floor. ns_method: ``"auto"`` (default), ``"standard"`` or ``"gram"`` (Gram
            Newton–Schulz: the iteration on the ``min(m,n)²`` Gram matrix; ``"auto"`` picks it where it
            was measured to be faster, see ``limuon_kernels.resolve_ns_method``).
        weight_decay: decoupled weight decay; adjust_lr_fn: ``None``/``"original"`` or ``"match_rms_adamw"``.
        seed: base seed of the RSVD sketches.
        matrix_view: ``"flatten"`` (default) or ``"batch"``: how an N-D parameter is seen as matrices (above).
        ns_compute_dtype: matmul dtype of Newton–Schulz (``None``: ``limuon_kernels.get_ns_compute_dtype``:
            bf16 on GPUs and on CPUs with bf16 matrix instructions, else fp32).
        distributed_mesh: ``None``, or a 1-D ``DeviceMesh`` / ``ProcessGroup`` over which DDP-replicated
            matrices are split: each rank orthogonalises (and, for Option #2, compresses) its share and
            the results are all-gathered, so every rank keeps the same state. FSDP2's ``DTensor``
            parameters need no argument: each matrix is gathered whole on a fixed owner rank (all-to-all),
            orthogonalised and compressed there, and sent back as shards; the elementwise work stays on
            the local shards, and the low-rank factors ``U, S, V`` live on the owner only.
        nonfinite: ``"raise"`` (default): a NaN/Inf gradient raises ``NonFiniteGradientError`` with nothing
            changed (the kernels skip their writes on the device; one host read at the end of the step).
            ``"skip"``: no host read (one process; under DDP/FSDP2 the ranks agree on which parameters have
            gradients with one read); such a step is skipped on the device and counted in ``skipped_steps``,
            as GradScaler skips a step. A skipped step that would create the state leaves it zero: the next
            step continues from zero momentum (as torch.optim.Muon's first step does), not from the
            first-step formula.

    Exact mode without a closure is refused before anything changes, except for a step that only
    initialises state (lr = 0 in every exact-mode group, no state yet: torch.distributed.checkpoint
    creates optimizer state that way).
    """

    _matrix_algorithm = "limuon"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float | None = None,
        *,
        rank: int | None = None,
        oversample: int = 5,
        power_iters: int = 0,
        variance_reduction: str = "approx",
        exact_restore: str = "all",
        gamma: float = 0.025,
        orthogonalizer: str = "newton_schulz",
        ns_steps: int = 5,
        ns_coefficients: str | Sequence = "keller",
        ns_method: str = "auto",
        eps: float = 1e-7,
        weight_decay: float = 0.1,
        adjust_lr_fn: str | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        seed: int = 0,
        matrix_view: str | None = None,
        ns_compute_dtype: torch.dtype | None = None,
        distributed_mesh: Any = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, rank=rank, oversample=oversample, power_iters=power_iters,
            variance_reduction=variance_reduction, exact_restore=exact_restore, gamma=gamma,
            orthogonalizer=orthogonalizer,
            ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_method=ns_method, eps=eps, weight_decay=weight_decay,
            adjust_lr_fn=adjust_lr_fn, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay, ns_compute_dtype=ns_compute_dtype, seed=seed,
            matrix_view=matrix_view, algorithm=None,
        )
        self._set_distributed_mesh(distributed_mesh, nonfinite)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["momentum"] is not None:
            check_number("momentum", group["momentum"], 0.0, 1.0, low_open=True, high_open=True)
        check_choice("exact_restore", group["exact_restore"], RESTORE_SCOPES)
        if group["rank"] is not None:
            check_int("rank", group["rank"], 1)
        check_int("oversample", group["oversample"], 0)
        check_int("power_iters", group["power_iters"], 0)
        check_choice("variance_reduction", group["variance_reduction"], VARIANCE_REDUCTIONS)
        check_number("gamma", group["gamma"], 0.0, 1.0)
        check_choice("orthogonalizer", group["orthogonalizer"], ORTHOGONALIZERS)
        check_int("seed", group["seed"], 0)
        check_matrix_view(group)
        check_ns_group(group)


    # -- the step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LiMuon step. ``closure`` is required when a group uses ``variance_reduction="exact"``."""
        self._check_all_groups()
        self._check_factor_views()
        exact = self._exact_active()
        if exact and closure is None and not self._initialising_exact_state():
            raise RuntimeError(MISSING_CLOSURE)
        loss = previous = None
        if exact and closure is not None and self._has_previous_iterate():
            params = self._all_params()
            movers = [p for p in params if "last_update" in self.state.get(p, {})]
            previous = closure_at_previous_iterate(params, movers, self.state, closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        split = self._split()
        old_items = self._old_point_gradients(split, previous) if previous is not None else []
        guard = self._begin_step(old_items)
        old_grads = {id(p): g for _, p, g in old_items}
        for group, mats, _ in split:
            record = exact and self._moves_back(group, matrix=True)
            for bucket in make_buckets([p for _, p in mats], [i for i, _ in mats], group["matrix_view"],
                                       key=lambda p, g=group: self._bucket_key(g, p)):
                self._step_bucket(group, bucket, old_grads, record, guard)
        # AdamW last: the matrix work is where a failure could still happen (e.g. a kernel limit).
        for group, _, others in split:
            self._adamw_step(group, [p for _, p in others], guard, exact and self._moves_back(group, matrix=False))
        self._finish_step(guard)
        self._keep_restore_buffers(exact, {id(p) for _, mats, others in split for _, p in mats + others}, guard)
        self._remember_modes()
        return loss

    # -- exact mode ---------------------------------------------------------------------------------

    def _exact_active(self) -> bool:
        """Some group is in exact mode and has matrices: this step takes two gradients."""
        return any(g["variance_reduction"] == "exact" and any(self._is_matrix(g, p) for p in g["params"])
                   for g in self.param_groups)

    def _initialising_exact_state(self) -> bool:
        """A step without a closure that only initialises state: every exact-mode group has lr = 0 and no
        exact-mode matrix has a previous iterate yet (torch.distributed.checkpoint creates optimizer state
        by such a step, with zero gradients)."""
        exact_groups = [g for g in self.param_groups if g["variance_reduction"] == "exact"]
        return all(float(g["lr"]) == 0.0 for g in exact_groups) and not any(
            "last_update" in self.state.get(p, {}) for g in exact_groups for p in g["params"])

    @staticmethod
    def _moves_back(group: dict, matrix: bool) -> bool:
        """Whether the second closure call puts this group's matrices (or its AdamW-routed parameters)
        back to their previous iterate: always with ``exact_restore="all"``; with ``"matrices"`` only the
        matrices of exact-mode groups."""
        return group["exact_restore"] == "all" or (matrix and group["variance_reduction"] == "exact")

    def _has_previous_iterate(self) -> bool:
        """Some exact-mode matrix has a previous iterate: this step takes the second gradient."""
        return any("last_update" in self.state.get(p, {}) for g in self.param_groups
                   if g["variance_reduction"] == "exact" for p in g["params"] if self._is_matrix(g, p))

    def _old_point_gradients(self, split: list, previous: dict[int, Tensor | None]) -> list:
        """Exact mode: (index, matrix, gradient at the previous iterate, same batch) of the exact-mode matrices."""
        needed = [(i, p) for group, mats, _ in split if group["variance_reduction"] == "exact"
                  for i, p in mats if "last_update" in self.state.get(p, {})]
        return previous_gradients(needed, previous, self.distribution().group, self.param_label)

    def _keep_restore_buffers(self, exact: bool, stepped: set[int], guard: StepGuard) -> None:
        """Restore buffers for the next step: dropped where no longer wanted (no exact mode, or out of the
        ``exact_restore`` scope: stale when exact mode returns); zeroed for a parameter that skips this
        step (it does not move, so its previous iterate is itself), unless the whole step was skipped."""
        drop, idle = [], []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "last_update" not in st:
                    continue
                if not (exact and self._moves_back(group, self._is_matrix(group, p))):
                    drop.append(p)
                elif id(p) not in stepped:
                    idle.append(st["last_update"])
        if drop:
            self.drop_state(drop, "last_update")
        if idle:
            torch._foreach_mul_([local(t) for t in idle], guard.found)  # (kept when the step was skipped)

    def _state_kind(self, group: dict, p: Tensor) -> str:
        """"first" (no momentum yet), "dense" (momentum_buffer stored) or "lowrank" (U, S, V stored,
        under FSDP2 on the matrix's owner rank only). Decided from state every rank holds."""
        st = self.state.get(p, {})
        if "step" not in st or (group["variance_reduction"] == "exact"
                                and ("last_update" not in st or self._switched_mode(group))):
            # Also when a group switches to exact mode: its stored momentum is another mode's (approx keeps
            # b, not M) and it may have no previous iterate: restart M = g.
            return "first"
        return "dense" if "momentum_buffer" in st else "lowrank"

    def _switched_mode(self, group: dict) -> bool:
        """The group's mode differs from the one its last step in this process ran (or it was loaded) with."""
        mode = group["variance_reduction"]
        return self.__dict__.get("_modes", {}).get(id(group), mode) != mode

    def _remember_modes(self) -> None:
        self.__dict__["_modes"] = {id(g): g["variance_reduction"] for g in self.param_groups}

    def _bucket_key(self, group: dict, p: Tensor) -> str:
        return self._state_kind(group, p)


__all__ = ["DEFAULT_MOMENTUM", "LiMuon", "momentum_of"]
