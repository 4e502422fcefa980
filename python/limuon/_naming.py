"""How errors and warnings name a parameter: by its name whenever the optimizer knows one (torch's
``param_names``, filled from ``named_parameters()``, ``param_groups(model, with_names=True)`` or a model
passed to the optimizer), else by its group and position. The same tensor gets the same label on every
code path and every rank."""

from __future__ import annotations

from torch import Tensor


def describe_param(param_groups: list[dict], p: Tensor) -> str:
    """``parameter 'h2.weight' (shape (16, 16))``, or ``parameter 3 of group 0 (shape (16, 16))`` when the
    group has no names. Walks the groups (for error paths: never called by a step that succeeds)."""
    shape = tuple(p.shape)
    for gi, group in enumerate(param_groups):
        for j, q in enumerate(group["params"]):
            if q is p:
                names = group.get("param_names")
                if names and j < len(names):
                    return f"parameter {names[j]!r} (shape {shape})"
                return f"parameter {j} of group {gi} (shape {shape})"
    return f"a parameter of shape {shape} (not in the optimizer)"


def positional_label(index: int, p: Tensor) -> str:
    """The label where no optimizer is at hand: the parameter's index in a flat list and its shape."""
    return f"parameter {index} (shape {tuple(p.shape)})"
