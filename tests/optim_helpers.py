"""Shared pieces of the optimizer tests: a small model with awkward shapes, a fixed batch, the closure
for the optimizer under test, and the pure gradient function that drives the fp64 reference."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

BATCH = 64


class SmallNet(nn.Module):
    """Every shape the optimizers route differently, at a size a 2-core CPU runs in milliseconds.

    5×123 and 123×5 (wide and tall, Gram side 5), a conv weight (24, 2, 3, 3) seen as 24×18 (its
    lr scale differs from the one of its first two dims), two 16×16 matrices (batched together), a
    LayerNorm and biases (AdamW), and optionally a parameter the forward never uses (no gradient).
    """

    def __init__(self, with_unused: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(123, 5)  # 5×123
        self.norm = nn.LayerNorm(5)
        self.up = nn.Linear(5, 123, bias=False)  # 123×5
        self.mix = nn.Linear(123, 16)  # 16×123
        self.conv = nn.Conv2d(2, 24, 3)  # (24, 2, 3, 3) → 24×18; 4×4 image → 2×2
        self.img = nn.Linear(96, 16, bias=False)  # 16×96
        self.h1 = nn.Linear(16, 16)
        self.h2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)  # 3×16
        if with_unused:
            self.unused = nn.Parameter(torch.randn(4, 6))
        self.skip_h2 = False  # when set, h2 gets no gradient (a layer used only on some steps)

    def forward(self, x: Tensor, img: Tensor) -> Tensor:
        a = self.mix(torch.tanh(self.up(self.norm(torch.tanh(self.down(x))))))
        c = self.img(torch.tanh(self.conv(img)).flatten(1))
        h = torch.tanh(a + c)
        h = torch.tanh(self.h1(h))
        if not self.skip_h2:
            h = torch.tanh(self.h2(h))
        return self.head(h)


def make_model(seed: int = 0, with_unused: bool = False) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet(with_unused)
    with torch.no_grad():
        # A LayerNorm at its init (gain 1, bias 0) outputs zero-mean rows, which would make the
        # gradient of `up` exactly rank 4 of 5: its fifth singular direction would be rounding noise
        # that orthogonalisation blows up to size 1, differently in fp32 and fp64.
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1.0, 1.0)
    return model


def make_batch(seed: int = 1, batch: int = BATCH) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 123, generator=gen)
    img = torch.randn(batch, 2, 4, 4, generator=gen)
    y = torch.randn(batch, 3, generator=gen)
    return x, img, y


def make_closure(model: nn.Module, batch, counter: list[int] | None = None) -> Callable[[], Tensor]:
    """The LBFGS-style closure: zero grads, forward and backward on the same batch, return the loss."""
    x, img, y = batch

    def closure() -> Tensor:
        if counter is not None:
            counter[0] += 1
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = F.mse_loss(model(x, img), y)
            loss.backward()
        return loss.detach()

    return closure


def make_grad_fn(model: nn.Module, batch, names: list[str], dtype: torch.dtype = torch.float64):
    """``grad_fn(params) -> (loss, grads)`` for the reference: params in the order of ``names``."""
    ref_model = copy.deepcopy(model).to(dtype)
    x, img, y = (t.to(dtype) for t in batch)

    def grad_fn(params: list[Tensor]):
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            loss = F.mse_loss(functional_call(ref_model, dict(zip(names, leaves)), (x, img)), y)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss.detach(), [None if g is None else g.detach() for g in grads]

    grad_fn.model = ref_model
    return grad_fn


def reference_groups(model: nn.Module, groups, dtype: torch.dtype = torch.float64):
    """Copy the optimizer's param groups (same hyperparameters) onto fresh ``dtype`` tensors.

    Returns the groups and the parameter names in the flattened group order.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = list(groups)
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    names, out = [], []
    for g in groups:
        names += [name_of[id(p)] for p in g["params"]]
        out.append({**g, "params": [p.detach().to(dtype).clone() for p in g["params"]]})
    return out, names


def relative_errors(model: nn.Module, ref_params, names, init: dict[str, Tensor]) -> dict[str, float]:
    """Per parameter ‖W_opt − W_ref‖ / ‖W_ref − W_0‖: the error relative to how far training moved it."""
    current = dict(model.named_parameters())
    errs = {}
    for name, r in zip(names, ref_params):
        p = current[name].detach().to(r.dtype)
        moved = (r - init[name].to(r.dtype)).norm().item()
        err = (p - r).norm().item()
        errs[name] = err / moved if moved > 0 else (0.0 if err == 0 else float("inf"))
    return errs


def assert_trajectory_close(model, ref_params, names, init, rtol: float, context: str = "") -> None:
    errs = relative_errors(model, ref_params, names, init)
    bad = {k: v for k, v in errs.items() if not v <= rtol}
    assert not bad, (
        f"{context}: parameters off the reference by more than {rtol:g} of their displacement: "
        + ", ".join(f"{k}={v:.3g}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1]))
    )


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- a problem with well-conditioned gradients, for comparisons against bf16 Newton–Schulz ----------
# bf16 Newton–Schulz maps every direction with σ ≳ 2^-8·σ_max to size ~1, so two correct bf16
# implementations disagree by O(1) along directions that are rounding noise. Gaussian gradients of
# shapes with m ≤ n/3 keep σ_min/σ_max ≥ ~0.25, far from that.

RANDOM_SHAPES = [(5, 123), (123, 5), (16, 48), (16, 48), (8, 3, 3, 3), (3, 16), (16,), (5,)]


def random_init(dtype: torch.dtype = torch.float32) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [(0.1 * torch.randn(*s, generator=gen)).to(dtype) for s in RANDOM_SHAPES]


def random_grads(t: int) -> list[Tensor]:
    """The (W-independent) gradients of step ``t``: fresh Gaussian matrices every step."""
    gen = torch.Generator().manual_seed(1000 + t)
    return [torch.randn(*s, generator=gen) for s in RANDOM_SHAPES]


def equal_nested(a, b) -> bool:
    """Bitwise equality of nested state (dicts, lists, tensors with their dtypes and shapes, other values)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_nested(x, y) for x, y in zip(a, b))
    return a == b
