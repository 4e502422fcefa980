"""Worker of tests/test_nonfinite_distributed.py: DDP-replicated low-rank LiMuon (``distributed_mesh``) meets a
NaN on one rank. Started by ``distributed_worker.spawn``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import limuon


def ddp_lowrank_nan(rank: int, world: int, mode: str, out_dir: str) -> None:
    torch.manual_seed(0)  # (the same parameters and gradients on every rank, as DDP keeps them)
    params = [torch.nn.Parameter(torch.randn(16, 24)) for _ in range(3)]
    opt = limuon.LiMuon(params, lr=0.02, rank=4, distributed_mesh=dist.group.WORLD, nonfinite=mode)
    grads = [torch.randn(16, 24) for _ in params]
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    state = {(i, k): v.clone() for i, p in enumerate(params) for k, v in opt.state[p].items()}
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if rank == 0:
        params[1].grad[0, 0] = float("nan")
    try:
        opt.step()
        raised = None
    except limuon.NonFiniteGradientError as e:
        raised = str(e)
    unchanged = all(torch.equal(v, opt.state[params[i]][k]) for (i, k), v in state.items()) \
        and all(torch.equal(p, b) for p, b in zip(params, before))
    torch.save({"raised": raised, "unchanged": unchanged, "skipped": float(opt.skipped_steps)},
               os.path.join(out_dir, f"rank{rank}.pt"))
