"""Warnings for parameters that a list (rather than a model) sends to the wrong update without a word.

Given a model, ``param_groups`` routes by module type (``_model_parts``). Given ``named_parameters()`` the
optimizer has names only: an embedding or an output layer is recognised by the names that Hugging Face,
timm, torchvision and nanoGPT give them, and warned about (not re-routed: the user listed them, and a
name is a hint, not a fact). Given bare tensors nothing can be known; the README says so.
"""

from __future__ import annotations

from torch import Tensor

#: module names of embeddings that do not contain "embed" (nanoGPT / HF GPT-2)
_EMBEDDING_NAMES = ("wte", "wpe")
#: top-level module names of output layers (see ``_model_parts.HEAD_ATTRIBUTES``)
_HEAD_NAMES = ("lm_head", "head", "classifier", "score", "fc")
#: a convolution weight is ``(out, in, *kernel)``; kernels (and ViT patch sizes) are at most this wide, the
#: matrices of a mixture-of-experts weight ``(E, m, n)`` much wider
_MAX_KERNEL = 32


def looks_like_embedding_or_head(name: str) -> str | None:
    """"an embedding" / "an output layer" when ``name`` (a parameter's name) is conventionally one, else None."""
    segments = name.split(".")[:-1]  # the module path
    if any(("embed" in s and "patch" not in s) or s in _EMBEDDING_NAMES for s in segments):
        return "an embedding"
    if segments and (segments[0] in _HEAD_NAMES or segments[-1] == "lm_head"):
        return "an output layer"
    return None


def looks_like_stacked_matrices(p: Tensor) -> bool:
    """ndim ≥ 3 with trailing dims wider than any convolution kernel: independent matrices (experts)
    that ``matrix_view="flatten"`` would orthogonalise as one."""
    return p.ndim >= 3 and any(d > _MAX_KERNEL for d in p.shape[2:])


def misrouted_by_name(group: dict) -> list[str]:
    """Names in a default-routed group (``algorithm`` not given) of matrices that look like embeddings or
    output layers, as ``"'name' (an embedding)"``."""
    names = group.get("param_names")
    if group.get("algorithm") is not None or not names:
        return []
    found = []
    for name, p in zip(names, group["params"]):
        kind = looks_like_embedding_or_head(name)
        if kind is not None and p.ndim >= 2:
            found.append(f"{name!r} ({kind})")
    return found


def misrouted_warning(optimizer: str, found: list[str]) -> str:
    return (
        f"{optimizer}: {', '.join(found)} get the matrix update (orthogonalisation) by default; embeddings and "
        "output layers train better with AdamW. Pass the model itself (limuon.LiMuon(model, ...) routes by module "
        "type, see limuon.param_groups), or put them in a group with algorithm='adamw'; a group that sets "
        "algorithm= itself is taken as meant"
    )


def flattened_warning(optimizer: str, labels: list[str]) -> str:
    return (
        f"{optimizer}: {', '.join(labels)} is orthogonalised as one (shape[0], rest) matrix (matrix_view='flatten', "
        "the default for a list of parameters). If its leading dims index independent matrices (mixture-of-experts "
        "weights), give its group matrix_view='batch' or pass the model (limuon.param_groups batches such "
        "parameters); set matrix_view='flatten' explicitly to keep this and silence the warning"
    )
