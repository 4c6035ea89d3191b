"""Process groups for data, pipeline and tensor parallelism, cut from one rank grid.

The world of DP x PP x TP ranks is laid out with TP innermost, so the ranks of a TP group are
adjacent (on one node, one NVLink domain, as long as TP fits in a node):

    rank = (dp_rank * pp_size + pp_rank) * tp_size + tp_rank

    world 8, dp 1, pp 2, tp 4:     tp groups  [0 1 2 3] [4 5 6 7]
                                   pp groups  [0 4] [1 5] [2 6] [3 7]

Layers ask `get_tp_group()` for their rank and size and never look at the world rank, which
stops meaning "TP rank" as soon as PP or DP exist. With nothing initialised every getter returns
a one-rank group whose collectives are the identity, so single-process code needs no setup.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from shardserve.config import ParallelConfig
    from shardserve.distributed.comm_timer import CommTimer
    from shardserve.distributed.custom_all_reduce import CustomAllReduce


class GroupCoordinator:
    """One communication group of this process: its ranks and the collectives over them.

    `device_group` carries tensors (nccl on CUDA, gloo on CPU); `cpu_group` is always gloo and
    carries metadata and Python objects, so they never need a device copy. `custom_all_reduce`,
    when set (TP groups within one node, see distributed/custom_all_reduce.py), takes the small
    all-reduces that NCCL would spend most of its time on.
    """

    def __init__(self, group_ranks: list[list[int]], rank: int, backend: str,
                 name: str) -> None:
        """Create every group in `group_ranks` and keep the one holding `rank`.

        torch.distributed.new_group is collective over the whole world: every process must
        create every group, in the same order, even the groups it is not part of.
        """
        self.name = name
        self.rank = rank
        self.ranks: list[int] = []
        self.device_group: dist.ProcessGroup | None = None
        self.cpu_group: dist.ProcessGroup | None = None
        self.custom_all_reduce: CustomAllReduce | None = None
        for ranks in group_ranks:
            device_group = dist.new_group(ranks, backend=backend)
            # gloo already runs on the CPU: one group serves both purposes.
            cpu_group = device_group if backend == "gloo" else dist.new_group(ranks, backend="gloo")
            if rank in ranks:
                self.ranks = list(ranks)
                self.device_group, self.cpu_group = device_group, cpu_group
        if not self.ranks:
            raise ValueError(f"Rank {rank} is in none of the {name} groups {group_ranks}.")
        self.rank_in_group = self.ranks.index(rank)
        self.world_size = len(self.ranks)

    @classmethod
    def single(cls, name: str = "single") -> "GroupCoordinator":
        """A one-rank group that needs no torch.distributed: every collective is the identity."""
        group = cls.__new__(cls)
        group.name, group.rank, group.ranks = name, 0, [0]
        group.device_group = group.cpu_group = None
        group.custom_all_reduce = None
        group.rank_in_group, group.world_size = 0, 1
        return group

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group. Reduces in place (callers pass fresh activations) and returns it.

        Small CUDA messages go through the custom all-reduce when the group has one (it
        declines, returning None, what it does not take); everything else through NCCL/gloo."""
        if self.world_size == 1:
            return tensor
        if self.custom_all_reduce is not None:
            out = self.custom_all_reduce.all_reduce(tensor)
            if out is not None:
                return out
        dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the group, in place (NCCL or gloo); returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.device_group)
        return tensor

    def init_custom_all_reduce(self, parallel_config: "ParallelConfig | None" = None) -> None:
        """Set up the custom all-reduce for this group when it can serve (collective over the
        group's ranks); otherwise all-reduces stay on NCCL and the reason is logged once."""
        from shardserve.distributed.custom_all_reduce import DEFAULT_MAX_BYTES, CustomAllReduce
        if self.world_size == 1 or self.device_group is None:
            return
        pc = parallel_config
        self.custom_all_reduce = CustomAllReduce.create(
            self,
            disabled=bool(pc and pc.disable_custom_all_reduce),
            max_bytes=pc.custom_all_reduce_max_bytes if pc else DEFAULT_MAX_BYTES,
            nnodes=(pc.nnodes or 1) if pc else 1,
            num_local_ranks=pc.num_local_ranks if pc else None,
            fuse_norm=not (pc and pc.disable_fused_all_reduce_norm))

    def can_fuse_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether `all_reduce_rms_norm` can take (x, residual) in one kernel (the custom
        all-reduce's fused path, layers/layernorm.py); otherwise the caller all-reduces and
        normalises separately, with the same bits."""
        return (self.world_size > 1 and self.custom_all_reduce is not None
                and self.custom_all_reduce.takes_rms_norm(x, residual))

    def all_reduce_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                            weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(all_reduce(x) + residual) * weight, all_reduce(x) + residual) in one
        kernel; only where `can_fuse_rms_norm` said so (not checked again here: this runs
        twice a layer)."""
        return self.custom_all_reduce.fused_rms_norm(x, residual, weight, eps)

    _TIMED = ("all_reduce", "all_reduce_rms_norm", "all_reduce_max", "all_gather", "gather")

    def enable_comm_timer(self, timer: "CommTimer") -> None:
        """Time this group's tensor collectives (see distributed/comm_timer.py). The timed
        methods shadow the plain ones on this instance only, so other groups pay nothing."""
        for name in self._TIMED:
            plain = getattr(type(self), name).__get__(self)
            setattr(self, name, _timed(timer, plain))

    def disable_comm_timer(self) -> None:
        for name in self._TIMED:
            self.__dict__.pop(name, None)

    def all_reduce_int(self, value: int, op: str = "min") -> int:
        """Reduce one integer over the group through the CPU group (min, max or sum)."""
        if self.world_size == 1:
            return int(value)
        ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
        box = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(box, op=ops[op], group=self.cpu_group)
        return int(box.item())

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order, on every rank."""
        if self.world_size == 1:
            return tensor
        dim = dim % tensor.dim()
        tensor = tensor.contiguous()
        stacked = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype,
                              device=tensor.device)
        if tensor.is_cuda:
            dist.all_gather_into_tensor(stacked, tensor, group=self.device_group)
        else:
            # gloo has no all_gather_into_tensor; the list form writes into the same storage.
            dist.all_gather(list(stacked.unbind(0)), tensor, group=self.device_group)
        return _concat_stacked(stacked, dim)

    def gather(self, tensor: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Concatenate along `dim` on rank `dst` of the group only; the others get None."""
        if self.world_size == 1:
            return tensor
        dim = dim % tensor.dim()
        tensor = tensor.contiguous()
        if self.rank_in_group == dst:
            stacked = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype,
                                  device=tensor.device)
            dist.gather(tensor, list(stacked.unbind(0)), dst=self.ranks[dst],
                        group=self.device_group)
            return _concat_stacked(stacked, dim)
        dist.gather(tensor, None, dst=self.ranks[dst], group=self.device_group)
        return None

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank `src`'s (in place) and return it."""
        if self.world_size == 1:
            return tensor
        dist.broadcast(tensor, src=self.ranks[src], group=self.device_group)
        return tensor

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Send a picklable object from rank `src` to all; every rank returns it."""
        if self.world_size == 1:
            return obj
        box = [obj if self.rank_in_group == src else None]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def send_tensor(self, tensor: torch.Tensor, dst: int | None = None) -> Any:
        """Start sending `tensor` to group rank `dst` (default: the next rank, as a pipeline
        stage hands on to the next); returns the work to wait() on. The tensor must stay
        alive, unchanged, until then."""
        if dst is None:
            dst = (self.rank_in_group + 1) % self.world_size
        return dist.isend(tensor.contiguous(), dst=self.ranks[dst], group=self.device_group)

    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    src: int | None = None) -> torch.Tensor:
        """Receive a tensor of `shape`/`dtype` from group rank `src` (default: the previous
        rank); blocks (on CUDA: the current stream waits) until it has arrived."""
        if src is None:
            src = (self.rank_in_group - 1) % self.world_size
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.irecv(tensor, src=self.ranks[src], group=self.device_group).wait()
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    def destroy(self) -> None:
        self.custom_all_reduce = None  # its buffer goes before the groups it was set up over
        for group in {id(g): g for g in (self.device_group, self.cpu_group) if g is not None}.values():
            dist.destroy_process_group(group)
        self.device_group = self.cpu_group = None

    def __repr__(self) -> str:
        return (f"GroupCoordinator({self.name}, ranks={self.ranks}, "
                f"rank_in_group={self.rank_in_group})")


def _timed(timer: "CommTimer", fn):
    def timed(*args, **kwargs):
        return timer.time(fn, *args, **kwargs)
    return timed


def _concat_stacked(stacked: torch.Tensor, dim: int) -> torch.Tensor:
    """[world, *shape] -> shape with dim multiplied by world, rank-major along dim."""
    world, shape = stacked.shape[0], stacked.shape[1:]
    moved = stacked.movedim(0, dim)  # [..., world, shape[dim], ...]
    return moved.reshape(*shape[:dim], world * shape[dim], *shape[dim + 1:])


_WORLD: GroupCoordinator | None = None
_TP: GroupCoordinator | None = None
_PP: GroupCoordinator | None = None
_DP: GroupCoordinator | None = None
_EP: GroupCoordinator | None = None
_SINGLE = {name: GroupCoordinator.single(name) for name in ("world", "tp", "pp", "dp", "ep")}


# init_method of a world whose store another process serves (local_launch.host_store).
STORE_SCHEME = "store://"


def init_distributed_environment(world_size: int = 1, rank: int = 0, backend: str | None = None,
                                 init_method: str = "env://", local_rank: int = -1,
                                 timeout_s: float = 600.0) -> None:
    """Join the torch.distributed world (once) and make the world group. init_method is
    torch's (tcp://, env://, file://) or store://HOST:PORT, a TCPStore another process serves
    (distributed/local_launch.host_store).

    backend defaults to nccl when CUDA is available and gloo otherwise; with nccl, `local_rank`
    picks this process's GPU before any group exists, as NCCL binds communicators to a device.
    """
    global _WORLD
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and local_rank >= 0:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if init_method.startswith(STORE_SCHEME):
            # A store served by the launching process (local_launch.host_store): every rank
            # is a client, so no rank has to bind a port that another process may have taken.
            host, _, port = init_method[len(STORE_SCHEME):].rpartition(":")
            store = dist.TCPStore(host, int(port), world_size, False, timeout=timeout)
            dist.init_process_group(backend=backend, store=store, world_size=world_size,
                                    rank=rank, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=init_method,
                                    world_size=world_size, rank=rank, timeout=timeout)
    elif dist.get_world_size() != world_size:
        raise RuntimeError(f"torch.distributed already runs with world size "
                           f"{dist.get_world_size()}, not {world_size}.")
    if _WORLD is None:
        _WORLD = GroupCoordinator([list(range(world_size))], dist.get_rank(),
                                  dist.get_backend(), "world")


def initialize_model_parallel(tensor_parallel_size: int = 1,
                              pipeline_parallel_size: int = 1,
                              enable_expert_parallel: bool = False,
                              parallel_config: "ParallelConfig | None" = None) -> None:
    """Cut the world into TP, PP and DP groups; DP takes whatever TP x PP leaves over.

    enable_expert_parallel: MoE layers place whole experts on the ranks of the TP group (the EP
    group is the TP group: attention stays TP-sharded over the same ranks) instead of slicing
    every expert over them; see get_ep_group().

    parallel_config: where the nodes' boundaries lie and the custom all-reduce settings
    (disable_custom_all_reduce, custom_all_reduce_max_bytes) for the TP group; None: defaults
    (custom all-reduce on wherever it can serve, nodes told apart by hostname)."""
    global _TP, _PP, _DP, _EP
    if _TP is not None:
        raise RuntimeError("Model parallel groups are already initialised; "
                           "call destroy_model_parallel() first.")
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if _WORLD is None:
        if tp * pp != 1:
            raise RuntimeError(f"TP={tp} x PP={pp} needs init_distributed_environment() first.")
        _TP, _PP, _DP, _EP = _SINGLE["tp"], _SINGLE["pp"], _SINGLE["dp"], _SINGLE["ep"]
        return
    world_size = _WORLD.world_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ValueError(f"World size {world_size} is not a multiple of TP={tp} x PP={pp}.")
    tp_groups, pp_groups, dp_groups = rank_grid_groups(world_size, tp, pp)
    backend = dist.get_backend()
    _TP = GroupCoordinator(tp_groups, _WORLD.rank, backend, "tp")
    _PP = GroupCoordinator(pp_groups, _WORLD.rank, backend, "pp")
    _DP = GroupCoordinator(dp_groups, _WORLD.rank, backend, "dp")
    # Same ranks as TP, so the same communicator serves: no extra group to create.
    _EP = _TP if enable_expert_parallel else _SINGLE["ep"]
    # Only TP all-reduces activations every layer; PP and DP never all-reduce tensors on a
    # step. After every new_group (collective over the whole world), as this talks within TP.
    _TP.init_custom_all_reduce(parallel_config)


def rank_grid_groups(world_size: int, tp: int,
                     pp: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The TP, PP and DP groups of a (dp, pp, tp) grid, TP innermost (see the module doc)."""
    dp = world_size // (tp * pp)
    grid = torch.arange(world_size).reshape(dp, pp, tp)
    tp_groups = grid.reshape(-1, tp).tolist()
    pp_groups = grid.transpose(1, 2).reshape(-1, pp).tolist()
    dp_groups = grid.permute(1, 2, 0).reshape(-1, dp).tolist()
    return tp_groups, pp_groups, dp_groups


def model_parallel_is_initialized() -> bool:
    return _TP is not None


def get_world_group() -> GroupCoordinator:
    return _WORLD or _SINGLE["world"]


def get_tp_group() -> GroupCoordinator:
    return _TP or _SINGLE["tp"]


def get_pp_group() -> GroupCoordinator:
    return _PP or _SINGLE["pp"]


def get_dp_group() -> GroupCoordinator:
    return _DP or _SINGLE["dp"]


def get_ep_group() -> GroupCoordinator:
    """The ranks that split the routed experts whole between them: the TP group under
    --enable-expert-parallel, else one rank (each TP rank then holds a slice of every expert)."""
    return _EP or _SINGLE["ep"]


def destroy_model_parallel() -> None:
    """Drop the TP/PP/DP groups (the world stays); a later initialize_model_parallel rebuilds."""
    global _TP, _PP, _DP, _EP
    for group in (_TP, _PP, _DP):
        if group is not None and group.device_group is not None:
            group.destroy()
    _TP = _PP = _DP = _EP = None  # _EP is _TP or a one-rank group: nothing of its own to destroy


def destroy_distributed_environment() -> None:
    """Drop every group and leave torch.distributed, so a process can join a new world."""
    global _WORLD
    destroy_model_parallel()
    _WORLD = None
    if dist.is_initialized():
        dist.destroy_process_group()
