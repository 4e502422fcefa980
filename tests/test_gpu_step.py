"""The optimizer step on a GPU: no host synchronisation, and capturable in a CUDA graph (marked ``gpu``).

* ``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA call raise: whole steps of
  Muon and LiMuon in every mode and option (``nonfinite="skip"``) run under it, after three steps that
  create the state, build the cached index and seed tensors (host-to-device copies) and compile and
  autotune every kernel variant (autotuning times kernels, which synchronises).
* ``step()`` captured in a CUDA graph and replayed on new gradients gives what eager steps give (the
  step counters, and so the RSVD seeds, advance on the device; lr is a device tensor).
"""

from __future__ import annotations

import pytest
import torch

import limuon

pytestmark = pytest.mark.gpu

CONFIGS = {
    "muon": (limuon.Muon, {}),
    **{f"{mode}-{opt}": (limuon.LiMuon, dict(variance_reduction=mode, rank=None if opt == "dense" else 4))
       for mode in ("exact", "approx", "none") for opt in ("dense", "r4")},
    "approx-r4-batch": (limuon.LiMuon, dict(rank=4, matrix_view="batch")),
}
SHAPES = [(64, 96), (64, 96), (96, 64), (2, 32, 48), (64,)]


def _problem(seed: int = 0, steps: int = 4):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).cuda() for s in SHAPES] for _ in range(steps)]
    return init, grads


def _optimizer(cls, kw: dict, params: list) -> torch.optim.Optimizer:
    return cls(params, lr=0.02, adamw_lr=0.01, nonfinite="skip", **kw)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_steps_make_no_synchronising_call(config):
    cls, kw = CONFIGS[config]
    init, grads = _problem()
    params = [torch.nn.Parameter(t.cuda()) for t in init]
    opt = _optimizer(cls, kw, params)

    def closure():
        for p, g in zip(params, grads[closure.t % len(grads)]):
            p.grad = g.clone()
        closure.t += 1

    closure.t = 0
    for _ in range(3):  # state, caches, and every kernel variant compiled and autotuned (which synchronises)
        closure()
        opt.step(closure)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            closure()
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.skipped_steps) == 0.0


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.startswith("exact")])
def test_cuda_graph_replay_equals_eager(config):
    cls, kw = CONFIGS[config]
    init, grads = _problem(1, steps=6)
    eager_params = [torch.nn.Parameter(t.cuda()) for t in init]
    params = [torch.nn.Parameter(t.cuda()) for t in init]
    eager, opt = _optimizer(cls, kw, eager_params), _optimizer(cls, kw, params)
    static = [g.clone() for g in grads[0]]
    for p, g in zip(params, static):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (state, caches) outside the capture, as CUDA graphs need
        for t in range(2):
            for s, g in zip(static, grads[t]):
                s.copy_(g)
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    # the capture itself ran nothing: the eager twin takes the same first 2 steps, then both go on
    for t in range(len(grads)):
        for p, g in zip(eager_params, grads[t]):
            p.grad = g.clone()
        eager.step()
        if t >= 2:
            for s, g in zip(static, grads[t]):
                s.copy_(g)
            graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)
