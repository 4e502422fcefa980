"""Multi-process training runs for tests/test_distributed.py (gloo on loopback, CPU).

Each worker trains the same small transformer on its slice of one global batch, under DDP or FSDP2,
and writes the full parameters after training (plus how many matrices it orthogonalised) to
``out_dir/rank{r}.pt``. The test compares them with the same training in one process.
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
import limuon_kernels as lk
from limuon import _functional

D, HIDDEN, OUT, BATCH, SEQ = 16, 40, 10, 6, 5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)  # (a key bias has a zero gradient: AdamW would amplify noise)
        self.proj = nn.Linear(D, D, bias=False)
        self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Two blocks, a conv (3-D weight), a 2×16 matrix (an empty shard on the third of 3 ranks), a head
    with 10 rows (uneven shards) and an unused matrix (never has a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D, D, 3, padding=1)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.gate = nn.Parameter(0.3 * torch.randn(2, D))
        self.head = nn.Linear(D, OUT)
        self.unused = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        x = x * (1 + torch.tanh(x @ self.gate.T).sum(-1, keepdim=True))
        return self.head(x)


def make_model(seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(BATCH, SEQ, D, generator=g), torch.randint(0, OUT, (BATCH, SEQ), generator=g)


#: name → (optimizer class, keyword arguments); every mode and both options of LiMuon, and Muon
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "muon": ("Muon", dict(lr=0.02, adamw_lr=0.02)),
    **{
        f"limuon-{mode}-{'r3' if rank else 'dense'}": (
            "LiMuon", dict(lr=0.02, adamw_lr=0.02, momentum=0.95, variance_reduction=mode, rank=rank,
                           weight_decay=0.01))
        for mode in ("exact", "approx", "none") for rank in (None, 3)
    },
}


def make_optimizer(config: str, model: nn.Module, **extra: Any) -> torch.optim.Optimizer:
    cls, kwargs = CONFIGS[config]
    return getattr(limuon, cls)(model.parameters(), **kwargs, **extra)


def pin_fp32_newton_schulz() -> None:
    """The tolerances are for fp32 Newton–Schulz on CPU: a CPU with bf16 matrix instructions defaults to
    bf16, which turns the fp32 differences of the gradient sums into bf16-sized ones (GPUs keep bf16).
    Set as the process default, not as ``ns_compute_dtype=``: torch.distributed.checkpoint cannot save a
    torch.dtype in the param groups."""
    lk.set_ns_compute_dtype("cpu", torch.float32)


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
          extra: nn.Parameter | None = None) -> None:
    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if extra is not None:  # a parameter outside the model: the same gradient on every rank
            loss = loss + 0.01 * (extra**2).sum()
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


class CountOrthogonalised:
    """Counts the matrices this process orthogonalises (to show the work is split across ranks): both ways a
    batch is orthogonalised, the fused update of one process and the owners' batch under DDP/FSDP2."""

    def __init__(self) -> None:
        self.count = 0
        self._originals = {name: getattr(_functional, name) for name in ("orthogonalize", "update_fused")}

    def __enter__(self) -> CountOrthogonalised:
        def recorder(original):
            def run(X: torch.Tensor, *args, **kwargs):
                self.count += X.shape[0]
                return original(X, *args, **kwargs)
            return run

        for name, original in self._originals.items():
            setattr(_functional, name, recorder(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(_functional, name, original)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], world: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by a process group."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, free_port(), backend, fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, port: int, backend: str, fn: Callable[..., None], args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    pin_fp32_newton_schulz()
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # A timeout turns a hang (ranks waiting in different collectives) into an error.
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    fn(rank, world, *args)
    dist.barrier()  # no rank tears down gloo while another still talks to it
    dist.destroy_process_group()
    # Skip the interpreter's teardown: a C++ thread object destroyed there (gloo, checkpoint I/O)
    # now and then aborts the process ("terminate called without an active exception") after all
    # the work is done and saved. Exit code 0 tells mp.spawn that this rank succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _local_batch(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_batch()
    per = BATCH // world
    return x[rank * per: (rank + 1) * per], y[rank * per: (rank + 1) * per]


def _wrap(engine: str, model: nn.Module, world: int) -> tuple[nn.Module, Any]:
    """The model under ``engine`` and the ``distributed_mesh`` argument to pass."""
    from torch.distributed.device_mesh import init_device_mesh

    if engine == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(next(model.parameters()).device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, None
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if engine == "ddp-mesh":
        return ddp, init_device_mesh("cpu", (world,))
    if engine == "ddp-group":
        return ddp, dist.group.WORLD
    return ddp, None  # "ddp-none": every rank does all the work


def train_configs(rank: int, world: int, engine: str, configs: list[str], steps: int, out_dir: str) -> None:
    """Train every config under ``engine``; save full parameters and orthogonalisation counts."""
    x, y = _local_batch(rank, world)
    results = {}
    for config in configs:
        model, mesh = _wrap(engine, make_model(), world)
        opt = make_optimizer(config, model, distributed_mesh=mesh)
        with CountOrthogonalised() as counter:
            train(model, opt, x, y, steps)
        results[config] = {"params": full_params(model), "orthogonalised": counter.count}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def failing_steps(rank: int, world: int, out_dir: str) -> None:
    """FSDP2: a NaN in one rank's shard, and a gradient on one rank only, must fail the step on every
    rank (no hang) and change nothing."""
    x, y = _local_batch(rank, world)
    model, _ = _wrap("fsdp", make_model(), world)
    opt = make_optimizer("limuon-exact-r3", model)
    train(model, opt, x, y, 2)
    before = full_params(model)
    state_before = _state_snapshot(opt)
    messages = []

    def nan_on_rank0() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if rank == 0:
            model.blocks[0].fc1.weight.grad.to_local()[0, 0] = float("nan")
        return loss

    def grad_on_rank0_only() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if rank == 0:
            model.unused.weight.grad = torch.zeros_like(model.unused.weight)
        return loss

    for closure in (nan_on_rank0, grad_on_rank0_only):
        try:
            opt.step(closure)
            messages.append(None)
        except RuntimeError as e:
            messages.append(f"{type(e).__name__}: {e}")
    after = full_params(model)
    state_after = _state_snapshot(opt)
    unchanged = all(torch.equal(before[k], after[k]) for k in before) and state_before.keys() == state_after.keys() \
        and all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    # A DTensor sharded on dim 0 but not in torch.chunk sizes (3 + 1 rows of 4) is refused.
    from torch.distributed.tensor import DTensor, Shard

    odd = DTensor.from_local(torch.zeros(3 if rank == 0 else 1, D), model.gate.device_mesh, [Shard(0)],
                             shape=torch.Size((4, D)), stride=(D, 1))
    try:
        limuon.Muon([nn.Parameter(odd)])
        messages.append(None)
    except ValueError as e:
        messages.append(str(e))
    torch.save({"messages": messages, "unchanged": unchanged}, os.path.join(out_dir, f"rank{rank}.pt"))


def nccl_triton_fsdp(rank: int, world: int, configs: list[str], steps: int, out_dir: str) -> None:
    """FSDP2 on CUDA with NCCL: train, and record which ops ran as Triton kernels."""
    import limuon_kernels.ops as ops

    used: set[str] = set()
    original = ops._triton_kernel

    def recording(name: str):
        used.add(name)
        return original(name)

    ops._triton_kernel = recording
    x, y = (t.cuda() for t in _local_batch(rank, world))
    results = {}
    for config in configs:
        model, _ = _wrap("fsdp", make_model().cuda(), world)
        opt = make_optimizer(config, model)
        train(model, opt, x, y, steps)
        results[config] = {"params": {k: v.cpu() for k, v in full_params(model).items()}}
    results["triton_ops"] = sorted(used)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def make_extra() -> nn.Parameter:
    return nn.Parameter(torch.randn(D, D, generator=torch.Generator().manual_seed(7)))


def grow(model: nn.Module, extra: nn.Parameter, x: torch.Tensor, y: torch.Tensor) -> None:
    """LiMuon (exact, rank 3) on the blocks for 2 steps; then a param group with the rest of the model
    and ``extra`` (a plain tensor of the shape of a sharded one) is added, and 2 more steps."""
    opt = limuon.LiMuon(list(model.blocks.parameters()), lr=0.02, adamw_lr=0.02, momentum=0.95,
                        variance_reduction="exact", rank=3, weight_decay=0.01)
    train(model, opt, x, y, 2, extra)
    rest = [p for name, p in model.named_parameters() if ".blocks." not in f".{name}"]
    opt.add_param_group({"params": [*rest, extra]})
    train(model, opt, x, y, 2, extra)


def grow_fsdp(rank: int, world: int, out_dir: str) -> None:
    model, _ = _wrap("fsdp", make_model(), world)
    extra = make_extra()
    grow(model, extra, *_local_batch(rank, world))
    torch.save({"params": {**full_params(model), "extra": extra.detach().clone()}},
               os.path.join(out_dir, f"rank{rank}.pt"))


def from_single_process(rank: int, world: int, config: str, out_dir: str) -> None:
    """2 steps in this process alone (no FSDP2), then its model and optimizer state_dicts are loaded into
    an FSDP2 model and optimizer, which take 2 more steps together."""
    x, y = make_batch()
    single = make_model()
    single_opt = make_optimizer(config, single)
    train(single, single_opt, x, y, 2)
    model = make_model(seed=1)
    model.load_state_dict(single.state_dict())
    model, _ = _wrap("fsdp", model, world)
    opt = make_optimizer(config, model)
    opt.load_state_dict(single_opt.state_dict())
    train(model, opt, *_local_batch(rank, world), 2)
    torch.save({"params": full_params(model)}, os.path.join(out_dir, f"rank{rank}.pt"))


def _state_snapshot(opt: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    return {(i, k): (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for i, st in enumerate(opt.state.values()) for k, v in st.items()}


def checkpoint_save(rank: int, world: int, config: str, ckpt: str, out_dir: str) -> None:
    """FSDP2: train 2 steps, save model and optimizer with torch.distributed.checkpoint, train 2 more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    x, y = _local_batch(rank, world)
    model, _ = _wrap("fsdp", make_model(), world)
    opt = make_optimizer(config, model)
    train(model, opt, x, y, 2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)
    # And a full (gathered, CPU) state dict, as saved by rank 0 alone.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=full),
             "optim": get_optimizer_state_dict(model, opt, options=full)}
    if rank == 0:
        torch.save(state, ckpt + ".full.pt")
    torch.save(opt.state_dict(), f"{ckpt}.rank{rank}.pt")  # and each rank's own
    train(model, opt, x, y, 2)
    torch.save({"params": full_params(model)}, os.path.join(out_dir, f"rank{rank}.pt"))


def checkpoint_load(rank: int, world: int, config: str, ckpt: str, out_dir: str, how: str = "dcp") -> None:
    """FSDP2: a fresh model (other initial weights) and optimizer, restored from ``ckpt``, 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    x, y = _local_batch(rank, world)
    model, _ = _wrap("fsdp", make_model(seed=1), world)
    opt = make_optimizer(config, model)
    if how == "per-rank":
        # The model from the DCP checkpoint; the optimizer from this rank's own state_dict() file.
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(model, state["model"])
        try:
            opt.load_state_dict(torch.load(f"{ckpt}.rank{rank % 2}.pt", weights_only=False))  # saved by 2 ranks
        except ValueError as e:
            torch.save({"error": str(e)}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        train(model, opt, x, y, 2)
        torch.save({"params": full_params(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
        return
    if how == "full":
        # The full state dict rank 0 saved, loaded by every rank (the missing state of the unused matrix:
        # strict=False, for the reason given below).
        state = torch.load(ckpt + ".full.pt", weights_only=False)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, opt, state["optim"], options=options)
        train(model, opt, x, y, 2)
        torch.save({"params": full_params(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
        return
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    # The unused matrix never had a gradient, so the checkpoint holds no state for it, while the
    # fresh optimizer was given some by get_optimizer_state_dict (a step on zero gradients with lr = 0,
    # as for every torch optimizer, torch.optim.AdamW included): load what the checkpoint has.
    dcp.load(state, checkpoint_id=ckpt, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, x, y, 2)
    torch.save({"params": full_params(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
