"""The Muon/AdamW split of a model's parameters, by one documented rule, for ``LiMuon`` and ``Muon``.

Orthogonalised updates suit the hidden matrices of a network; embeddings, the output projection,
gains and biases train better with AdamW (Keller Jordan's Muon post; Moonlight). ``param_groups``
applies that routing so users need not write it by hand::

    opt = limuon.LiMuon(limuon.param_groups(model), lr=0.02, adamw_lr=3e-4, variance_reduction="approx")

The rule, for each parameter of ``model.named_parameters()`` (a tied tensor counts once, under its first
name), first match wins:

1. Overrides (name patterns, below): ``adamw`` or ``output`` → AdamW; ``batch`` → matrix update with
   ``matrix_view="batch"``; ``matrix`` → matrix update. A parameter matched by an AdamW override and by a
   matrix override is an error.
2. The weight of an ``nn.Embedding`` / ``nn.EmbeddingBag`` → AdamW (also when it is tied to a ``Linear``).
3. The output projection → AdamW. Unless ``output`` names it, it is detected: an ``nn.Linear`` whose
   weight is an embedding's weight (tied), or the *only* ``nn.Linear`` whose ``out_features`` equals an
   embedding's ``num_embeddings``. Several such Linears for one embedding are not taken (a position
   embedding of ``block_size == n_embd`` rows matches every ``c_proj``); if some embedding has such
   several candidates and nothing was detected, param_groups raises and asks for ``output``. Only
   ``nn.Linear`` (and subclasses) count: HF GPT-2's ``Conv1D`` layers are hidden layers; its head is a Linear.
   (A ``Conv1D`` weight is stored ``(in, out)``: it is a matrix like any other, but the lr scale
   ``s(m, n)`` sees it transposed.)
4. ``ndim < 2`` (biases, norm gains) → AdamW.
5. A matrix view ``(shape[0], numel / shape[0])`` with a side < 2 → AdamW: orthogonalising one row or
   column only normalises it (a ViT class token ``(1, 1, d)`` or position embedding ``(1, N, d)``).
6. Everything else → the matrix update, viewed as ``(shape[0], rest)`` (conv weights ``(out, in·kh·kw)``,
   a 3-D expert weight ``(E, m, n)`` as ``E × m·n`` unless ``batch`` names it).

Overrides are ``fnmatch`` patterns (``*`` also crosses dots), a string or an iterable of strings; a
pattern matches a parameter when it matches one of its names (all aliases of a tied tensor) or the name
of a module that directly holds it (``"lm_head"`` matches ``lm_head.weight`` and ``lm_head.bias``).
Every pattern must match some parameter. Frozen parameters (``requires_grad=False``) are routed by the
same rule but left out of the groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor, nn

#: group keys that param_groups sets itself (an options dict may not set them)
RESERVED_KEYS = ("params", "param_names", "algorithm", "matrix_view")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_ADAMW_OVERRIDES = ("adamw", "output")
_MATRIX_OVERRIDES = ("batch", "matrix")


@dataclass(frozen=True)
class _Route:
    name: str
    param: Tensor
    group: str  # "matrix", "batch" or "adamw"
    reason: str


def param_groups(
    model: nn.Module,
    *,
    adamw: str | Iterable[str] = (),
    matrix: str | Iterable[str] = (),
    output: str | Iterable[str] | None = None,
    batch: str | Iterable[str] = (),
    matrix_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
    with_names: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for ``limuon.LiMuon`` / ``limuon.Muon`` that route ``model``'s trainable parameters
    by the rule of this module's docstring.

    Args:
        model: the module whose ``named_parameters()`` are split.
        adamw: name patterns forced to AdamW.
        matrix: name patterns forced to the matrix update (ndim ≥ 2), e.g. an embedding trained with Muon.
        output: name patterns of the output projection(s) (AdamW); ``None`` detects them (rule 3),
            ``()`` declares that there is none.
        batch: name patterns of parameters with ndim ≥ 3 whose leading dims index independent matrices
            (MoE experts ``(E, m, n)``): matrix update with ``matrix_view="batch"``.
        matrix_options, adamw_options: extra options (``lr``, ``weight_decay``, ``adamw_lr``, ...) merged
            into the matrix groups and into the AdamW group; they may not set ``RESERVED_KEYS``.
        with_names: also give each group torch's ``"param_names"`` list (saved in the optimizer's
            state_dict; torch then requires names in every group added later).

    Returns:
        Up to three groups, empty ones left out, in this order: the matrix update
        (``{"params", **matrix_options}``), the batched matrix update (``"matrix_view": "batch"``), AdamW
        (``"algorithm": "adamw"``, ``**adamw_options``); parameters in ``named_parameters()`` order.

    Raises:
        ValueError: a pattern that matches no parameter, contradictory overrides, ``matrix`` on a
            parameter with ndim < 2, ``batch`` on one with ndim < 3, an ambiguous output projection,
            an options dict setting a reserved key.
    """
    routes = _routes(model, adamw, matrix, output, batch)
    matrix_extra = _options("matrix_options", matrix_options)
    kinds = (
        ("matrix", matrix_extra),
        ("batch", {**matrix_extra, "matrix_view": "batch"}),
        ("adamw", {**_options("adamw_options", adamw_options), "algorithm": "adamw"}),
    )
    groups = []
    for kind, extra in kinds:
        chosen = [r for r in routes if r.group == kind and r.param.requires_grad]
        if not chosen:
            continue
        group: dict[str, Any] = {"params": [r.param for r in chosen], **extra}
        if with_names:
            group["param_names"] = [r.name for r in chosen]
        groups.append(group)
    return groups


def explain_param_groups(
    model: nn.Module,
    *,
    adamw: str | Iterable[str] = (),
    matrix: str | Iterable[str] = (),
    output: str | Iterable[str] | None = None,
    batch: str | Iterable[str] = (),
) -> dict[str, str]:
    """``{parameter name: "<group>: <reason>"}`` for every parameter of ``model``, as ``param_groups``
    routes it with the same overrides; ``<group>`` is ``matrix``, ``batch``, ``adamw`` or ``frozen``
    (``requires_grad=False``: in no group). For example ``"adamw: ndim 1 < 2"``,
    ``"matrix: 128x32"``, ``"adamw: embedding weight of transformer.wte, tied to Linear lm_head"``."""
    out = {}
    for r in _routes(model, adamw, matrix, output, batch):
        trainable = r.param.requires_grad
        out[r.name] = f"{r.group}: {r.reason}" if trainable else f"frozen: requires_grad=False ({r.group}: {r.reason})"
    return out


# -- the rule ---------------------------------------------------------------------------------------


def _routes(model: nn.Module, adamw: Any, matrix: Any, output: Any, batch: Any) -> list[_Route]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    overrides = {
        "adamw": _patterns("adamw", adamw),
        "output": () if output is None else _patterns("output", output),
        "batch": _patterns("batch", batch),
        "matrix": _patterns("matrix", matrix),
    }
    special = _special_weights(model, detect_output=output is None)
    used: set[tuple[str, str]] = set()
    routes = []
    for name, p, keys in _named_params(model):
        hits = {opt: [pat for pat in pats if any(fnmatchcase(k, pat) for k in keys)] for opt, pats in overrides.items()}
        used.update((opt, pat) for opt, pats in hits.items() for pat in pats)
        routes.append(_decide(name, p, {opt: pats[0] for opt, pats in hits.items() if pats}, special))
    for opt, pats in overrides.items():
        for pat in pats:
            if (opt, pat) not in used:
                raise ValueError(f"Invalid {opt}: the pattern {pat!r} matches no parameter or module name of the model")
    return routes


def _decide(name: str, p: Tensor, hit: dict[str, str], special: dict[int, str]) -> _Route:
    """Route one parameter; ``hit``: override name → the first of its patterns that matches ``p``."""
    to_adamw = [opt for opt in _ADAMW_OVERRIDES if opt in hit]
    to_matrix = [opt for opt in _MATRIX_OVERRIDES if opt in hit]
    if to_adamw and to_matrix:
        a, m = to_adamw[0], to_matrix[0]
        raise ValueError(
            f"Contradictory overrides for parameter {name!r}: {a}={hit[a]!r} sends it to AdamW and "
            f"{m}={hit[m]!r} to the matrix update"
        )
    shape = tuple(p.shape)
    if "batch" in hit:
        if p.ndim < 3:
            raise ValueError(
                f"Invalid batch: the pattern {hit['batch']!r} matches parameter {name!r} of shape {shape}; "
                "matrix_view='batch' needs ndim >= 3 (leading dims index independent matrices)"
            )
        count = math.prod(shape[:-2])
        return _Route(name, p, "batch", f"batch={hit['batch']!r}, {count} matrices {shape[-2]}x{shape[-1]}")
    if "matrix" in hit:
        if p.ndim < 2:
            raise ValueError(
                f"Invalid matrix: the pattern {hit['matrix']!r} matches parameter {name!r} of shape {shape}; "
                "only a parameter with ndim >= 2 can be orthogonalised"
            )
        return _Route(name, p, "matrix", f"matrix={hit['matrix']!r}, {_view_text(shape)}")
    if to_adamw:
        opt = to_adamw[0]
        why = "output projection, " if opt == "output" else ""
        return _Route(name, p, "adamw", f"{why}{opt}={hit[opt]!r}")
    if id(p) in special:
        return _Route(name, p, "adamw", special[id(p)])
    if p.ndim < 2:
        return _Route(name, p, "adamw", f"ndim {p.ndim} < 2")
    m, n = _matrix_view(shape)
    if min(m, n) < 2:
        return _Route(name, p, "adamw", f"its matrix view {m}x{n} of shape {shape} has a side < 2")
    return _Route(name, p, "matrix", _view_text(shape))


def _matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(shape[0], rest)`` matrix an N-D parameter is orthogonalised as (``matrix_view="flatten"``)."""
    return shape[0], math.prod(shape[1:])


def _view_text(shape: tuple[int, ...]) -> str:
    m, n = _matrix_view(shape)
    return f"{m}x{n}" if len(shape) == 2 else f"{m}x{n} view of shape {shape}"


def _special_weights(model: nn.Module, detect_output: bool) -> dict[int, str]:
    """``{id(weight): reason}`` for embedding weights and (when ``detect_output``) detected output
    projections (rules 2 and 3). By tensor identity, so a tied weight is recognised under any name."""
    modules = list(model.named_modules())  # each module once, under its first name
    embeddings = [(n, m) for n, m in modules if isinstance(m, _EMBEDDINGS)]
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    reasons = {}
    for emb_name, emb in embeddings:
        tied = [lin_name for lin_name, lin in linears if lin.weight is emb.weight]
        tie = f", tied to Linear {', '.join(tied)}" if tied else ""
        reasons.setdefault(id(emb.weight), f"embedding weight of {emb_name}{tie}")
    if detect_output:
        for key, reason in _detect_outputs(embeddings, linears).items():
            reasons.setdefault(key, reason)
    return reasons


def _detect_outputs(embeddings: list[tuple[str, nn.Module]], linears: list[tuple[str, nn.Linear]]) -> dict[int, str]:
    """Untied output projections: per embedding, the only Linear with ``out_features == num_embeddings``."""
    emb_ids = {id(emb.weight) for _, emb in embeddings}
    found, ambiguous = {}, []
    for emb_name, emb in embeddings:
        rows = emb.num_embeddings
        candidates = [(n, lin) for n, lin in linears if lin.out_features == rows and id(lin.weight) not in emb_ids]
        if len(candidates) == 1:
            lin_name, lin = candidates[0]
            found[id(lin.weight)] = f"output projection {lin_name} (out_features == num_embeddings of {emb_name})"
        elif candidates:
            shown = ", ".join(n for n, _ in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
            ambiguous.append(f"{len(candidates)} Linear layers ({shown}) have out_features == num_embeddings "
                             f"== {rows} of {emb_name}")
    tied = any(id(lin.weight) in emb_ids for _, lin in linears)
    if ambiguous and not found and not tied:
        raise ValueError(
            "param_groups cannot tell which Linear is the output projection: " + "; ".join(ambiguous)
            + ". Name it with output='<parameter or module name pattern>', or pass output=() if there is none"
        )
    return found


# -- inputs -----------------------------------------------------------------------------------------


def _named_params(model: nn.Module) -> list[tuple[str, Tensor, tuple[str, ...]]]:
    """``(first name, parameter, names a pattern may match)`` per distinct parameter, in
    ``named_parameters()`` order; the names are every alias of a tied tensor and the modules holding it."""
    first: dict[int, tuple[str, Tensor]] = {}
    keys: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), (name, p))
        module = name.rpartition(".")[0]
        keys.setdefault(id(p), []).extend([name, module] if module else [name])
    return [(name, p, tuple(keys[id(p)])) for name, p in first.values()]


def _patterns(option: str, value: Any) -> tuple[str, ...]:
    """A string is one pattern (not an iterable of one-letter patterns)."""
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"Invalid {option}: {value!r}; expected a name pattern or an iterable of them") from None
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise TypeError(f"Invalid {option}: {pat!r} is not a non-empty name pattern (str)")
    return patterns


def _options(option: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"Invalid {option}: {value!r}; expected a dict of param-group options or None")
    for key in value:
        if key in RESERVED_KEYS:
            raise ValueError(f"Invalid {option}: the key {key!r} is set by param_groups itself")
    return dict(value)
