"""limuon.param_groups: the exact Muon/AdamW split on GPT-style (tied and untied), ViT and MoE models,
the overrides and their errors, and one optimizer step from the groups against the fp64 math.

The models have no forward: routing looks at modules and shapes only, and the step tests set random
full-rank gradients (a real backward on a tiny batch gives rank-deficient ones, whose polar factor is
rounding noise).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import limuon

VOCAB, BLOCK, D = 50, 16, 16  # block_size == n_embd, as in GPT-2 medium (1024 == 1024)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(d, 3 * d), "c_proj": nn.Linear(d, d)})
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})


class GPT(nn.Module):
    """nanoGPT's layout; ``tied``: ``wte.weight = lm_head.weight`` (nanoGPT's assignment order)."""

    def __init__(self, tied: bool, n_layer: int = 2, heads: int = 1) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(VOCAB, D),
            "wpe": nn.Embedding(BLOCK, D),
            "h": nn.ModuleList(Block(D) for _ in range(n_layer)),
            "ln_f": nn.LayerNorm(D),
        })
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        for i in range(1, heads):  # multi-token prediction heads, vocab-sized like lm_head
            self.add_module(f"lm_head{i}", nn.Linear(D, VOCAB, bias=False))
        if tied:
            self.transformer.wte.weight = self.lm_head.weight


def gpt_names(n_layer: int = 2) -> tuple[set[str], set[str]]:
    """(matrix names, AdamW names) of GPT other than the embeddings and the head."""
    matrix, adamw = set(), {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    for i in range(n_layer):
        b = f"transformer.h.{i}"
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            matrix.add(f"{b}.{lin}.weight")
            adamw.add(f"{b}.{lin}.bias")
        adamw |= {f"{b}.ln_1.weight", f"{b}.ln_1.bias", f"{b}.ln_2.weight", f"{b}.ln_2.bias"}
    return matrix, adamw


class ViT(nn.Module):
    def __init__(self, d: int = 16, patches: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, stride=4)  # (16, 3, 4, 4) → 16×48
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, d))  # view 1×80: one row
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 2 * d, batch_first=True, dropout=0.0) for _ in range(2)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)


def vit_names(head_to_adamw: bool = True) -> tuple[set[str], set[str]]:
    matrix = {"patch_embed.weight", "head.weight"}
    adamw = {"patch_embed.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias"}
    for i in range(2):
        b = f"blocks.{i}"
        matrix |= {f"{b}.self_attn.in_proj_weight", f"{b}.self_attn.out_proj.weight", f"{b}.linear1.weight",
                   f"{b}.linear2.weight"}
        adamw |= {f"{b}.self_attn.in_proj_bias", f"{b}.self_attn.out_proj.bias", f"{b}.linear1.bias",
                  f"{b}.linear2.bias", f"{b}.norm1.weight", f"{b}.norm1.bias", f"{b}.norm2.weight",
                  f"{b}.norm2.bias"}
    if head_to_adamw:
        matrix.remove("head.weight")
        adamw.add("head.weight")
    return matrix, adamw


class Experts(nn.Module):
    def __init__(self, e: int, d: int, h: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(e, d, h) / math.sqrt(d))  # E independent d×h matrices
        self.b_in = nn.Parameter(torch.zeros(e, h))  # 2-D, but a bias per expert
        self.w_out = nn.Parameter(torch.randn(e, h, d) / math.sqrt(h))


class MoE(nn.Module):
    def __init__(self, e: int = 4, d: int = 8, h: int = 12) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(d, e, bias=False)
        self.experts = Experts(e, d, h)


class FusedExperts(nn.Module):
    """transformers 5.x's expert layout (MixtralExperts, Qwen3MoeExperts, DeepseekV3Experts): every expert's
    gate+up and down projections stacked in two 3-D parameters, (E, 2h, d) and (E, d, h)."""

    def __init__(self, e: int, d: int, h: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * h, d) / math.sqrt(d))
        self.down_proj = nn.Parameter(torch.randn(e, d, h) / math.sqrt(h))


class Mlp(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)


class Router(nn.Module):
    """DeepSeek-V3's router: a bare (E, d) weight and a score-correction bias."""

    def __init__(self, e: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(e, d))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e))


class MoELM(nn.Module):
    """A causal LM with the expert layouts of Mixtral (router ``gate`` + fused experts), Qwen-MoE (plus a
    shared expert and its (1, d) gate) and DeepSeek (a Router module and ``shared_experts``), built here."""

    def __init__(self, style: str, e: int = 4, d: int = 16, h: int = 12) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.input_layernorm, layer.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
            layer.self_attn = nn.ModuleDict({k: nn.Linear(d, d, bias=False) for k in ("q_proj", "k_proj", "o_proj")})
            layer.mlp = nn.Module()
            layer.mlp.gate = Router(e, d) if style == "deepseek" else nn.Linear(d, e, bias=False)
            layer.mlp.experts = FusedExperts(e, d, h)
            if style == "qwen":
                layer.mlp.shared_expert = Mlp(d, h)
                layer.mlp.shared_expert_gate = nn.Linear(d, 1, bias=False)
            if style == "deepseek":
                layer.mlp.shared_experts = Mlp(d, h)
            self.layers.append(layer)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)


def moe_lm_split(style: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"matrix": set(), "batch": set(),
                                "adamw": {"embed_tokens.weight", "norm.weight", "norm.bias", "lm_head.weight"}}
    for i in range(2):
        b = f"layers.{i}"
        norms = ("input_layernorm", "post_attention_layernorm")
        out["adamw"] |= {f"{b}.{n}.{w}" for n in norms for w in ("weight", "bias")}
        out["matrix"] |= {f"{b}.self_attn.{k}.weight" for k in ("q_proj", "k_proj", "o_proj")}
        out["matrix"].add(f"{b}.mlp.gate.weight")
        out["batch"] |= {f"{b}.mlp.experts.gate_up_proj", f"{b}.mlp.experts.down_proj"}
        shared = {"qwen": "shared_expert", "deepseek": "shared_experts"}.get(style)
        if shared:
            out["matrix"] |= {f"{b}.mlp.{shared}.{k}.weight" for k in ("gate_proj", "up_proj", "down_proj")}
        if style == "qwen":
            out["adamw"].add(f"{b}.mlp.shared_expert_gate.weight")  # (1, d): a side < 2
        if style == "deepseek":
            out["adamw"].add(f"{b}.mlp.gate.e_score_correction_bias")
    return out


def split(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    """``{"matrix" | "batch" | "adamw": names}`` of the groups (each kind at most once)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, set[str]] = {}
    for g in groups:
        kind = "adamw" if g.get("algorithm") == "adamw" else "batch" if g.get("matrix_view") == "batch" else "matrix"
        assert kind not in out and g["params"], groups
        out[kind] = {names[id(p)] for p in g["params"]}
    return out


# -- the split --------------------------------------------------------------------------------------


def test_gpt_tied():
    model = GPT(tied=True)
    matrix, adamw = gpt_names()
    got = split(model, limuon.param_groups(model))
    # The tied tensor appears once, under its first name; it is the embedding, not a matrix. The
    # c_proj layers have out_features == block_size == num_embeddings of wpe: hidden layers all the same.
    assert got == {"matrix": matrix, "adamw": adamw | {"transformer.wte.weight", "transformer.wpe.weight"}}
    reason = limuon.explain_param_groups(model)["transformer.wte.weight"]
    assert reason == "adamw: embedding weight of transformer.wte, tied to Linear lm_head"
    # A pattern may name the alias (lm_head.weight is transformer.wte.weight).
    assert split(model, limuon.param_groups(model, output="lm_head")) == got


def test_gpt_untied_head_detected():
    model = GPT(tied=False)
    matrix, adamw = gpt_names()
    embeddings = {"transformer.wte.weight", "transformer.wpe.weight"}
    got = split(model, limuon.param_groups(model))
    assert got == {"matrix": matrix, "adamw": adamw | embeddings | {"lm_head.weight"}}
    assert limuon.explain_param_groups(model)["lm_head.weight"] == (
        "adamw: output projection lm_head (out_features == num_embeddings of transformer.wte)")
    # output=() declares there is no output projection: the head is a plain matrix.
    got = split(model, limuon.param_groups(model, output=()))
    assert got == {"matrix": matrix | {"lm_head.weight"}, "adamw": adamw | embeddings}


def test_ambiguous_heads_raise_until_named():
    model = GPT(tied=False, heads=3)  # three vocab-sized heads: none is "the only" one
    with pytest.raises(ValueError, match=r"3 Linear layers \(lm_head, lm_head1, lm_head2\).*output="):
        limuon.param_groups(model)
    matrix, adamw = gpt_names()
    heads = {"lm_head.weight", "lm_head1.weight", "lm_head2.weight"}
    got = split(model, limuon.param_groups(model, output="lm_head*"))
    assert got == {"matrix": matrix, "adamw": adamw | heads | {"transformer.wte.weight", "transformer.wpe.weight"}}


def test_a_declared_head_among_vocabulary_wide_hidden_layers():
    """Hidden layers as wide as the vocabulary (inside blocks) do not make the top-level head ambiguous."""
    model = nn.Module()
    model.embed = nn.Embedding(VOCAB, D)
    model.blocks = nn.Sequential(nn.Linear(D, VOCAB), nn.Linear(VOCAB, D))
    model.head = nn.Linear(D, VOCAB, bias=False)
    got = split(model, limuon.param_groups(model))
    assert got == {"matrix": {"blocks.0.weight", "blocks.1.weight"},
                   "adamw": {"embed.weight", "blocks.0.bias", "blocks.1.bias", "head.weight"}}
    assert limuon.explain_param_groups(model)["head.weight"] == (
        "adamw: output layer head (the declared head among the Linears with out_features == num_embeddings of embed)")


def test_vit():
    model = ViT()
    matrix, adamw = vit_names()  # the top-level head is the output layer: AdamW
    assert split(model, limuon.param_groups(model)) == {"matrix": matrix, "adamw": adamw}
    assert split(model, limuon.param_groups(model, output="head")) == {"matrix": matrix, "adamw": adamw}
    matrix, adamw = vit_names(head_to_adamw=False)
    assert split(model, limuon.param_groups(model, output=())) == {"matrix": matrix, "adamw": adamw}
    explained = limuon.explain_param_groups(model)
    assert explained["pos_embed"] == "adamw: its matrix view 1x80 of shape (1, 5, 16) has a side < 2"
    assert explained["patch_embed.weight"] == "matrix: 16x48 view of shape (16, 3, 4, 4) (convolution weight)"
    assert explained["head.weight"] == "adamw: output layer head (top-level 'head' head)"


def test_moe_batched_by_default_flatten_on_request():
    model = MoE()
    got = split(model, limuon.param_groups(model))
    # A 3-D parameter that is not a convolution weight holds independent matrices: batch view by default.
    # The per-expert bias (4, 12) is 2-D: one matrix (an override sends it to AdamW, below).
    assert got == {"matrix": {"router.weight", "experts.b_in"}, "batch": {"experts.w_in", "experts.w_out"},
                   "adamw": {"norm.weight", "norm.bias"}}
    assert limuon.explain_param_groups(model)["experts.w_in"] == (
        "batch: 4 matrices 8x12 (ndim 3, not a convolution weight)")
    groups = limuon.param_groups(model, batch="experts.w_*", adamw="experts.b_in")
    assert split(model, groups) == {"matrix": {"router.weight"}, "batch": {"experts.w_in", "experts.w_out"},
                                    "adamw": {"norm.weight", "norm.bias", "experts.b_in"}}
    assert [g.get("matrix_view") for g in groups] == ["flatten", "batch", None]
    assert limuon.explain_param_groups(model, batch="experts.w_*")["experts.w_in"] == (
        "batch: batch='experts.w_*', 4 matrices 8x12")
    # flatten= names the exceptions: one E × (m·n) matrix; matrix= keeps the view of the rule.
    groups = limuon.param_groups(model, flatten="experts.w_in", matrix="experts.w_out")
    assert split(model, groups) == {"matrix": {"router.weight", "experts.b_in", "experts.w_in"},
                                    "batch": {"experts.w_out"}, "adamw": {"norm.weight", "norm.bias"}}
    assert limuon.explain_param_groups(model, flatten="experts.w_in")["experts.w_in"] == (
        "matrix: flatten='experts.w_in', 4x96 view of shape (4, 8, 12)")


@pytest.mark.parametrize("style", ["mixtral", "qwen", "deepseek"])
def test_moe_language_models(style):
    """The expert layouts of transformers 5.x: fused (E, m, n) experts batched, routers and shared experts
    matrices, embeddings, the head, norms and (1, d) gates AdamW."""
    model = MoELM(style)
    assert split(model, limuon.param_groups(model)) == moe_lm_split(style)


class HFImageClassifier(nn.Module):
    """Hugging Face's *ForImageClassification: a backbone and a top-level ``classifier`` Linear."""

    def __init__(self, d: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.vit = nn.ModuleDict({"embeddings": nn.Linear(48, d), "encoder": nn.Linear(d, d),
                                  "layernorm": nn.LayerNorm(d)})
        self.classifier = nn.Linear(d, classes)


class HFSequenceClassifier(nn.Module):
    """Hugging Face's *ForSequenceClassification of a decoder: a ``score`` head and get_output_embeddings() None."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.model = nn.ModuleDict({"embed_tokens": nn.Embedding(VOCAB, d), "proj": nn.Linear(d, d)})
        self.score = nn.Linear(d, 3, bias=False)

    def get_output_embeddings(self) -> None:
        return None


class TimmLike(nn.Module):
    """timm: get_classifier() names the head, here ``head.fc`` inside a head module with a hidden ``pre_logits``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, d, 3)
        self.blocks = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.head = nn.Module()
        self.head.pre_logits, self.head.fc = nn.Linear(d, d), nn.Linear(d, 7)

    def get_classifier(self) -> nn.Module:
        return self.head.fc


class TorchvisionLike(nn.Module):
    """torchvision: ResNet's top-level ``fc``; VGG's ``classifier`` Sequential (hidden Linears, then the output)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, 3)
        self.fc = nn.Linear(d, 5)
        self.classifier = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 6))


class HFCausalLM(nn.Module):
    """An untied head the vocabulary rule cannot see (two vocab-sized Linears), named by get_output_embeddings()."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.mtp = nn.Linear(d, VOCAB, bias=False)
        self.out = nn.Linear(d, VOCAB, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.out


@pytest.mark.parametrize("make, heads, hidden", [
    (HFImageClassifier, {"classifier.weight"}, {"vit.embeddings.weight", "vit.encoder.weight"}),
    (HFSequenceClassifier, {"score.weight"}, {"model.proj.weight"}),
    (TimmLike, {"head.fc.weight"}, {"stem.weight", "blocks.0.weight", "blocks.2.weight", "head.pre_logits.weight"}),
    (TorchvisionLike, {"fc.weight", "classifier.2.weight"}, {"conv1.weight", "classifier.0.weight"}),
], ids=["hf_image", "hf_sequence", "timm", "torchvision"])
def test_classifier_heads_go_to_adamw(make, heads, hidden):
    model = make()
    got = split(model, limuon.param_groups(model))
    assert got["matrix"] == hidden
    assert heads <= got["adamw"]
    explained = limuon.explain_param_groups(model)
    assert all(explained[h].startswith("adamw: output layer") for h in heads), explained


def test_get_output_embeddings_names_the_head():
    """Two vocab-sized Linears: the vocabulary rule is ambiguous, but the model says which is its head."""
    model = HFCausalLM()
    got = split(model, limuon.param_groups(model))
    assert got == {"matrix": {"mtp.weight"}, "adamw": {"embed.weight", "out.weight"}}
    assert limuon.explain_param_groups(model)["out.weight"] == (
        "adamw: output layer out (the model's get_output_embeddings())")


def test_output_takes_a_list_and_an_unknown_name_lists_candidates():
    model = HFImageClassifier()
    got = split(model, limuon.param_groups(model, output=["classifier", "vit.encoder"]))
    assert got["adamw"] >= {"classifier.weight", "classifier.bias", "vit.encoder.weight"}
    with pytest.raises(ValueError, match=r"Invalid output: the pattern 'head' matches no parameter or module name "
                                         r"of the model; candidate output modules: vit, classifier, "
                                         r"vit.embeddings, vit.encoder"):
        limuon.param_groups(model, output="head")


def test_overrides_and_options():
    model = GPT(tied=False)
    groups = limuon.param_groups(model, matrix="transformer.wte", adamw=["*.c_fc.weight", "*.attn.c_attn"],
                                 matrix_options={"lr": 0.03}, adamw_options={"adamw_lr": 1e-3})
    matrix, adamw = gpt_names()
    forced = {f"transformer.h.{i}.{n}.weight" for i in range(2) for n in ("mlp.c_fc", "attn.c_attn")}
    assert split(model, groups) == {
        "matrix": (matrix - forced) | {"transformer.wte.weight"},
        "adamw": adamw | forced | {"transformer.wpe.weight", "lm_head.weight"},
    }
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == [
        {"matrix_view": "flatten", "lr": 0.03}, {"adamw_lr": 1e-3, "algorithm": "adamw"}]


def test_frozen_parameters_left_out():
    model = GPT(tied=False)
    model.transformer.wpe.weight.requires_grad_(False)
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    got = split(model, limuon.param_groups(model))
    assert "transformer.wpe.weight" not in got["adamw"]
    assert "transformer.h.0.attn.c_attn.weight" not in got["matrix"]
    assert limuon.explain_param_groups(model)["transformer.wpe.weight"] == (
        "frozen: requires_grad=False (adamw: embedding weight of transformer.wpe)")


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(adamw="lm_haed"), r"Invalid adamw: the pattern 'lm_haed' matches no parameter"),
    (dict(matrix=["*.c_fc.weight", "nope"]), r"Invalid matrix: the pattern 'nope'"),
    (dict(output="head"), r"Invalid output: the pattern 'head' .*; candidate output modules: transformer, lm_head"),
    (dict(batch="experts"), r"Invalid batch: the pattern 'experts'"),
    (dict(adamw="*.c_fc.weight", matrix="transformer.h.0.mlp.c_fc"),
     r"Contradictory overrides for parameter 'transformer.h.0.mlp.c_fc.weight': adamw='\*.c_fc.weight'"),
    (dict(output="lm_head", batch="lm_head"), r"Contradictory overrides .* output='lm_head' .* batch="),
    (dict(batch="*.c_fc.weight"), r"Invalid batch: .*shape \(64, 16\); matrix_view='batch' is for ndim >= 3"),
    (dict(flatten="*.c_fc.weight"), r"Invalid flatten: .*shape \(64, 16\); matrix_view='flatten' is for ndim >= 3"),
    (dict(matrix="transformer.ln_f.weight"), r"Invalid matrix: .*shape \(16,\); only a parameter with ndim >= 2"),
    (dict(matrix_options={"algorithm": "adamw"}), r"Invalid matrix_options: the key 'algorithm'"),
    (dict(adamw_options={"params": []}), r"Invalid adamw_options: the key 'params'"),
])
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        limuon.param_groups(GPT(tied=False), **kwargs)


def test_batch_on_a_module_with_a_2d_parameter_raises():
    with pytest.raises(ValueError, match=r"'experts.b_in' of shape \(4, 12\)"):
        limuon.param_groups(MoE(), batch="experts")


@pytest.mark.parametrize("kwargs, message", [
    (dict(adamw=[3]), r"Invalid adamw: 3 is not a non-empty name pattern"),
    (dict(output=5), r"Invalid output: 5; expected a name pattern"),
    (dict(matrix_options=[("lr", 1.0)]), r"Invalid matrix_options: .*expected a dict"),
])
def test_type_errors(kwargs, message):
    with pytest.raises(TypeError, match=message):
        limuon.param_groups(GPT(tied=False), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"Invalid model: expected a torch\.nn\.Module, got list"):
        limuon.param_groups(list(GPT(tied=False).parameters()))


# -- one optimizer step from the groups, against the fp64 math --------------------------------------
# Cubic Newton–Schulz (1.5, -0.5, 0) converges to the polar factor U Vᵀ, so the matrix update is the
# exact orthogonalisation of the view param_groups chose (flatten or batch): the test tells them apart,
# and tells AdamW from the matrix update. First step, weight decay on: LiMuon "approx" orthogonalises
# d_0 = g_0, Muon a multiple of g_0 (its momentum buffer starts at zero).

# fp32 matmuls: the CPU default is bf16 where the CPU multiplies bf16, 0.5% off the polar factor.
NS = dict(ns_coefficients=(1.5, -0.5, 0.0), ns_steps=40, ns_compute_dtype=torch.float32)
KW = dict(lr=0.02, weight_decay=0.1, adamw_lr=1e-3, adamw_weight_decay=0.0, **NS)
OPTIONS = dict(matrix_options={"lr": 0.03}, adamw_options={"adamw_lr": 2e-3, "adamw_weight_decay": 0.05})
OPTIMIZERS = {
    "LiMuon": lambda groups: limuon.LiMuon(groups, variance_reduction="approx", **KW),
    "Muon": lambda groups: limuon.Muon(groups, **KW),
}
MODELS = {
    "gpt_tied": (lambda: GPT(tied=True), {}),
    "gpt_untied": (lambda: GPT(tied=False), {}),
    "vit": (ViT, {}),
    "moe_flatten": (MoE, {"adamw": "experts.b_in", "flatten": "experts.w_*"}),
    "moe_batch": (MoE, {"adamw": "experts.b_in", "batch": "experts.w_*"}),
    "moe_default": (MoE, {"adamw": "experts.b_in"}),
    "mixtral_like": (lambda: MoELM("mixtral"), {}),
    "qwen_moe_like": (lambda: MoELM("qwen"), {}),
    "deepseek_like": (lambda: MoELM("deepseek"), {}),
}
RTOL_MATRIX = 5e-5  # fp32 Newton–Schulz vs the fp64 polar factor (measured: at most 4.6e-6)
# The first AdamW step moves a LayerNorm gain of 1.0 by 2e-3: fp32 rounding of the weight (half an ulp,
# 6e-8) is 3e-5 of the move (measured: at most 2.2e-5).
RTOL_ADAMW = 1e-4


def has_matrix_view() -> bool:
    return "matrix_view" in limuon.LiMuon([torch.zeros(2, 2)], adamw_lr=1e-3).defaults


def set_grads(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = grads[name] = torch.randn(p.shape, generator=gen)
    return grads


def polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def expected_step(p0: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """fp64: AdamW's first step (m̂ = g, v̂ = g²), or W(1 − lr·wd) − lr·sqrt(max(1, m/n))·polar(view of g)."""
    p0, g = p0.double(), g.double()
    if kind == "adamw":
        lr, wd = OPTIONS["adamw_options"]["adamw_lr"], OPTIONS["adamw_options"]["adamw_weight_decay"]
        return p0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    G = g.reshape(-1, *g.shape[-2:]) if kind == "batch" else g.reshape(1, g.shape[0], -1)
    m, n = G.shape[-2:]
    lr, wd = OPTIONS["matrix_options"]["lr"], KW["weight_decay"]
    return p0 * (1 - lr * wd) - lr * math.sqrt(max(1.0, m / n)) * polar(G).reshape(g.shape)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_one_step_follows_the_split(opt_name, model_name):
    make_model, overrides = MODELS[model_name]
    if "batch" in overrides and not has_matrix_view():
        pytest.skip("the optimizers do not take matrix_view yet")
    torch.manual_seed(0)
    model = make_model()
    groups = limuon.param_groups(model, **overrides, **OPTIONS)
    kinds = {name: kind for kind, names in split(model, groups).items() for name in names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = set_grads(model)
    OPTIMIZERS[opt_name](groups).step()
    errors = {}
    for name, p in model.named_parameters():
        want = expected_step(before[name], grads[name], kinds[name])
        errors[name] = ((p.double() - want).norm() / (want - before[name].double()).norm()).item()
    bad = {n: e for n, e in errors.items() if e > (RTOL_ADAMW if kinds[n] == "adamw" else RTOL_MATRIX)}
    assert not bad, bad


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_param_names_survive_state_dict(opt_name):
    """with_names=True: torch keeps "param_names" in the state dict; a fresh optimizer loads it and
    takes the same next step."""
    model = GPT(tied=True)
    twin = copy.deepcopy(model)
    opt = OPTIMIZERS[opt_name](limuon.param_groups(model, with_names=True))
    set_grads(model, seed=0)
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # as saved: state_dict() holds the live state tensors
    matrix, _ = gpt_names()
    order = [n for n, _ in model.named_parameters()]
    assert [g["param_names"] for g in state["param_groups"]] == [
        [n for n in order if n in matrix], [n for n in order if n not in matrix]]
    twin.load_state_dict(model.state_dict())
    twin_opt = OPTIMIZERS[opt_name](limuon.param_groups(twin, with_names=True))
    twin_opt.load_state_dict(state)
    for m, o in ((model, opt), (twin, twin_opt)):
        set_grads(m, seed=1)
        o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
