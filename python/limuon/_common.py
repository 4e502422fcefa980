"""What LiMuon and Muon share: hyperparameter checks, parameter routing, gradient checks, the AdamW
fallback for non-matrix parameters, and the batching of same-shape matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import limuon_kernels as lk
from limuon._distributed import (
    Distribution,
    adapt_to_param,
    check_dtensor_param,
    is_dtensor,
    local,
    reduce_flags,
    resolve_group,
    wrap_like,
)
from limuon_kernels.ns_coefficients import resolve_coefficients

ADAMW = "adamw"
#: state entries shaped like their parameter (stored as a DTensor sharded like it under FSDP2)
PARAM_SHAPED_STATE = ("momentum_buffer", "last_update", "exp_avg", "exp_avg_sq")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or Inf; the step was refused and nothing was changed."""


# -- hyperparameter checks ------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError(f"Invalid {name}: {value}")`` unless value is a finite number in range."""
    ok = _is_number(value)
    if ok:
        v = float(value)
        ok = math.isfinite(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f"{lo}{hi}" if lo and hi else (f">{'' if low_open else '='} {low}" if lo else f"<= {high}")
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number {'in ' if lo and hi else ''}{rng}")


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {low}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {choices}")


def check_adamw_group(group: dict) -> None:
    """Validate the AdamW hyperparameters of a group (``None`` means: use the matrix value)."""
    if group.get("adamw_lr") is not None:
        check_number("adamw_lr", group["adamw_lr"], low=0.0)
    betas = group["adamw_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid adamw_betas: {betas!r}; expected a pair (beta1, beta2)")
    check_number("adamw_betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_number("adamw_betas[1]", betas[1], 0.0, 1.0, high_open=True)
    check_number("adamw_eps", group["adamw_eps"], low=0.0)
    if group.get("adamw_weight_decay") is not None:
        check_number("adamw_weight_decay", group["adamw_weight_decay"], low=0.0)


def check_ns_group(group: dict) -> None:
    """Validate the Newton–Schulz hyperparameters of a group."""
    check_int("ns_steps", group["ns_steps"], 1)
    if group["ns_steps"] >= 100:
        raise ValueError(f"Invalid ns_steps: {group['ns_steps']}; expected fewer than 100 iterations")
    resolve_coefficients(group["ns_coefficients"], group["ns_steps"])
    check_number("eps", group["eps"], low=0.0)
    check_choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
    dtype = group.get("ns_compute_dtype")
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"Invalid ns_compute_dtype: {dtype!r}; expected None or a float dtype")


# -- shapes and learning-rate scaling -------------------------------------------------------------


def matrix_shape(p: Tensor) -> tuple[int, int]:
    """The 2-D view an N-D parameter is orthogonalised as: ``(out, in·kh·kw)`` for a conv weight
    (the global shape for a ``DTensor``)."""
    return p.shape[0], p.numel() // p.shape[0]


def lr_scale(adjust_lr_fn: str | None, m: int, n: int) -> float:
    """``s(m, n)`` of torch.optim.Muon: the factor applied to lr for the orthogonalised update."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, m / n))
    return 0.2 * math.sqrt(max(m, n))


# -- gradients ------------------------------------------------------------------------------------


def check_gradients(items: list[tuple[int, Tensor, Tensor | None]], what: str = "gradient",
                    group: Any = None, required: bool = False, lost_state: list[bool] | None = None) -> None:
    """Refuse sparse, complex or non-finite gradients; ``items`` are (param index, param, grad or None).

    A ``None`` gradient is skipped, or refused when ``required``. With a process ``group`` every rank
    must see the same thing: the flags of all ranks are combined with one all-reduce, so a NaN in one
    rank's shard, or a gradient that exists on some ranks only, fails the step on every rank (instead of
    one rank raising while the others wait in a collective). One host synchronisation in all.
    ``lost_state[j]``: this rank owns matrix ``j`` but lacks its low-rank factors (checked alike).
    """
    for idx, p, g in items:
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError(
                f"The {what} of parameter {idx} (shape {tuple(p.shape)}) is sparse; limuon supports dense "
                "gradients only"
            )
        if g.is_complex():
            raise RuntimeError(
                f"The {what} of parameter {idx} (shape {tuple(p.shape)}) is complex; limuon supports real "
                "tensors only"
            )
    if not items:
        return
    present = [g is not None for _, _, g in items]
    if group is None and not required and not all(present):
        items = [it for it, has in zip(items, present) if has]
        present = [True] * len(items)
        if not items:
            return
    nonfinite = [not finite for finite in _all_finite([g for _, _, g in items])]
    lost = lost_state if lost_state is not None else [False] * len(items)
    flags = torch.tensor([present, nonfinite, lost], dtype=torch.int32).reshape(-1)
    anywhere, everywhere = (t.tolist() for t in reduce_flags(group, flags))
    n = len(items)
    for j, (idx, p, _) in enumerate(items):
        if anywhere[j] and not everywhere[j]:
            raise RuntimeError(
                f"Parameter {idx} (shape {tuple(p.shape)}) has a {what} on some ranks and none on others; every "
                "rank must step the same parameters. The step was skipped and nothing was changed"
            )
        if required and not anywhere[j]:
            raise RuntimeError(
                f"The closure produced no {what} for parameter {idx} (shape {tuple(p.shape)}); it must run "
                "backward through the same parameters every time it is called"
            )
    lost_somewhere = [j for j, flag in enumerate(anywhere[2 * n:]) if flag]
    if lost_somewhere:
        idx, p, _ = items[lost_somewhere[0]]
        raise RuntimeError(
            f"The optimizer has no low-rank factors (U, S, V) for parameter {idx} (shape {tuple(p.shape)}) on the "
            "rank that owns it. Restore optimizer state with the optimizer's own state_dict() (which gathers "
            "them from their owners under FSDP2) or torch.distributed.checkpoint. Nothing was changed"
        )
    bad = [j for j, flag in enumerate(anywhere[n: 2 * n]) if flag]
    if bad:
        idx, p, _ = items[bad[0]]
        where = " on at least one rank" if group is not None else ""
        raise NonFiniteGradientError(
            f"The {what} of parameter {idx} (shape {tuple(p.shape)}) is not finite{where} (it contains NaN or "
            "Inf); the step was skipped and no parameter or optimizer state was changed"
        )


def _all_finite(grads: list[Tensor | None]) -> list[bool]:
    """Per gradient (``None``: True): no NaN or Inf in it. One host synchronisation.

    A sum is NaN or ±Inf when any element is, and is one fast read of the tensor (``isfinite().all()``
    takes ~30× longer on CPU); a non-finite sum can also come from overflow of finite values, so the
    gradients it flags are checked exactly."""
    sums = [local(g).sum(dtype=torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None)
            for g in grads if g is not None]
    if not sums:
        return [True] * len(grads)
    device = sums[0].device  # (parameters may live on several devices: the flags go to one)
    ok = iter(torch.isfinite(torch.stack([s.to(device) for s in sums])).tolist())
    finite = [True if g is None else next(ok) for g in grads]
    return [f or bool(torch.isfinite(local(g)).all()) for f, g in zip(finite, grads)]


# -- batching of same-shape matrices --------------------------------------------------------------


@dataclass
class Bucket:
    """Same-shape, same-dtype, same-device matrices of one param group, processed as one batch.

    ``shape`` is the global 2-D shape; ``local_shape`` the part this rank holds (fewer rows for a
    parameter sharded by FSDP2, else the same).
    """

    shape: tuple[int, int]
    local_shape: tuple[int, int]
    params: list[Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def stack(self, tensors: list[Tensor]) -> Tensor:
        """Stack this rank's parts of per-parameter tensors as ``(B, m_local, n)`` (conv weights flattened)."""
        return torch.stack([local(t).reshape(self.local_shape) for t in tensors])

    @property
    def local_params(self) -> list[Tensor]:
        return [local(p) for p in self.params]


def make_buckets(params: list[Tensor], indices: list[int], key: Callable[[Tensor], Any] = lambda p: None
                 ) -> list[Bucket]:
    """Group matrices by (2-D shape, dtype, device, key(p)), keeping first-appearance order."""
    buckets: dict[Any, Bucket] = {}
    for p, idx in zip(params, indices):
        k = (matrix_shape(p), p.dtype, p.device, is_dtensor(p), key(p))  # sharded and plain: never one batch
        shape = matrix_shape(p)
        b = buckets.setdefault(k, Bucket(shape=shape, local_shape=(local(p).shape[0], shape[1])))
        b.params.append(p)
        b.indices.append(idx)
    return list(buckets.values())


def apply_update(params: list[Tensor], O: Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """``W ← W·(1 − lr·wd) − lr·scale·O`` for every matrix of the batch (decoupled weight decay);
    ``params`` are the tensors this rank holds (local shards), ``O`` their part of the update."""
    updates = [o.view_as(p) for o, p in zip(O.unbind(0), params)]
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr * scale)


def _is_inner_slice(value: Any) -> bool:
    """A ``DTensor`` whose local tensor is part of a larger storage (a bucket's stacked state): torch.save
    cannot pickle it when it starts inside the storage, and would write the whole storage otherwise."""
    if not is_dtensor(value):
        return False
    held = local(value)
    return held.storage_offset() != 0 or held.untyped_storage().nbytes() != held.numel() * held.element_size()


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


# -- the shared optimizer base --------------------------------------------------------------------


class HybridOptimizer(Optimizer):
    """Orthogonalised updates for matrices, AdamW for everything else, in one optimizer.

    Subclasses set ``_matrix_algorithm`` (the group ``algorithm`` name of their matrix update),
    implement ``_check_group`` and ``_step_matrices``.
    """

    _matrix_algorithm = "matrix"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        first_index = sum(len(g["params"]) for g in self.param_groups[:-1])
        try:
            self._check_group(group)
            for j, p in enumerate(group["params"]):
                check_dtensor_param(first_index + j, p)
                if p.is_complex():
                    raise ValueError(
                        f"Invalid parameter of shape {tuple(p.shape)}: complex parameters are not supported"
                    )
                if p.ndim >= 2 and p.numel() == 0 and group["algorithm"] != ADAMW:
                    raise ValueError(
                        f"Invalid parameter of shape {tuple(p.shape)}: an empty matrix cannot be orthogonalised"
                    )
                if group["algorithm"] == self._matrix_algorithm and p.ndim < 2:
                    raise ValueError(
                        f"Invalid parameter of shape {tuple(p.shape)} in a group with algorithm="
                        f"{self._matrix_algorithm!r}: it needs ndim >= 2 (use algorithm='adamw')"
                    )
        except ValueError:
            self.param_groups.pop()
            raise

    def _set_distributed_mesh(self, distributed_mesh: Any) -> None:
        """Validate and keep ``distributed_mesh`` (before ``Optimizer.__init__`` adds the groups)."""
        resolve_group(distributed_mesh)
        self._distributed_mesh = distributed_mesh

    def distribution(self) -> Distribution:
        """Matrix ownership across ranks (updated when parameters are added; owners never move)."""
        distribution = self.__dict__.get("_distribution")
        if distribution is None:
            distribution = self.__dict__["_distribution"] = Distribution(self.__dict__.get("_distributed_mesh"))
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(id(p) for p in params)
        if self.__dict__.get("_distribution_key") != key:
            distribution.update(params)
            self.__dict__["_distribution_key"] = key
        return distribution

    def _check_step_gradients(self, split: list) -> None:
        """Every gradient of this step (also the missing ones, which all ranks must agree on)."""
        items = []
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                items.append((idx, p, p.grad))
                idx += 1
        check_gradients(items, group=self.distribution().group, lost_state=self._lost_state(items))

    def _lost_state(self, items: list[tuple[int, Tensor, Tensor | None]]) -> list[bool] | None:
        """Per item: state this rank needs for the step is missing (see check_gradients)."""
        return None

    @staticmethod
    def _orthogonalize(group: dict, X: Tensor) -> Tensor:
        """The orthogonalised ``(B, m, n)`` batch (Newton–Schulz, or the SVD polar factor when the group
        asks for it); an empty batch (a rank that owns none of these matrices) stays empty."""
        if X.shape[0] == 0:
            return X.clone()
        if group.get("orthogonalizer") == "svd":
            return lk.orthogonalize_svd(X)
        return lk.newton_schulz(X, steps=group["ns_steps"], coefficients=group["ns_coefficients"],
                                eps=group["eps"], compute_dtype=group["ns_compute_dtype"])

    def _check_group(self, group: dict) -> None:
        check_choice("algorithm", group.get("algorithm"), (None, ADAMW, self._matrix_algorithm))
        check_number("lr", group["lr"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        check_adamw_group(group)

    def _is_matrix(self, group: dict, p: Tensor) -> bool:
        return group["algorithm"] != ADAMW and p.ndim >= 2

    def _split(self) -> list[tuple[dict, list[tuple[int, Tensor]], list[tuple[int, Tensor]]]]:
        """Per group: (group, [(index, matrix param with grad)], [(index, AdamW param with grad)])."""
        out = []
        idx = 0
        for group in self.param_groups:
            mats, others = [], []
            for p in group["params"]:
                if p.grad is not None:
                    (mats if self._is_matrix(group, p) else others).append((idx, p))
                idx += 1
            out.append((group, mats, others))
        return out

    @staticmethod
    def _adamw_step(group: dict, params: list[Tensor], state: dict) -> None:
        """torch.optim.AdamW's update (decoupled weight decay, bias correction), for ``params``."""
        if not params:
            return
        lr = float(group["lr"])
        # lr = 0 freezes the whole group, AdamW part included (torch.distributed.checkpoint initialises
        # optimizer state by a step with lr = 0 and zero gradients: weight decay must not move anything).
        if group["adamw_lr"] is not None and lr != 0.0:
            # A scheduler changes group["lr"] only (it records the starting value as initial_lr):
            # apply its factor to adamw_lr too, so AdamW-routed parameters follow the schedule.
            factor = lr / float(group["initial_lr"]) if group.get("initial_lr") else 1.0
            lr = float(group["adamw_lr"]) * factor
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
            _adamw_update(device, dtype, *map(list, zip(*tensors)), steps, lr, beta1, beta2, wd, eps)
            for p, step in zip(ps, steps):
                if isinstance(state[p]["step"], Tensor):
                    state[p]["step"].fill_(step)
                else:  # a plain number (checkpoints of torch < 1.12)
                    state[p]["step"] = torch.tensor(step)

    # -- per-bucket stacked state -----------------------------------------------------------------
    # The state of the matrices of one bucket lives in one (B, ...) tensor; each parameter's state
    # entry is a view of its slice, so torch's state_dict format is unchanged while a step updates
    # the whole bucket in one kernel launch. After load_state_dict (or when the set of parameters
    # with gradients changes) the entries are separate tensors again and get re-stacked once.

    def stacked_state(self, params: list[Tensor], name: str, slice_shape: tuple[int, ...] | None = None) -> Tensor:
        """The (B, ...) tensor whose slice ``i`` is ``state[params[i]][name]`` (stacking once if needed)."""
        stacks = self.__dict__.setdefault("_stacks", {})
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
        self.drop_state(params, name)  # an older grouping of these parameters: drop it, or it stays alive
        stacks = self.__dict__["_stacks"]
        for p, part in zip(params, stacked.unbind(0)):
            self.state[p][name] = wrap_like(p, part.view(local(p).shape)) if name in PARAM_SHAPED_STATE else part
        stacks[(name, tuple(id(p) for p in params))] = stacked
        return stacked

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict. Under FSDP2, a ``DTensor`` state entry that is a slice of a
        bucket's stacked tensor is returned as a copy (see ``_is_inner_slice``): transient memory of at
        most this rank's share of the matrix state."""
        state_dict = super().state_dict()
        if self.distribution().sharded_group is None:
            return state_dict
        state = {}
        for pid, st in state_dict["state"].items():
            state[pid] = {k: wrap_like(v, local(v).clone()) if _is_inner_slice(v) else v for k, v in st.items()}
        return {**state_dict, "state": state}

    def adapt_layouts(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with its parameter-shaped state laid out like this optimizer's parameters
        (see ``adapt_to_param``): a single-process state dict loads under FSDP2; a mismatch is refused
        before anything is changed."""
        saved_ids = [pid for g in state_dict.get("param_groups", []) for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params) or "state" not in state_dict:
            return dict(state_dict)  # torch's load_state_dict explains what does not match
        state = dict(state_dict["state"])
        for index, (pid, p) in enumerate(zip(saved_ids, params)):
            if not isinstance(state.get(pid), dict):
                continue
            st = dict(state[pid])
            for key in PARAM_SHAPED_STATE:
                if isinstance(st.get(key), Tensor):
                    st[key] = adapt_to_param(index, key, p, st[key])
            state[pid] = st
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = self.adapt_layouts(state_dict)
        self.__dict__["_stacks"] = {}  # the old stacked tensors must not outlive the old state
        super().load_state_dict(state_dict)
        for st in self.state.values():
            # Step counters stay on the CPU (a checkpoint loaded with map_location="cuda" moves
            # them): they are read as Python numbers every step, which would sync with the GPU.
            if isinstance(st.get("step"), Tensor) and st["step"].device.type != "cpu":
                st["step"] = st["step"].cpu()

    def check_backends(self) -> None:
        """Resolve the kernel backend for every device the parameters live on, before any update,
        so a misconfigured backend fails the step with nothing changed."""
        from limuon_kernels.backend import resolve

        for device in {p.device for group in self.param_groups for p in group["params"]}:
            resolve(device)

    def drop_state(self, params: list[Tensor], name: str) -> None:
        """Remove state ``name`` of ``params``, and the stacked tensor behind it."""
        stacks = self.__dict__.setdefault("_stacks", {})
        ids = {id(p) for p in params}
        for key in [k for k in stacks if k[0] == name and ids.intersection(k[1])]:
            del stacks[key]
        for p in params:
            self.state[p].pop(name, None)

    def _check_all_groups(self) -> None:
        # Hyperparameters may have been changed since __init__ (schedulers, user code): re-check
        # before anything is modified, so a bad value fails loudly with nothing changed.
        for group in self.param_groups:
            self._check_group(group)
        self.check_backends()
