"""Multi-process runs for tests/test_matrix_view.py: a small mixture-of-experts model whose expert weights
``(E, M, N)`` are one parameter trained with ``matrix_view="batch"``, under FSDP2 (the expert dim sharded:
each rank holds whole experts, 3 ranks hold 2, 2 and 0 of the 4) and DDP (``distributed_mesh``), gloo on
loopback, CPU. Each rank writes its results to ``out_dir/rank{r}.pt``; the test compares them with the
same training in one process.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import limuon
from limuon import _functional

E, M, N, BATCH, STEPS = 4, 16, 24, 48, 4

#: every mode and both options of LiMuon, and Muon. Rank 3 with the default oversample: the sketch is
#: narrower than the matrices, so the result depends on the seeds (the global expert index must be used).
#: fp32 Newton–Schulz on every machine (the CPU default is bf16 where the CPU multiplies bf16, whose
#: rounding would turn the data-parallel rounding differences of the gradients into 1e-4 ones).
FP32 = dict(ns_compute_dtype=torch.float32, adamw_lr=3e-3)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "muon": ("Muon", dict(lr=0.02, **FP32)),
    **{
        f"limuon-{mode}-{'r3' if rank else 'dense'}": (
            "LiMuon", dict(lr=0.02, variance_reduction=mode, rank=rank, weight_decay=0.01, **FP32))
        for mode in ("exact", "approx", "none") for rank in (None, 3)
    },
}


class MoE(nn.Module):
    """A gated mixture of E experts ``(E, M, N)`` plus a shared expert of the same shape (a plain matrix in
    the experts' bucket in one process; a row-sharded one under FSDP2), and a LayerNorm (AdamW)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(M, N, bias=False)
        self.gate = nn.Linear(N, E, bias=False)
        self.experts = nn.Parameter(0.2 * torch.randn(E, M, N))
        self.shared = nn.Linear(N, M, bias=False)
        self.norm = nn.LayerNorm(M)
        self.head = nn.Linear(M, M, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        y = torch.einsum("be,emn,bn->bm", torch.softmax(self.gate(h), -1), self.experts, h) + self.shared(h)
        return self.head(torch.tanh(self.norm(y)))


def make_model(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    return MoE()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(BATCH, M, generator=g), torch.randn(BATCH, M, generator=g)


def make_optimizer(config: str, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    cls, kwargs = CONFIGS[config]
    return getattr(limuon, cls)([{"params": list(model.parameters()), "matrix_view": "batch"}], **kwargs, **extra)


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole (a collective for DTensors: all ranks must call it)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = t.detach().clone()
    return out


def tolerance(config: str) -> dict:
    # Data parallelism changes the order of the gradient sums (fp32 rounding); exact mode keeps its last
    # update in bf16, whose rounding follows those differences (as in tests/test_distributed.py). A lost
    # or misplaced expert update is of the order of lr = 0.02.
    return dict(atol=5e-5, rtol=0) if "exact" in config else dict(atol=5e-6, rtol=0)


def experts_held(rank: int, world: int) -> int:
    """Experts rank ``rank`` holds under FSDP2 (torch.chunk sizes of E over ``world``)."""
    chunk = -(-E // world)
    return max(0, min(chunk, E - rank * chunk))


class RecordOrthogonalised:
    """Records the shape of every batch this process orthogonalises: both ways a batch is orthogonalised, the
    fused update of one process and the owners' batch under DDP/FSDP2."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self._originals = {name: getattr(_functional, name) for name in ("orthogonalize", "update_fused")}

    def __enter__(self) -> RecordOrthogonalised:
        def recorder(original):
            def run(X: torch.Tensor, *args, **kwargs):
                self.shapes.append(tuple(X.shape))
                return original(X, *args, **kwargs)
            return run

        for name, original in self._originals.items():
            setattr(_functional, name, recorder(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(_functional, name, original)


def single_process(config: str, steps: int = STEPS) -> tuple[dict[str, torch.Tensor], list[tuple[int, ...]]]:
    x, y = make_batch()
    model = make_model()
    opt = make_optimizer(config, model)
    with RecordOrthogonalised() as record:
        train(model, opt, x, y, steps)
    return full_params(model), record.shapes


# -- process groups ------------------------------------------------------------------------------


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo process group."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    # A timeout turns a hang (ranks waiting in different collectives) into an error.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    fn(rank, world, *args)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown (a gloo thread destroyed there may abort a finished process).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _local_batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_batch()
    per = BATCH // world
    return x[rank * per: (rank + 1) * per], y[rank * per: (rank + 1) * per]


def _wrap(engine: str, model: nn.Module, world: int) -> tuple[nn.Module, Any]:
    """The model under ``engine`` ("fsdp" or "ddp-mesh") and the ``distributed_mesh`` argument to pass."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
        return model, None
    return nn.parallel.DistributedDataParallel(model), mesh


def train_all(rank: int, world: int, engines: list[str], out_dir: str) -> None:
    """Train every config under each engine; save full parameters and the orthogonalised batch shapes."""
    x, y = _local_batch(rank, world)
    results: dict[str, dict] = {}
    for engine in engines:
        for config in CONFIGS:
            model, mesh = _wrap(engine, make_model(), world)
            opt = make_optimizer(config, model, distributed_mesh=mesh)
            with RecordOrthogonalised() as record:
                train(model, opt, x, y, STEPS)
            results.setdefault(engine, {})[config] = (full_params(model), record.shapes)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# -- checkpoints (FSDP2) --------------------------------------------------------------------------


def checkpoint_save(rank: int, world: int, config: str, ckpt_dir: str) -> None:
    """FSDP2: 2 steps, then model and optimizer saved with torch.distributed.checkpoint and each rank's
    own ``opt.state_dict()``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, _ = _wrap("fsdp", make_model(), world)
    opt = make_optimizer(config, model)
    train(model, opt, *_local_batch(rank, world), 2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=os.path.join(ckpt_dir, "ckpt"))
    torch.save(opt.state_dict(), os.path.join(ckpt_dir, f"optim{rank}.pt"))


def checkpoint_runs(rank: int, world: int, config: str, ckpt_dir: str, save: bool, hows: list[str]) -> None:
    """Optionally ``checkpoint_save`` first; then per ``how`` a fresh model and optimizer restored after 2
    steps take 2 more (results in ``ckpt_dir/{how}{world}/rank{r}.pt``)."""
    if save:
        checkpoint_save(rank, world, config, ckpt_dir)
        dist.barrier()
    for how in hows:
        out_dir = os.path.join(ckpt_dir, f"{how}{world}")
        os.makedirs(out_dir, exist_ok=True)
        checkpoint_load(rank, world, config, ckpt_dir, out_dir, how)


def checkpoint_load(rank: int, world: int, config: str, ckpt_dir: str, out_dir: str, how: str) -> None:
    """FSDP2: a fresh model (other initial weights) and optimizer restored after 2 steps, then 2 more.
    ``how``: "dcp" (the checkpoint, any world size), "per-rank" (each rank's own state_dict file, the same
    world size) or "single" (the state dicts of 2 steps taken in this process alone, no FSDP2)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if how == "single":
        single = make_model()
        single_opt = make_optimizer(config, single)
        train(single, single_opt, *make_batch(), 2)
        model = make_model(seed=1)
        model.load_state_dict(single.state_dict())
        model, _ = _wrap("fsdp", model, world)
        opt = make_optimizer(config, model)
        opt.load_state_dict(single_opt.state_dict())
    else:
        model, _ = _wrap("fsdp", make_model(seed=1), world)
        opt = make_optimizer(config, model)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(ckpt_dir, "ckpt"))
        set_model_state_dict(model, state["model"])
        if how == "dcp":
            set_optimizer_state_dict(model, opt, state["optim"])
        else:
            opt.load_state_dict(torch.load(os.path.join(ckpt_dir, f"optim{rank}.pt"), weights_only=False))
    train(model, opt, *_local_batch(rank, world), 2)
    U = opt.state[model.experts]["U"]
    torch.save({"params": full_params(model), "U_type": type(U).__name__, "U_shape": tuple(U.shape)},
               os.path.join(out_dir, f"rank{rank}.pt"))
