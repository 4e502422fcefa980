"""The AdamW part of the hybrid optimizers: torch.optim.AdamW's update for the parameters that are not
orthogonalised (embeddings, norms, biases, groups with ``algorithm="adamw"``)."""

from __future__ import annotations

import torch
from torch import Tensor

from limuon._distributed import local, wrap_like
from limuon._nonfinite import StepGuard

_FUSED_ADAMW_DEVICES = ("cpu", "cuda")
_FUSED_ADAMW_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(dtype: torch.dtype, tensors: tuple[Tensor, ...]) -> bool:
    """The fused kernel walks each tensor as flat memory: it needs one dtype and contiguous tensors
    (not channels_last, not a strided view of a larger parameter, not an expanded gradient)."""
    return all(t.dtype == dtype and t.is_contiguous() for t in tensors)


def _adamw_update(device: torch.device, dtype: torch.dtype, tensors: list[list[Tensor]], steps: list[Tensor],
                  hyper: dict, found: Tensor) -> None:
    """One AdamW update of same-device, same-dtype tensors ``tensors = [params, grads, exp_avgs, exp_avg_sqs]``
    whose ``steps`` (0-d tensors on ``device``) already count this step; nothing changes when ``found`` is set.

    torch's fused AdamW kernel where it has one (one pass over each tensor, as torch.optim.AdamW(fused=True),
    ``found`` as its ``found_inf``), else the same arithmetic with tensor ops and no host read (bias
    corrections from the step tensors, the result selected on the device)."""
    fusable = [_fusable(dtype, ts) for ts in zip(*tensors)]
    # (torch.compile cannot functionalise torch's fused kernel: under compilation the tensor-op form is traced,
    # and Inductor fuses it)
    if device.type in _FUSED_ADAMW_DEVICES and dtype in _FUSED_ADAMW_DTYPES and hasattr(torch, "_fused_adamw_") \
            and any(fusable) and not torch.compiler.is_compiling():
        fused = [[t for t, ok in zip(ts, fusable) if ok] for ts in (*tensors, steps)]
        lr = hyper["lr"].to(device) if isinstance(hyper["lr"], Tensor) else hyper["lr"]
        torch._fused_adamw_(*fused[:4], [], fused[4], **{**hyper, "lr": lr}, amsgrad=False, maximize=False,
                            found_inf=found)
        tensors, steps = [[t for t, ok in zip(ts, fusable) if not ok] for ts in tensors], \
            [s for s, ok in zip(steps, fusable) if not ok]
    if not tensors[0]:
        return
    keep = found != 0
    lr, beta1, beta2, wd, eps = (hyper[k] for k in ("lr", "beta1", "beta2", "weight_decay", "eps"))
    for p, g, m, v, step in zip(*tensors, steps):
        # torch.optim.AdamW's in-place sequence (its capturable form: bias corrections from the step tensor),
        # in fp32 at least (a 0-d fp32 factor would be rounded to a bf16 operand's dtype), on copies that
        # replace the state unless the step is skipped
        acc = torch.promote_types(p.dtype, torch.float32)
        g = g.to(acc)
        p_new, m_new, v_new = p.to(acc) * (1.0 - lr * wd), m.to(acc).lerp(g, 1.0 - beta1), v.to(acc) * beta2
        v_new.addcmul_(g, g, value=1.0 - beta2)
        step_size_neg = -lr / (1.0 - torch.pow(beta1, step))
        bias2_sqrt = (1.0 - torch.pow(beta2, step)).sqrt()
        p_new.addcdiv_(m_new, (v_new.sqrt() / (bias2_sqrt * step_size_neg)).add_(eps / step_size_neg))
        for old, new in ((p, p_new), (m, m_new), (v, v_new)):
            old.copy_(torch.where(keep, old, new.to(old.dtype)))


def adamw_lr(group: dict) -> float | Tensor:
    """The AdamW learning rate of ``group`` at this step.

    ``adamw_lr`` follows the shape of the group's lr schedule relative to the lr the group was created
    with (``lr_at_creation``): ``adamw_lr · lr / lr_at_creation``. Not torch's ``initial_lr``, which a
    scheduler sets to its own starting value (``OneCycleLR``: ``max_lr / div_factor``), so the AdamW lr
    would be scaled by the schedule's peak-to-start ratio. A group with ``algorithm="adamw"`` is created
    with ``lr = adamw_lr`` (``_common``), so there this is ``lr`` itself, exactly (what LR monitors read is
    what the group uses). ``adamw_lr=None`` (allowed only with ``adjust_lr_fn="match_rms_adamw"``) is the
    group's lr itself. ``lr = 0`` gives 0: the whole group is frozen (torch.distributed.checkpoint initialises
    optimizer state by a step with lr = 0). A tensor lr gives a tensor (computed on its device, never read back).
    """
    lr = group["lr"]
    target = group["adamw_lr"]
    created = float(group.get("lr_at_creation") or 0.0)
    if target is None or float(target) == created:
        return lr
    if isinstance(lr, Tensor):
        return lr * (float(target) / created) if created else torch.full_like(lr, target)
    lr = float(lr)
    if created == 0.0:  # (a group created with lr = 0: no schedule shape to follow)
        return float(target) if lr != 0.0 else 0.0
    return float(target) * lr / created


def _init_state(params: list[Tensor], state: dict) -> None:
    for p in params:
        st = state[p]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif not isinstance(st["step"], Tensor):  # a plain number (checkpoints of torch < 1.12)
            st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32, device=local(p).device)


def adamw_step(group: dict, params: list[Tensor], state: dict, guard: StepGuard,
               record_update: bool = False) -> None:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) of ``params`` (with grads),
    skipped on the device when ``guard.found`` is set. Step counters are tensors on the parameters' device
    (as torch's fused AdamW keeps them), advanced by ``guard.ok``.

    ``record_update``: also keep ``state[p]["last_update"] = W_before − W_after`` in bf16, what exact
    mode adds to move the parameter back to its previous iterate (a transient copy of the parameters of
    one device and dtype is made for it).
    """
    if not params:
        return
    beta1, beta2 = group["adamw_betas"]
    wd = group["adamw_weight_decay"] if group["adamw_weight_decay"] is not None else group["weight_decay"]
    hyper = dict(lr=adamw_lr(group), beta1=beta1, beta2=beta2, weight_decay=wd, eps=group["adamw_eps"])
    _init_state(params, state)
    # Elementwise, so each rank updates its own shard; one fused kernel per (device, dtype).
    by_kind: dict[tuple, list[Tensor]] = {}
    for p in params:
        by_kind.setdefault((local(p).device, local(p).dtype), []).append(p)
    for (device, dtype), ps in by_kind.items():
        tensors = [[local(p) for p in ps], [local(p.grad) for p in ps],
                   [local(state[p]["exp_avg"]) for p in ps], [local(state[p]["exp_avg_sq"]) for p in ps]]
        steps = [state[p]["step"] for p in ps]
        torch._foreach_add_(steps, [guard.ok_on(device)] * len(steps))
        before = torch._foreach_mul(tensors[0], 1.0) if record_update else None  # (a copy in one launch)
        _adamw_update(device, dtype, tensors, steps, hyper, guard.found_on(device))
        if before is not None:
            torch._foreach_sub_(before, tensors[0])
            record_last_update(ps, before, state, None if guard.settled else guard.found_on(device))


def record_last_update(params: list[Tensor], deltas: list[Tensor], state: dict, found: Tensor | None) -> None:
    """``state[p]["last_update"] ← bf16(delta)`` for each parameter, kept as it was when ``found`` is set
    (then ``delta`` is 0: the parameters did not move). ``found=None``: the step is known to be finite (one
    copy instead of a select)."""
    held = [state[p].get("last_update") for p in params]
    if all(isinstance(h, Tensor) and h.shape == p.shape for h, p in zip(held, params)):
        buffers = [local(h) for h in held]
        if found is None:
            torch._foreach_copy_(buffers, deltas)
        else:
            torch._foreach_mul_(buffers, found)
            torch._foreach_add_(buffers, deltas)
        return
    for p, delta in zip(params, deltas):
        kept = delta if found is None else delta * (1.0 - found)
        state[p]["last_update"] = wrap_like(p, kept.to(torch.bfloat16).view(local(p).shape))
