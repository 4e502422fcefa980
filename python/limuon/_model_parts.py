"""What ``param_groups`` recognises in a model: embeddings, output projections and classifier heads, and
convolution weights. By module type and the conventions of the libraries users train with (Hugging Face
transformers, timm, torchvision), never from parameter values."""

from __future__ import annotations

from torch import Tensor, nn

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
CONVOLUTIONS = (nn.modules.conv._ConvNd,)
#: top-level attributes that hold a model's output layer: Hugging Face's ``*ForImageClassification`` /
#: ``*ForSequenceClassification`` (``classifier``, ``score``), timm and many ViTs (``head``), torchvision's
#: ResNets (``fc``), causal LMs (``lm_head``)
HEAD_ATTRIBUTES = ("classifier", "score", "head", "fc", "lm_head")


def special_weights(model: nn.Module, detect_output: bool) -> dict[int, str]:
    """``{id(weight): reason}`` for embedding weights and (when ``detect_output``) detected output
    projections and classifier heads. By tensor identity, so a tied weight is recognised under any name."""
    modules = list(model.named_modules())  # each module once, under its first name
    embeddings = [(n, m) for n, m in modules if isinstance(m, EMBEDDINGS)]
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    reasons = {}
    for emb_name, emb in embeddings:
        tied = [lin_name for lin_name, lin in linears if lin.weight is emb.weight]
        tie = f", tied to Linear {', '.join(tied)}" if tied else ""
        reasons.setdefault(id(emb.weight), f"embedding weight of {emb_name}{tie}")
    if detect_output:
        declared = _declared_heads(model, modules)
        # (a head the model names by method settles an ambiguous vocabulary rule; a top-level name does not)
        by_method = any("the model's" in reason for reason in declared.values())
        for key, reason in _vocab_outputs(embeddings, linears, set(declared), must_decide=not by_method).items():
            reasons.setdefault(key, reason)
        for key, reason in declared.items():
            reasons.setdefault(key, reason)
    return reasons


def conv_weights(model: nn.Module) -> set[int]:
    """``id`` of every convolution weight (``nn.Conv1d/2d/3d`` and their transposed forms)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, CONVOLUTIONS) and isinstance(m.weight, Tensor)}


def output_candidates(model: nn.Module, limit: int = 8) -> list[str]:
    """Module names a user may mean by ``output=``: the top-level children that hold parameters, then the
    last Linear layers (where an output projection usually is), without repeats."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    names += [n for n, m in list(model.named_modules()) if isinstance(m, nn.Linear)][-3:]
    return list(dict.fromkeys(names))[:limit]


def _declared_heads(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> dict[int, str]:
    """Output layers the model declares: ``get_output_embeddings()`` (Hugging Face), ``get_classifier()``
    (timm), and the top-level ``HEAD_ATTRIBUTES``. A head that is a container (torchvision's VGG
    ``classifier``, a ``ClassificationHead``) gives its last Linear: the earlier ones are hidden layers."""
    name_of = {id(m): n for n, m in modules}
    found: dict[int, str] = {}

    def add(module: object, how: str) -> None:
        if not isinstance(module, nn.Module):
            return
        layer = module if isinstance(module, nn.Linear) else _last_linear(module)
        if layer is None or id(layer.weight) in found:
            return
        found[id(layer.weight)] = f"output layer {name_of.get(id(layer), '?')} ({how})"

    for method, how in (("get_output_embeddings", "the model's get_output_embeddings()"),
                        ("get_classifier", "the model's get_classifier()")):
        getter = getattr(model, method, None)
        if callable(getter):
            try:
                heads = getter()
            except (NotImplementedError, AttributeError, TypeError):  # (declared but not implemented)
                continue
            for head in heads if isinstance(heads, (tuple, list)) else (heads,):
                add(head, how)
    for attribute in HEAD_ATTRIBUTES:
        add(model._modules.get(attribute), f"top-level {attribute!r} head")
    return found


def _last_linear(module: nn.Module) -> nn.Linear | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _vocab_outputs(embeddings: list[tuple[str, nn.Module]], linears: list[tuple[str, nn.Linear]],
                   declared: set[int], must_decide: bool = True) -> dict[int, str]:
    """Untied output projections: per embedding, the only Linear with ``out_features == num_embeddings``.
    Several: a declared head (``declared``: weight ids) among them is the output when no other candidate is
    a top-level module (hidden layers as wide as the vocabulary live in blocks; other top-level ones would
    be heads too, e.g. multi-token prediction). ``must_decide``: raise when the rule stays ambiguous and the
    model did not name its output by method."""
    emb_ids = {id(emb.weight) for _, emb in embeddings}
    found, ambiguous = {}, []
    for emb_name, emb in embeddings:
        rows = emb.num_embeddings
        candidates = [(n, lin) for n, lin in linears if lin.out_features == rows and id(lin.weight) not in emb_ids]
        heads = [(n, lin) for n, lin in candidates if id(lin.weight) in declared]
        others_at_top = [n for n, lin in candidates if id(lin.weight) not in declared and "." not in n]
        if len(candidates) == 1:
            lin_name, lin = candidates[0]
            found[id(lin.weight)] = f"output projection {lin_name} (out_features == num_embeddings of {emb_name})"
        elif len(heads) == 1 and not others_at_top:
            found[id(heads[0][1].weight)] = (f"output layer {heads[0][0]} (the declared head among the Linears with "
                                             f"out_features == num_embeddings of {emb_name})")
        elif candidates:
            shown = ", ".join(n for n, _ in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
            ambiguous.append(f"{len(candidates)} Linear layers ({shown}) have out_features == num_embeddings "
                             f"== {rows} of {emb_name}")
    tied = any(id(lin.weight) in emb_ids for _, lin in linears)
    if ambiguous and not found and not tied and must_decide:
        raise ValueError(
            "param_groups cannot tell which Linear is the output projection: " + "; ".join(ambiguous)
            + ". Name it with output='<parameter or module name pattern>', or pass output=() if there is none"
        )
    return found
