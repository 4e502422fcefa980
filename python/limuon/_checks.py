"""Hyperparameter checks, the 2-D view of a parameter and torch.optim.Muon's learning-rate scale."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from limuon_kernels import NS_METHODS
from limuon_kernels.ns_coefficients import resolve_coefficients

ADAMW = "adamw"
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
#: how an N-D parameter is seen as matrices (see ``matrix_shape``)
MATRIX_VIEWS = ("flatten", "batch")


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
    ns_dtype_name(group.get("ns_compute_dtype"))
    check_choice("ns_method", group.get("ns_method", "auto"), NS_METHODS)


#: Newton–Schulz compute dtypes, kept in param groups by name: torch.distributed.checkpoint flattens
#: param groups into plain values and refuses a ``torch.dtype``
NS_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ns_dtype_name(dtype: Any) -> str | None:
    """``ns_compute_dtype`` as stored in a group: ``None`` or the dtype's name (a ``torch.dtype`` or name given)."""
    if dtype is None:
        return None
    for name, value in NS_DTYPES.items():
        if dtype is value or dtype == name:
            return name
    raise ValueError(f"Invalid ns_compute_dtype: {dtype!r}; expected None or one of {tuple(NS_DTYPES.values())}")


def ns_dtype(group: dict) -> torch.dtype | None:
    """The group's Newton–Schulz compute dtype (``None``: the device default)."""
    name = ns_dtype_name(group.get("ns_compute_dtype"))
    return None if name is None else NS_DTYPES[name]


# -- shapes and learning-rate scaling -------------------------------------------------------------


def check_matrix_view(group: dict) -> None:
    """Validate the group's ``matrix_view`` (absent: ``"flatten"``, as in state dicts of older versions)."""
    check_choice("matrix_view", group.get("matrix_view", "flatten"), MATRIX_VIEWS)


def is_batched(p: Tensor, view: str) -> bool:
    """Whether ``p`` is a stack of independent matrices: ``matrix_view="batch"`` and ndim ≥ 3 (a 2-D
    parameter is one matrix in either view)."""
    return view == "batch" and p.ndim >= 3


def matrix_shape(p: Tensor, view: str = "flatten") -> tuple[int, int]:
    """The ``(m, n)`` of each matrix that parameter ``p`` is orthogonalised as (global, for a ``DTensor``).

    ``"flatten"``: ``p`` is one matrix ``(shape[0], numel / shape[0])``, e.g. ``(out, in·kh·kw)`` for a
    conv weight. ``"batch"``: ``p: (..., m, n)`` is ``prod(shape[:-2])`` matrices ``m×n``."""
    if is_batched(p, view):
        return p.shape[-2], p.shape[-1]
    return p.shape[0], p.numel() // p.shape[0]


def lr_scale(adjust_lr_fn: str | None, m: int, n: int) -> float:
    """``s(m, n)`` of torch.optim.Muon: the factor applied to lr for the orthogonalised update."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, m / n))
    return 0.2 * math.sqrt(max(m, n))
