"""The Muon/AdamW split of a model's parameters, by one documented rule, for ``LiMuon`` and ``Muon``.

Orthogonalised updates suit the hidden matrices of a network; embeddings, the output projection,
gains and biases train better with AdamW (Keller Jordan's Muon post; Moonlight). ``param_groups``
applies that routing so users need not write it by hand::

    opt = limuon.LiMuon(limuon.param_groups(model), lr=0.02, adamw_lr=3e-4, variance_reduction="approx")

The rule, for each parameter of ``model.named_parameters()`` (a tied tensor counts once, under its first
name), first match wins:

1. Overrides (name patterns, below): ``adamw`` or ``output`` → AdamW; ``batch`` → matrix update with
   ``matrix_view="batch"``; ``flatten`` → matrix update viewed as one ``(shape[0], rest)`` matrix;
   ``matrix`` → matrix update, viewed by rules 6–8. A parameter matched by an AdamW override and by a
   matrix override is an error.
2. The weight of an ``nn.Embedding`` / ``nn.EmbeddingBag`` → AdamW (also when it is tied to a ``Linear``).
3. Output layers → AdamW. Unless ``output`` names them, they are detected:
   a. a vocabulary projection: an ``nn.Linear`` whose weight is an embedding's weight (tied), or the *only*
      ``nn.Linear`` whose ``out_features`` equals an embedding's ``num_embeddings``. Several such Linears
      for one embedding are not taken (a position embedding of ``block_size == n_embd`` rows matches every
      ``c_proj``); if some embedding has several candidates and nothing was detected, param_groups raises
      and asks for ``output``. Only ``nn.Linear`` (and subclasses) count: HF GPT-2's ``Conv1D`` layers are
      hidden layers (a ``Conv1D`` weight is stored ``(in, out)``: the lr scale ``s(m, n)`` sees it transposed);
   b. what the model declares: ``get_output_embeddings()`` (Hugging Face), ``get_classifier()`` (timm), and
      the top-level modules ``classifier`` and ``score`` (Hugging Face ``*ForImageClassification``,
      ``*ForSequenceClassification``), ``head`` (timm, most ViTs), ``fc`` (torchvision's ResNets) and
      ``lm_head``. A head that is a container gives its last ``nn.Linear`` (the others are hidden layers).
4. ``ndim < 2`` (biases, norm gains) → AdamW.
5. A matrix view ``(shape[0], numel / shape[0])`` with a side < 2 → AdamW: orthogonalising one row or
   column only normalises it (a ViT class token ``(1, 1, d)`` or position embedding ``(1, N, d)``).
6. A convolution weight (of an ``nn.Conv1d/2d/3d`` or transposed convolution) → the matrix update, viewed
   as ``(out, in·kh·kw)``.
7. Any other parameter with ``ndim >= 3`` → the matrix update with ``matrix_view="batch"``: its leading
   dims index independent matrices (mixture-of-experts weights ``(E, m, n)``, as transformers stores
   Mixtral's, Qwen-MoE's and DeepSeek's experts), each orthogonalised on its own. ``flatten`` names
   the exceptions.
8. Everything else (2-D) → the matrix update.

Overrides are ``fnmatch`` patterns (``*`` also crosses dots), a string or an iterable of strings; a
pattern matches a parameter when it matches one of its names (all aliases of a tied tensor) or the name
of a module that directly holds it (``"lm_head"`` matches ``lm_head.weight`` and ``lm_head.bias``).
Every pattern must match some parameter (an ``output`` pattern that matches nothing is answered with the
model's candidate module names). Frozen parameters (``requires_grad=False``) are routed by the same rule
but left out of the groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor, nn

from limuon._model_parts import conv_weights, output_candidates, special_weights

#: group keys that param_groups sets itself (an options dict may not set them)
RESERVED_KEYS = ("params", "param_names", "algorithm", "matrix_view")
_ADAMW_OVERRIDES = ("adamw", "output")
_MATRIX_OVERRIDES = ("batch", "flatten", "matrix")


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
    flatten: str | Iterable[str] = (),
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
        output: name patterns of the output layer(s) (AdamW); ``None`` detects them (rule 3), ``()``
            declares that there is none.
        batch: name patterns of parameters with ndim ≥ 3 whose leading dims index independent matrices
            (MoE experts ``(E, m, n)``): matrix update with ``matrix_view="batch"`` (the default for
            ndim ≥ 3 parameters that are not convolution weights, rule 7).
        flatten: name patterns of parameters with ndim ≥ 3 to orthogonalise as one ``(shape[0], rest)``
            matrix, as convolution weights are.
        matrix_options, adamw_options: extra options (``lr``, ``weight_decay``, ``adamw_lr``, ...) merged
            into the matrix groups and into the AdamW group; they may not set ``RESERVED_KEYS``.
        with_names: also give each group torch's ``"param_names"`` list (saved in the optimizer's
            state_dict; torch then requires names in every group added later).

    Returns:
        Up to three groups, empty ones left out, in this order: the matrix update
        (``{"params", "matrix_view": "flatten", **matrix_options}``), the batched matrix update
        (``"matrix_view": "batch"``), AdamW (``"algorithm": "adamw"``, ``**adamw_options``); parameters in
        ``named_parameters()`` order.

    Raises:
        ValueError: a pattern that matches no parameter, contradictory overrides, ``matrix`` on a
            parameter with ndim < 2, ``batch`` on one with ndim < 3, an ambiguous output projection,
            an options dict setting a reserved key.
    """
    routes = _routes(model, adamw, matrix, output, batch, flatten)
    matrix_extra = _options("matrix_options", matrix_options)
    kinds = (
        ("matrix", {"matrix_view": "flatten", **matrix_extra}),
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
    flatten: str | Iterable[str] = (),
) -> dict[str, str]:
    """``{parameter name: "<group>: <reason>"}`` for every parameter of ``model``, as ``param_groups``
    routes it with the same overrides; ``<group>`` is ``matrix``, ``batch``, ``adamw`` or ``frozen``
    (``requires_grad=False``: in no group). For example ``"adamw: ndim 1 < 2"``,
    ``"matrix: 128x32"``, ``"adamw: embedding weight of transformer.wte, tied to Linear lm_head"``."""
    out = {}
    for r in _routes(model, adamw, matrix, output, batch, flatten):
        trainable = r.param.requires_grad
        out[r.name] = f"{r.group}: {r.reason}" if trainable else f"frozen: requires_grad=False ({r.group}: {r.reason})"
    return out


# -- the rule ---------------------------------------------------------------------------------------


def _routes(model: nn.Module, adamw: Any, matrix: Any, output: Any, batch: Any, flatten: Any) -> list[_Route]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    overrides = {
        "adamw": _patterns("adamw", adamw),
        "output": () if output is None else _patterns("output", output),
        "batch": _patterns("batch", batch),
        "flatten": _patterns("flatten", flatten),
        "matrix": _patterns("matrix", matrix),
    }
    special = special_weights(model, detect_output=output is None)
    convs = conv_weights(model)
    used: set[tuple[str, str]] = set()
    routes = []
    for name, p, keys in _named_params(model):
        hits = {opt: [pat for pat in pats if any(fnmatchcase(k, pat) for k in keys)] for opt, pats in overrides.items()}
        used.update((opt, pat) for opt, pats in hits.items() for pat in pats)
        routes.append(_decide(name, p, {opt: pats[0] for opt, pats in hits.items() if pats}, special, convs))
    for opt, pats in overrides.items():
        for pat in pats:
            if (opt, pat) not in used:
                hint = ""
                if opt == "output":
                    hint = f"; candidate output modules: {', '.join(output_candidates(model)) or 'none'}"
                raise ValueError(f"Invalid {opt}: the pattern {pat!r} matches no parameter or module name of the "
                                 f"model{hint}")
    return routes


def _decide(name: str, p: Tensor, hit: dict[str, str], special: dict[int, str], convs: set[int]) -> _Route:
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
    for opt in ("batch", "flatten"):
        if opt in hit and p.ndim < 3:
            raise ValueError(
                f"Invalid {opt}: the pattern {hit[opt]!r} matches parameter {name!r} of shape {shape}; "
                f"matrix_view={opt!r} is for ndim >= 3 (a 2-D parameter is one matrix in every view)"
            )
    if "batch" in hit:
        return _Route(name, p, "batch", f"batch={hit['batch']!r}, {_batch_text(shape)}")
    if "flatten" in hit:
        return _Route(name, p, "matrix", f"flatten={hit['flatten']!r}, {_view_text(shape)}")
    if "matrix" in hit:
        if p.ndim < 2:
            raise ValueError(
                f"Invalid matrix: the pattern {hit['matrix']!r} matches parameter {name!r} of shape {shape}; "
                "only a parameter with ndim >= 2 can be orthogonalised"
            )
        if p.ndim >= 3 and id(p) not in convs:
            return _Route(name, p, "batch", f"matrix={hit['matrix']!r}, {_batch_text(shape)}")
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
    if p.ndim >= 3 and id(p) not in convs:
        return _Route(name, p, "batch", f"{_batch_text(shape)} (ndim {p.ndim}, not a convolution weight)")
    return _Route(name, p, "matrix", _view_text(shape) + (" (convolution weight)" if id(p) in convs else ""))


def _matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(shape[0], rest)`` matrix an N-D parameter is orthogonalised as (``matrix_view="flatten"``)."""
    return shape[0], math.prod(shape[1:])


def _view_text(shape: tuple[int, ...]) -> str:
    m, n = _matrix_view(shape)
    return f"{m}x{n}" if len(shape) == 2 else f"{m}x{n} view of shape {shape}"


def _batch_text(shape: tuple[int, ...]) -> str:
    return f"{math.prod(shape[:-2])} matrices {shape[-2]}x{shape[-1]}"


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
