"""Right by default on real models: the optimizers take the model itself and route it by
limuon.param_groups' rules, a list that sends embeddings, output layers or expert stacks to the wrong
update is warned about, errors name the parameter the same way however the optimizer was built, and a
tensor lr of several elements is refused by name."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from optim_helpers import make_batch, make_closure, make_model
from torch import nn

import limuon

OPTIMIZERS = {
    "LiMuon": lambda params, **kw: limuon.LiMuon(params, lr=0.02, adamw_lr=1e-3, **kw),
    "Muon": lambda params, **kw: limuon.Muon(params, lr=0.02, adamw_lr=1e-3, **kw),
}


class TinyLM(nn.Module):
    """Hugging Face's naming (model.embed_tokens, model.layers.i, lm_head), an untied head."""

    def __init__(self, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = torch.tanh(layer(h))
        return self.lm_head(self.model.norm(h))


def lm_step(model: TinyLM, seed: int = 0) -> None:
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()


# -- the model itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_model_is_routed_by_param_groups(name):
    """``LiMuon(model)`` is ``LiMuon(param_groups(model, with_names=True))``: the embedding and the untied
    head go to AdamW (with ``lr = adamw_lr``), every step equal bit for bit."""
    model = TinyLM()
    twin = copy.deepcopy(model)
    opt = OPTIMIZERS[name](model)
    twin_opt = OPTIMIZERS[name](limuon.param_groups(twin, with_names=True))
    groups = opt.param_groups
    assert [g.get("algorithm") for g in groups] == [None, "adamw"]
    assert groups[1]["param_names"] == ["model.embed_tokens.weight", "model.layers.0.bias", "model.layers.1.bias",
                                        "model.norm.weight", "model.norm.bias", "lm_head.weight"]
    assert groups[1]["lr"] == 1e-3 and groups[0]["lr"] == 0.02
    for seed in range(3):
        for m, o in ((model, opt), (twin, twin_opt)):
            lm_step(m, seed)
            o.step()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), n


def test_a_model_with_experts_is_batched():
    """A mixture-of-experts weight (E, m, n) of a model: one m×n orthogonalisation per expert, so each
    expert's update has the RMS of an orthogonal m×n matrix (not E times smaller, as one E × m·n matrix)."""
    model = nn.Module()
    model.experts = nn.Module()
    model.experts.w = nn.Parameter(torch.randn(4, 32, 64) * 0.02)
    opt = limuon.LiMuon(model, lr=1.0, weight_decay=0.0, ns_compute_dtype=torch.float32)
    assert opt.param_groups[0]["matrix_view"] == "batch"
    before = model.experts.w.detach().clone()
    model.experts.w.grad = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(0))
    opt.step()
    update = before - model.experts.w.detach()
    rms = update.pow(2).mean(dim=(1, 2)).sqrt()
    # orthogonal 32×64: every singular value ≈ 1 (Newton–Schulz: 0.68–1.13), RMS sqrt(32/(32·64)) = 0.125
    assert torch.all((rms > 0.08) & (rms < 0.15)), rms


# -- lists: what the names say, what the shapes say -----------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_named_parameters_warn_about_embeddings_and_heads(name):
    model = TinyLM()
    with pytest.warns(UserWarning, match=r"'model.embed_tokens.weight' \(an embedding\), 'lm_head.weight' \(an output "
                                         r"layer\) get the matrix update.*Pass the model itself") as record:
        OPTIMIZERS[name](model.named_parameters())
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OPTIMIZERS[name](model)  # routed by module type
        OPTIMIZERS[name](list(model.parameters()))  # no names: nothing to go by (the README says so)
        algorithm = "limuon" if name == "LiMuon" else "muon"
        matrices = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
        OPTIMIZERS[name]([{"params": matrices, "algorithm": algorithm}])  # declared
        OPTIMIZERS[name](limuon.param_groups(model, matrix="*embed_tokens", output=(), with_names=True))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_flattened_stack_of_matrices_is_warned_about(name):
    experts = nn.Parameter(torch.randn(4, 256, 64))
    conv = nn.Parameter(torch.randn(24, 2, 3, 3))
    patches = nn.Parameter(torch.randn(32, 3, 16, 16))  # a ViT patch embedding: a convolution weight
    with pytest.warns(UserWarning, match=r"parameter 0 of group 0 \(shape \(4, 256, 64\)\) is orthogonalised as one "
                                         r"\(shape\[0\], rest\) matrix.*matrix_view='batch'"):
        OPTIMIZERS[name]([experts, conv, patches])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OPTIMIZERS[name]([experts], matrix_view="flatten")  # chosen
        OPTIMIZERS[name]([{"params": [experts], "matrix_view": "batch"}])
        OPTIMIZERS[name]([conv, patches])


# -- labels -------------------------------------------------------------------------------------------

BUILDS = {
    "model": lambda m: m,
    "named_parameters": lambda m: m.named_parameters(),
    "param_groups_with_names": lambda m: limuon.param_groups(m, output=(), with_names=True),
}


def _nan_message(params, model) -> str:
    opt = limuon.LiMuon(params, lr=0.02, adamw_lr=1e-3)
    closure = make_closure(model, make_batch())
    closure()
    model.h2.weight.grad[1, 2] = float("nan")
    with pytest.raises(limuon.NonFiniteGradientError) as info:
        opt.step()
    return str(info.value)


@pytest.mark.parametrize("build", BUILDS)
def test_errors_name_the_parameter_however_the_optimizer_was_built(build):
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (SmallNet's 'head' is an output layer by name)
        message = _nan_message(BUILDS[build](model), model)
    assert "parameter 'h2.weight' (shape (16, 16)) is not finite" in message, message


def test_without_names_errors_give_group_position_and_shape():
    model = make_model()
    assert "parameter 12 of group 0 (shape (16, 16)) is not finite" in _nan_message(model.parameters(), model)
    model = make_model()
    mats = [p for p in model.parameters() if p.ndim >= 2 and p is not model.h2.weight]
    groups = [{"params": mats}, {"params": [model.h2.weight]},
              {"params": [p for p in model.parameters() if p.ndim < 2]}]
    assert "parameter 0 of group 1 (shape (16, 16)) is not finite" in _nan_message(groups, model)


def test_a_sparse_gradient_and_a_missing_previous_gradient_are_named():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = limuon.LiMuon(emb.named_parameters(), lr=0.02, adamw_lr=1e-3)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"The gradient of parameter 'weight' \(shape \(10, 4\)\) is sparse"):
        opt.step()
    model = make_model()
    opt = limuon.LiMuon(model, lr=0.02, adamw_lr=1e-3, variance_reduction="exact")
    closure = make_closure(model, make_batch())
    opt.step(closure)
    calls = [0]

    def drops_h1_at_the_previous_iterate():
        calls[0] += 1
        loss = closure()
        if calls[0] == 1:
            model.h1.weight.grad = None
        return loss

    with pytest.raises(RuntimeError, match=r"The closure produced no gradient at the previous iterate .* for "
                                           r"parameter 'h1.weight' \(shape \(16, 16\)\)"):
        opt.step(drops_h1_at_the_previous_iterate)


# -- a tensor lr --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_tensor_lr_of_several_elements_is_refused_by_name(name):
    lr = torch.tensor([0.02, 0.01])
    params = [nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6))]
    cls = limuon.LiMuon if name == "LiMuon" else limuon.Muon
    message = re.escape("Invalid lr: a tensor lr must be a one-element float tensor, got torch.float32 (2,)")
    with pytest.raises(ValueError, match=message):
        cls(params, lr=lr, adamw_lr=1e-3)
    opt = cls(params[:1], lr=0.02)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": params[1:], "lr": lr, "adamw_lr": 1e-3})
    assert len(opt.param_groups) == 1
    cls(params, lr=torch.tensor(0.02), adamw_lr=1e-3)  # one element: taken
