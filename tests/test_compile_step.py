"""``torch.compile(optimizer.step, fullgraph=True)`` with ``nonfinite="skip"``: one graph, no graph break
(fullgraph raises on any), and the compiled steps match eager ones on CPU.

Under compilation the AdamW part runs torch's AdamW arithmetic as tensor ops (torch's fused AdamW kernel
cannot be functionalised), so compiled and eager agree to fp32 rounding rather than bit for bit; the
``limuon::`` ops run the same kernels either way.
"""

from __future__ import annotations

import pytest
import torch

import limuon

CONFIGS = {
    "muon": (limuon.Muon, {}),
    "limuon-approx": (limuon.LiMuon, dict(variance_reduction="approx")),
    "limuon-none-r3": (limuon.LiMuon, dict(variance_reduction="none", rank=3)),
}


def _setup(cls, kw: dict):
    gen = torch.Generator().manual_seed(7)
    shapes = [(16, 24), (16, 24), (24, 16), (8,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    opt = cls(params, lr=0.02, adamw_lr=0.01, nonfinite="skip", ns_compute_dtype=torch.float32, **kw)
    return params, grads, opt


@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiled_step_matches_eager(config):
    cls, kw = CONFIGS[config]
    torch._dynamo.reset()
    eager_params, grads, eager = _setup(cls, kw)
    params, _, opt = _setup(cls, kw)
    step = torch.compile(opt.step, fullgraph=True)
    for t, step_grads in enumerate(grads):
        if t == 2:
            step_grads = [g.clone() for g in step_grads]
            step_grads[0][0, 0] = float("nan")  # a skipped step, compiled too
        for ps in (eager_params, params):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
        eager.step()
        step()
        for p, q in zip(params, eager_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"step {t}")
    assert float(opt.skipped_steps) == float(eager.skipped_steps) == 1.0
