"""The AdamW part of the hybrid optimizers: torch.optim.AdamW's update for the parameters that are not
orthogonalised (embeddings, norms, biases, groups with ``algorithm="adamw"``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from limuon._distributed import local, wrap_like

_FUSED_ADAMW_DEVICES = ("cpu", "cuda")
_FUSED_ADAMW_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(dtype: torch.dtype, tensors: tuple[Tensor, ...]) -> bool:
    """The fused kernel walks each tensor as flat memory: it needs one dtype and contiguous tensors
    (not channels_last, not a strided view of a larger parameter, not an expanded gradient)."""
    return all(t.dtype == dtype and t.is_contiguous() for t in tensors)


def _adamw_update(device: torch.device, dtype: torch.dtype, params: list[Tensor], grads: list[Tensor],
                  exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[float], lr: float,
                  beta1: float, beta2: float, weight_decay: float, eps: float) -> None:
    """One AdamW update (``steps``: the step numbers after this one) of same-device, same-dtype tensors.

    torch's fused AdamW kernel where it has one (one pass over each tensor, as
    ``torch.optim.AdamW(fused=True)``), else the same arithmetic with foreach ops."""
    fusable = [_fusable(dtype, ts) for ts in zip(params, grads, exp_avgs, exp_avg_sqs)]
    if device.type in _FUSED_ADAMW_DEVICES and dtype in _FUSED_ADAMW_DTYPES and hasattr(torch, "_fused_adamw_") \
            and any(fusable):
        fused = [[t for t, ok in zip(ts, fusable) if ok] for ts in (params, grads, exp_avgs, exp_avg_sqs, steps)]
        # The kernel reads the step from a tensor on the parameters' device (one small copy).
        step_tensors = list(torch.tensor(fused[4], dtype=torch.float32, device=device).unbind(0))
        torch._fused_adamw_(*fused[:4], [], step_tensors, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            [t for t, ok in zip(ts, fusable) if not ok] for ts in (params, grads, exp_avgs, exp_avg_sqs, steps))
        if not params:
            return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    for p, m, v, step in zip(params, exp_avgs, exp_avg_sqs, steps):
        bias1 = 1.0 - beta1**step
        bias2_sqrt = math.sqrt(1.0 - beta2**step)
        denom = (v.sqrt() / bias2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bias1)


def adamw_lr(group: dict) -> float:
    """The AdamW learning rate of ``group`` at this step.

    ``adamw_lr`` follows the shape of the group's lr schedule relative to the lr the group was created
    with (``lr_at_creation``): ``adamw_lr · lr / lr_at_creation``. Not torch's ``initial_lr``, which a
    scheduler sets to its own starting value (``OneCycleLR``: ``max_lr / div_factor``), so the AdamW lr
    would be scaled by the schedule's peak-to-start ratio. ``adamw_lr=None`` (allowed only with
    ``adjust_lr_fn="match_rms_adamw"``) is the group's lr itself. ``lr = 0`` gives 0: the whole group is
    frozen (torch.distributed.checkpoint initialises optimizer state by a step with lr = 0).
    """
    lr = float(group["lr"])
    if group["adamw_lr"] is None:
        return lr
    created = float(group.get("lr_at_creation") or 0.0)
    if created == 0.0:  # (a group created with lr = 0: no schedule shape to follow)
        return float(group["adamw_lr"]) if lr != 0.0 else 0.0
    return float(group["adamw_lr"]) * lr / created


def adamw_step(group: dict, params: list[Tensor], state: dict, record_update: bool = False) -> None:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) of ``params`` (with grads).

    ``record_update``: also keep ``state[p]["last_update"] = W_before − W_after`` in bf16, what exact
    mode adds to move the parameter back to its previous iterate (a transient fp32 copy of the
    parameters of one device and dtype is made for it).
    """
    if not params:
        return
    lr = adamw_lr(group)
    wd = group["adamw_weight_decay"] if group["adamw_weight_decay"] is not None else group["weight_decay"]
    beta1, beta2 = group["adamw_betas"]
    eps = group["adamw_eps"]
    for p in params:
        st = state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    # Elementwise, so each rank updates its own shard; one fused kernel per (device, dtype).
    by_kind: dict[tuple, list[Tensor]] = {}
    for p in params:
        by_kind.setdefault((local(p).device, local(p).dtype), []).append(p)
    for (device, dtype), ps in by_kind.items():
        tensors = [[local(t) for t in (p, p.grad, state[p]["exp_avg"], state[p]["exp_avg_sq"])] for p in ps]
        steps = [float(state[p]["step"]) + 1.0 for p in ps]
        before = [local(p).clone() for p in ps] if record_update else None
        _adamw_update(device, dtype, *map(list, zip(*tensors)), steps, lr, beta1, beta2, wd, eps)
        for p, step in zip(ps, steps):
            if isinstance(state[p]["step"], Tensor):
                state[p]["step"].fill_(step)
            else:  # a plain number (checkpoints of torch < 1.12)
                state[p]["step"] = torch.tensor(step)
        if before is not None:
            torch._foreach_sub_(before, [local(p) for p in ps])
            record_last_update(ps, before, state)


def record_last_update(params: list[Tensor], deltas: list[Tensor], state: dict) -> None:
    """``state[p]["last_update"] ← bf16(delta)`` for each parameter (in place when it exists)."""
    for p, delta in zip(params, deltas):
        held = state[p].get("last_update")
        if isinstance(held, Tensor) and held.shape == p.shape:
            local(held).copy_(delta.view_as(local(held)))
        else:
            state[p]["last_update"] = wrap_like(p, delta.to(torch.bfloat16).view(local(p).shape))
