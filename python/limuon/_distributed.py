"""Data-parallel execution of the matrix updates: DDP (replicated parameters) and FSDP2 (``DTensor``
parameters sharded on dim 0).

Newton–Schulz and the randomized SVD need whole matrices, the elementwise work (momentum, weight
decay, the update itself) does not. Every matrix therefore gets an *owner* rank, fixed for the life of
the optimizer. Per bucket of same-shape matrices:

    local stack (B, m_local, n) ──to_owners──▶ owned matrices (B_own, m, n) ──NS / RSVD──▶
    owned updates (B_own, m, n) ──from_owners──▶ local stack (B, m_local, n)

* ``local``: one process, or a plain tensor without ``distributed_mesh``: every matrix is owned,
  both moves are the identity (the single-process code path, unchanged).
* ``replicated`` (DDP, ``distributed_mesh=``): every rank holds whole matrices; ``to_owners`` keeps
  the owned ones, ``from_owners`` is one all-gather.
* ``sharded`` (FSDP2): rank ``k`` holds rows ``[k·c, min((k+1)·c, m))`` with ``c = ⌈m / world⌉``
  (``torch.chunk``, so trailing ranks may hold none); both moves are one ``all_to_all_single``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch.distributed may be built without DTensor support (it is not on some platforms)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - depends on the torch build
    DeviceMesh = DTensor = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: the local shard of a ``DTensor``, else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def wrap_like(param: Tensor, local_tensor: Tensor) -> Tensor:
    """``local_tensor`` (this rank's part of a tensor shaped like ``param``) as a ``DTensor`` sharded as
    ``param`` is; ``local_tensor`` itself when ``param`` is a plain tensor. Shares its storage."""
    if not is_dtensor(param):
        return local_tensor
    return DTensor.from_local(local_tensor, device_mesh=param.device_mesh, placements=param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())


def wrap_rows(param: Tensor, local_tensor: Tensor) -> Tensor:
    """``local_tensor`` (this rank's rows of a tensor whose dim 0 is ``param``'s, e.g. the low-rank factors
    ``(E, m, r)`` of expert weights ``(E, m, n)``) as a ``DTensor`` sharded on dim 0 as ``param`` is;
    ``local_tensor`` itself when ``param`` is a plain tensor. Shares its storage."""
    if not is_dtensor(param):
        return local_tensor
    shape = torch.Size((param.shape[0], *local_tensor.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor, device_mesh=param.device_mesh, placements=param.placements,
                              run_check=False, shape=shape, stride=stride)


def resolve_group(distributed_mesh: Any) -> dist.ProcessGroup | None:
    """The process group a ``distributed_mesh`` argument names (``None``: no distribution)."""
    if distributed_mesh is None:
        return None
    is_mesh = DeviceMesh is not None and isinstance(distributed_mesh, DeviceMesh)
    if not (is_mesh or (dist.is_available() and isinstance(distributed_mesh, dist.ProcessGroup))):
        raise ValueError(
            f"Invalid distributed_mesh: {type(distributed_mesh).__name__}; expected None, a 1-D DeviceMesh or a "
            "torch.distributed ProcessGroup"
        )
    if not dist.is_initialized():
        raise ValueError(
            "Invalid distributed_mesh: torch.distributed is not initialised (call "
            "torch.distributed.init_process_group first, or pass distributed_mesh=None)"
        )
    if is_mesh:
        if distributed_mesh.ndim != 1:
            raise ValueError(
                f"Invalid distributed_mesh: a DeviceMesh with {distributed_mesh.ndim} dimensions; expected a "
                "1-D mesh (the data-parallel dimension) or a ProcessGroup"
            )
        return distributed_mesh.get_group()
    return distributed_mesh


def check_dtensor_param(label: str, p: Tensor) -> None:
    """Refuse ``DTensor`` layouts other than FSDP2's: sharded on dim 0 over a 1-D mesh."""
    if not is_dtensor(p):
        return
    if p.device_mesh.ndim != 1 or len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(
            f"Invalid {label}: a DTensor with placements {p.placements} on a "
            f"{p.device_mesh.ndim}-D mesh; limuon supports DTensor parameters sharded on dim 0 over a 1-D mesh "
            "(FSDP2's fully_shard), or plain tensors"
        )
    start, stop = local_rows(p)
    held = local(p).shape[0]
    if held != stop - start:
        raise ValueError(
            f"Invalid {label}: rank {p.device_mesh.get_local_rank()} holds "
            f"{held} of its rows; Shard(0) holds {stop - start} (torch.chunk sizes, as FSDP2's fully_shard); "
            "limuon needs that"
        )


def _check_saved_sharding(where: str, p: Tensor, value: Tensor) -> Tensor:
    """A loaded ``DTensor`` state entry, refused unless sharded exactly as its parameter is."""
    if not is_dtensor(p):
        raise ValueError(
            f"{where} is a DTensor (saved under FSDP2) but the parameter is a plain tensor; save a full state "
            "dict (torch.distributed.checkpoint.state_dict, StateDictOptions(full_state_dict=True)) instead"
        )
    if value.device_mesh != p.device_mesh or value.placements != p.placements:
        raise ValueError(
            f"{where} was saved sharded over {value.device_mesh} as {value.placements}, the parameter is sharded "
            f"over {p.device_mesh} as {p.placements}; a per-rank state dict loads at the same world size only "
            "(use torch.distributed.checkpoint or a full state dict to change it)"
        )
    return value


def adapt_to_param(label: str, key: str, p: Tensor, value: Tensor) -> Tensor:
    """Loaded parameter-shaped state ``value`` laid out as parameter ``p`` is: a whole plain tensor for
    a ``DTensor`` parameter is cut to this rank's rows; a ``DTensor`` saved for another mesh or sharding,
    or for a plain parameter, is refused (all ranks see the same mismatch, so all raise)."""
    where = f"Invalid state_dict: state {key!r} of {label}"
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"{where} has shape {tuple(value.shape)}")
    if is_dtensor(value):
        return _check_saved_sharding(where, p, value)
    if not is_dtensor(p):
        return value
    start, stop = local_rows(p)
    return wrap_like(p, value.reshape(p.shape)[start:stop].to(device=local(p).device).clone())


def adapt_rows(label: str, key: str, p: Tensor, value: Tensor) -> Tensor:
    """Loaded state ``value`` whose dim 0 indexes the matrices of a stacked parameter ``p`` (the low-rank
    factors of ``matrix_view="batch"``), laid out as ``p`` is: a whole plain tensor for a ``DTensor``
    parameter is cut to this rank's matrices; a ``DTensor`` saved for another mesh or sharding, or for
    a plain parameter, is refused (before anything changes: all ranks see the same mismatch)."""
    where = f"Invalid state_dict: state {key!r} of {label}"
    if value.ndim == 0 or value.shape[0] != p.shape[0]:
        raise ValueError(f"{where} has shape {tuple(value.shape)}; its first dimension must be the parameter's")
    if is_dtensor(value):
        return _check_saved_sharding(where, p, value)
    if not is_dtensor(p):
        return value.to(device=p.device)
    start, stop = local_rows(p)
    return wrap_rows(p, value[start:stop].to(device=local(p).device).clone())


def shard_rows(m: int, world: int) -> list[int]:
    """Rows of an ``m``-row matrix held by each rank under ``Shard(0)`` (``torch.chunk`` sizes)."""
    chunk = -(-m // world)
    return [max(0, min(chunk, m - k * chunk)) for k in range(world)]


def local_rows(p: Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of ``DTensor`` parameter ``p`` that this rank holds under ``Shard(0)``."""
    rows = shard_rows(p.shape[0], p.device_mesh.size())
    rank = p.device_mesh.get_local_rank()
    start = sum(rows[:rank])
    return start, start + rows[rank]


_INDICES: dict[tuple, Tensor] = {}


def _index(idx: list[int], device: torch.device) -> Tensor:
    """``idx`` as a long tensor on ``device``, built once per (list, device): no host-to-device copy per step."""
    key = (tuple(idx), str(device))
    t = _INDICES.get(key)
    if t is None:
        if len(_INDICES) > 4096:  # (bounded: layouts that keep changing)
            _INDICES.clear()
        t = _INDICES[key] = torch.tensor(idx, dtype=torch.long, device=device)
    return t


def take(stack: Tensor, idx: list[int]) -> Tensor:
    """``stack[idx]`` along dim 0 (also for an empty ``idx``)."""
    return stack.index_select(0, _index(idx, stack.device))


def reduce_flags(group: dist.ProcessGroup | None, flags: Tensor) -> tuple[Tensor, Tensor]:
    """(any rank, every rank) of each 0/1 flag, with one all-reduce; ``flags`` itself when local."""
    if group is None:
        return flags, flags
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group)) \
        else torch.device("cpu")
    both = torch.cat([flags, 1 - flags]).to(device=device, dtype=torch.int32)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    n = flags.numel()
    return both[:n], 1 - both[n:]


class Distribution:
    """Who owns which matrix, for one optimizer.

    A matrix's owner is ``position % world``. Positions are handed out once, in parameter order, and
    never change (also when param groups are added later: under FSDP2 the low-rank factors of a matrix
    live on its owner). Same-shape matrices get consecutive positions, starting at the number of
    matrices seen before the first of their shape, so a shape's matrices spread over consecutive
    ranks and single matrices of different shapes over different ranks.
    """

    def __init__(self, distributed_mesh: Any) -> None:
        self.replicated_group = resolve_group(distributed_mesh)
        self.mesh = self.sharded_group = None
        #: the group whose ranks must agree on every step (gradient checks), if any
        self.group = self.replicated_group
        self._position: dict[int, int] = {}
        self._count: dict[Any, int] = {}
        self._offset: dict[Any, int] = {}

    def update(self, params: list[Tensor]) -> None:
        """Take in the optimizer's current parameters (positions of known ones are kept)."""
        meshes = {p.device_mesh for p in params if is_dtensor(p)}
        if len(meshes) > 1:
            raise ValueError("Invalid params: DTensor parameters on different device meshes; limuon needs one mesh")
        self.mesh = next(iter(meshes)) if meshes else None
        self.sharded_group = self.mesh.get_group() if self.mesh is not None else None
        if self.sharded_group is not None and self.replicated_group is not None \
                and dist.get_process_group_ranks(self.sharded_group) != \
                dist.get_process_group_ranks(self.replicated_group):
            raise ValueError(
                "Invalid distributed_mesh: it differs from the device mesh of the DTensor parameters (under FSDP2 "
                "leave distributed_mesh=None: the mesh is taken from the parameters)"
            )
        self.group = self.sharded_group or self.replicated_group
        for p in params:
            if p.ndim < 2 or id(p) in self._position:
                continue
            key = ((p.shape[0], p.numel() // max(p.shape[0], 1)), p.dtype)
            self._offset.setdefault(key, len(self._position))
            self._position[id(p)] = self._offset[key] + self._count.get(key, 0)
            self._count[key] = self._count.get(key, 0) + 1

    def owner(self, p: Tensor, world: int) -> int:
        return self._position[id(p)] % world

    def shard_world_rank(self) -> tuple[int, int]:
        """(world size, this rank) of the FSDP2 mesh's group."""
        return dist.get_world_size(self.sharded_group), dist.get_rank(self.sharded_group)

    def owns(self, p: Tensor) -> bool:
        """Whether this rank owns the sharded matrix ``p``."""
        world, rank = self.shard_world_rank()
        return self.owner(p, world) == rank

    def layout(self, params: list[Tensor], shape: tuple[int, int], counts: list[int] | None = None,
               whole: bool = False) -> BucketLayout:
        """How the matrices of ``params`` (one bucket, global 2-D ``shape``; ``counts[j]``: how many of
        them parameter ``j`` holds here, 1 by default) move to and from their owners. The matrices of
        one parameter share its owner. ``whole``: every rank holds whole matrices of its own (the experts
        of a ``matrix_view="batch"`` ``DTensor``, sharded on the expert dim): nothing moves."""
        counts = [1] * len(params) if counts is None else counts
        if is_dtensor(params[0]) and not whole:
            group, mode = self.sharded_group, "sharded"
        elif self.replicated_group is not None and not is_dtensor(params[0]):
            group, mode = self.replicated_group, "replicated"
        else:
            return BucketLayout(None, "local", 1, 0, [0] * len(params), shape, [shape[0]], counts)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if world == 1:  # (nothing to distribute: the single-process step, fused and bit for bit the same)
            return BucketLayout(None, "local", 1, 0, [0] * len(params), shape, [shape[0]], counts)
        owners = [self.owner(p, world) for p in params]
        # (The rows a rank holds were checked against these sizes when the parameter was added.)
        rows = shard_rows(shape[0], world) if mode == "sharded" else [shape[0]] * world
        return BucketLayout(group, mode, world, rank, owners, shape, rows, counts)


@dataclass
class BucketLayout:
    """Owners of one bucket's parameters, and the moves of its ``(B, m, n)`` stacks (``B``: the matrices,
    ``counts[j]`` consecutive ones per parameter ``j``, all owned by ``param_owners[j]``)."""

    group: dist.ProcessGroup | None
    mode: str  # "local", "replicated" or "sharded"
    world: int
    rank: int
    param_owners: list[int]
    shape: tuple[int, int]
    rows: list[int]
    counts: list[int]

    def __post_init__(self) -> None:
        #: the owner of each matrix of the stack
        self.owners = [o for o, c in zip(self.param_owners, self.counts) for _ in range(c)]
        #: the matrices (stack positions) and the parameters (bucket positions) this rank owns
        self.owned = [j for j, o in enumerate(self.owners) if o == self.rank]
        self.owned_params = [j for j, o in enumerate(self.param_owners) if o == self.rank]
        self._by_owner = [[j for j, o in enumerate(self.owners) if o == k] for k in range(self.world)]

    def to_owners(self, stack: Tensor) -> Tensor:
        """``(B, m_local, ...)`` on every rank → ``(B_own, m, ...)``: the owned matrices, whole."""
        if self.mode == "local":
            return stack
        if self.mode == "replicated":
            return stack if len(self.owned) == len(self.owners) else take(stack, self.owned)
        trailing = stack.shape[2:]
        send = torch.cat([take(stack, idx).reshape(-1) for idx in self._by_owner])
        per_row = trailing.numel()
        in_splits = [len(idx) * self.rows[self.rank] * per_row for idx in self._by_owner]
        out_splits = [len(self.owned) * r * per_row for r in self.rows]
        recv = stack.new_empty(sum(out_splits))
        dist.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=self.group)
        parts = [part.view(len(self.owned), r, *trailing) for part, r in zip(recv.split(out_splits), self.rows)]
        return torch.cat(parts, dim=1)

    def from_owners(self, owned: Tensor) -> Tensor:
        """``(B_own, m, ...)`` on each owner → ``(B, m_local, ...)`` on every rank (the inverse move)."""
        if self.mode == "local":
            return owned
        B, trailing = len(self.owners), owned.shape[1:]
        if self.mode == "replicated":
            # All-gather with every rank's share padded to the largest one; then back to bucket order.
            most = max(len(idx) for idx in self._by_owner)
            padded = owned.new_zeros(most, *trailing)
            padded[: len(self.owned)] = owned
            gathered = owned.new_empty(self.world * most, *trailing)
            dist.all_gather_into_tensor(gathered, padded, group=self.group)
            out = owned.new_empty(B, *trailing)
            for k, idx in enumerate(self._by_owner):
                if idx:
                    out.index_copy_(0, _index(idx, out.device), gathered[k * most: k * most + len(idx)])
            return out
        rest = trailing[1:]
        per_row = rest.numel()
        starts = [sum(self.rows[:k]) for k in range(self.world)]
        send = torch.cat([owned[:, s: s + r].reshape(-1) for s, r in zip(starts, self.rows)])
        in_splits = [len(self.owned) * r * per_row for r in self.rows]
        mine = self.rows[self.rank]
        out_splits = [len(idx) * mine * per_row for idx in self._by_owner]
        recv = owned.new_empty(sum(out_splits))
        dist.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=self.group)
        out = owned.new_empty(B, mine, *rest)
        for idx, part in zip(self._by_owner, recv.split(out_splits)):
            if idx:
                out.index_copy_(0, _index(idx, out.device), part.view(len(idx), mine, *rest))
        return out
