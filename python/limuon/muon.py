"""Muon: a drop-in for torch.optim.Muon, plus N-D parameters, an AdamW fallback and batching."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import limuon_kernels as lk
from limuon import _functional as F
from limuon._buckets import Bucket, make_buckets
from limuon._checks import check_matrix_view, check_ns_group, check_number, lr_scale
from limuon._common import HybridOptimizer
from limuon._functional import apply_update_, muon_coefficients
from limuon._nonfinite import StepGuard


class Muon(HybridOptimizer):
    r"""Muon (Keller Jordan et al.) with torch.optim.Muon's arguments, defaults and results.

    For every matrix parameter (ndim ≥ 2; a conv weight is treated as ``(out, in·kh·kw)``)::

        B ← lerp(B, g, 1 − μ);   G = lerp(g, B, μ) if nesterov else B
        O = NS(G);               W ← W·(1 − lr·wd) − lr·s(m, n)·O

    Same-shape matrices are orthogonalised as one ``(B, m, n)`` batch. ``matrix_view`` (per group):
    ``"flatten"`` (default) orthogonalises an N-D parameter as one ``(shape[0], numel / shape[0])`` matrix;
    ``"batch"`` sees ``(..., m, n)`` as ``prod(shape[:-2])`` independent ``m×n`` matrices (mixture-of-experts
    weights), each with its own ``s(m, n)``, batched with the group's other ``m×n`` matrices. Parameters
    with ndim < 2 and groups with ``algorithm="adamw"`` get AdamW (torch.optim.AdamW semantics) with ``adamw_lr``
    (required for them unless ``adjust_lr_fn="match_rms_adamw"``; scaled by ``lr / lr₀`` under a schedule),
    ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay`` (``None``: the group's weight_decay).
    State keys match torch.optim.Muon (``momentum_buffer``): a torch.optim.Muon state dict loads and
    continues as torch's run does (the settings torch's groups lack are this optimizer's).

    ``ns_compute_dtype`` is the Newton–Schulz matmul dtype (``None``: ``limuon_kernels.get_ns_compute_dtype``:
    bf16 on GPUs and on CPUs with AVX512-BF16/AMX, fp32 on other CPUs, where bf16 matmuls are 25–90× slower);
    kept in the group by name. ``ns_method``: ``"auto"``, ``"standard"`` or ``"gram"`` (Gram Newton–Schulz).

    ``distributed_mesh`` (a 1-D ``DeviceMesh`` or a ``ProcessGroup``) splits the Newton–Schulz work of
    DDP-replicated parameters across its ranks (each orthogonalises its share, then the updates are
    all-gathered). FSDP2's ``DTensor`` parameters are handled without it: each matrix is gathered whole
    on one owner rank, orthogonalised there in a batch with the others it owns, and sent back as shards.

    ``nonfinite``: ``"raise"`` (default; a NaN/Inf gradient raises ``NonFiniteGradientError`` with nothing
    changed, after one host read) or ``"skip"`` (no host read on one process: the step is skipped on the device
    and counted in ``skipped_steps``; under DDP/FSDP2 the ranks agree on which parameters have gradients with
    one read). A step is a fused momentum pass and one Newton–Schulz launch sequence per bucket.
    """

    _matrix_algorithm = "muon"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: str | Sequence = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        ns_compute_dtype: torch.dtype | None = None,
        ns_method: str = "auto",
        matrix_view: str | None = None,
        distributed_mesh: Any = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay, ns_compute_dtype=ns_compute_dtype, ns_method=ns_method,
            matrix_view=matrix_view,
            algorithm=None,
        )
        self._set_distributed_mesh(distributed_mesh, nonfinite)
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_number("momentum", group["momentum"], low=0.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"Invalid nesterov: {group['nesterov']!r}; expected a bool")
        check_matrix_view(group)
        check_ns_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Muon step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        self._check_all_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        split = self._split()
        guard = self._begin_step()
        for group, mats, _ in split:
            for bucket in make_buckets([p for _, p in mats], [i for i, _ in mats], group["matrix_view"]):
                self._step_bucket(group, bucket, guard)
        # AdamW last: the matrix work is where a failure could still happen (e.g. a kernel limit).
        for group, _, others in split:
            self._adamw_step(group, [p for _, p in others], guard)
        self._finish_step(guard)
        return loss

    def _step_bucket(self, group: dict, bucket: Bucket, guard: StepGuard) -> None:
        """One bucket: the momentum pass (buffers stacked: one launch), then Newton–Schulz whose last iteration
        updates the parameters (on one process; under DDP/FSDP2 the owners orthogonalise and send back)."""
        params = bucket.params
        layout = self.distribution().layout(params, bucket.shape, bucket.counts, bucket.whole)
        if any("momentum_buffer" not in self.state[p] for p in params):
            self._settle(guard)  # (new state: a raised step must not leave it behind)
            for p in params:
                self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        bufs = self.stacked_state(params, "momentum_buffer", bucket.local_shape, bucket.leads)
        G = bucket.stack([p.grad for p in params])
        orth = self._orthogonalizer(group, bucket)
        skip = guard.found_on(G.device)
        coefficients = muon_coefficients(group["momentum"], group["nesterov"])
        X, sqnorm = lk.momentum_ns_input_(bufs, G, None, coefficients, orth.x_dtype, skip)
        lr = self.step_cache().lr(group, G.device)
        wd, scale = float(group["weight_decay"]), lr_scale(group["adjust_lr_fn"], *bucket.shape)
        if layout.mode == "local":
            F.update_fused(X, sqnorm, bucket.local_params, lr, wd, scale, orth, skip, None)
        else:
            O = layout.from_owners(F.orthogonalize(layout.to_owners(X), orth, skip))
            apply_update_(bucket.local_params, O, lr, wd, scale, bucket.counts, skip)
