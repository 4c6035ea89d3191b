"""A fast all-reduce for small messages between the GPUs of one node, over symmetric memory.

Why: a batch-1 decode step of Llama-3-8B all-reduces 65 messages of 8 KB (2 per layer + the
embedding); NCCL spends ~10-20 us on each however small it is, ~1 ms a step, half as long as
the step's weight traffic on 2 GPUs. Here every rank owns one buffer that all peers can address through
NVLink peer-to-peer pointers (torch.distributed._symmetric_memory), and one kernel per call
copies the local input into it, waits at a barrier on signal pads, and sums the peers'
buffers straight into the output:

    one-shot (small messages)             two-shot (medium messages)
    rank r: input ──copy──▶ buf[r]        rank r: input ──copy──▶ buf[r]
            barrier                               barrier
            out = buf[0] + .. + buf[W-1]          buf[*][slice r] = sum over ranks of slice r
            barrier (peers done reading)          barrier; out = concat of every buf[j][slice j]
                                                  barrier

One-shot reads W x the message per rank but has one step: it wins while latency dominates.
Two-shot moves 2 x the message in total and wins once bandwidth does. Beyond the buffer's
size, and for anything the kernels do not take (other dtypes, odd sizes, unaligned views),
the group's NCCL all-reduce runs as before.

Multicast (NVLS): never. Only `one_shot_all_reduce(_copy)_out` and `two_shot_all_reduce_out`
run, and they touch nothing but the peers' buffer pointers and signal pads (peer-to-peer).
But torch's rendezvous creates a multicast object for the buffer whenever the GPU supports
it, which on the shared machines can take GPUs out of service; so this path is refused unless
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is in the environment (and a non-CUDA symmetric-memory
backend such as NVSHMEM, which sets up its own NVLS, is refused too).

The same buffer also serves `all_reduce_rms_norm`: one Triton kernel that all-reduces a
decoder sublayer's partial output and applies the residual add and RMSNorm after it
(kernels/all_reduce_rms_norm.py), for one-shot-sized messages.

CUDA graphs: the buffer is allocated and rendezvoused once, before any capture; each call
is one (or two) kernels on the current stream writing into the caller's tensor, with no
allocation and no host synchronisation, so a captured call replays with new inputs.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import warnings
from typing import TYPE_CHECKING, Mapping

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from shardserve.distributed.parallel_state import GroupCoordinator

logger = logging.getLogger(__name__)

MiB = 1 << 20
KiB = 1 << 10
SUPPORTED_WORLD_SIZES = (2, 4, 8)  # the kernels are specialised for these (two-shot: only these)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)  # what the kernels dispatch on (no fp16)
DEFAULT_MAX_BYTES = 8 * MiB  # the buffer: decode batches up to 1024 tokens x 4096 bf16
# Largest message sent one-shot, per world size; larger ones up to the buffer go two-shot.
# One-shot reads world_size x the message per rank, so its break-even falls as the world
# grows. Starting points from vLLM's custom all-reduce; re-measure with
# benchmarks/all_reduce_bench.py and adjust.
ONE_SHOT_MAX_BYTES = {2: 512 * KiB, 4: 256 * KiB, 8: 128 * KiB}
MULTICAST_OFF_ENV = "TORCH_SYMM_MEM_DISABLE_MULTICAST"
ONE_SHOT, TWO_SHOT = "one_shot", "two_shot"


def config_reason_off(group_ranks: list[int], backend: str, disabled: bool, max_bytes: int,
                      nnodes: int = 1, num_local_ranks: int | None = None) -> str | None:
    """Why the custom all-reduce cannot serve this group, from settings every rank shares
    (so every rank reaches the same answer without talking); None: no reason yet.

    Node r hosts the ranks [r * num_local_ranks, (r + 1) * num_local_ranks) (ParallelConfig),
    so a TP group stays on one node when its ranks all divide down to the same node."""
    if disabled:
        return "disabled (--disable-custom-all-reduce)"
    if max_bytes <= 0:
        return "custom_all_reduce_max_bytes is 0 (or under 16)"
    if len(group_ranks) not in SUPPORTED_WORLD_SIZES:
        return f"group size {len(group_ranks)} is not one of {SUPPORTED_WORLD_SIZES}"
    if backend != "nccl":
        return f"the device group's backend is {backend}, not nccl (CUDA)"
    if nnodes > 1 and num_local_ranks:
        nodes = {rank // num_local_ranks for rank in group_ranks}
        if len(nodes) > 1:
            return f"the group spans nodes {sorted(nodes)} (no NVLink peer access between nodes)"
    return None


def local_reason_off(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this process cannot take the path: the multicast guard, CUDA, the torch API."""
    env = os.environ if environ is None else environ
    if env.get(MULTICAST_OFF_ENV) != "1":
        return (f"{MULTICAST_OFF_ENV}=1 is not set (torch's symmetric-memory rendezvous would "
                "set up NVLink multicast, which this server never uses)")
    if env.get("TORCH_SYMMMEM", "CUDA").upper() != "CUDA":
        return f"TORCH_SYMMMEM={env['TORCH_SYMMMEM']}: only the CUDA (peer-to-peer) backend is used"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as exc:
        return f"torch.distributed._symmetric_memory does not import ({exc})"
    ops = getattr(torch.ops, "symm_mem", None)
    if ops is None or not hasattr(ops, "one_shot_all_reduce_out"):
        return "this torch has no symm_mem.one_shot_all_reduce_out"
    return None


def peers_reason_off(infos: list[tuple[str, int, str | None]]) -> str | None:
    """Why the group as a whole cannot take the path, from every rank's (hostname, CUDA device
    index, local reason); the same answer on every rank, as they all see the same list."""
    for rank, (_, _, reason) in enumerate(infos):
        if reason is not None:
            return f"rank {rank} of the group: {reason}"
    hosts = {host for host, _, _ in infos}
    if len(hosts) > 1:
        return f"the group spans hosts {sorted(hosts)}"
    devices = [device for _, device, _ in infos]
    if len(set(devices)) != len(devices):
        # Each rank must name its peers' GPUs in its own numbering: one GPU per process
        # through CUDA_VISIBLE_DEVICES hides them.
        return f"the ranks' CUDA device indices {devices} are not distinct"
    return None


def p2p_reason_off(device: int, peer_devices: list[int]) -> str | None:
    """Why this GPU cannot read the others' memory directly (None: it can)."""
    count = torch.cuda.device_count()
    for peer in peer_devices:
        if peer == device:
            continue
        if peer >= count or not torch.cuda.can_device_access_peer(device, peer):
            return f"cuda:{device} cannot access cuda:{peer} peer-to-peer"
    return None


def _alignment(nbytes: int) -> int:
    """The largest vector width (16, 8, 4, 2, 1 bytes) dividing nbytes, as the kernels see it."""
    for width in (16, 8, 4, 2):
        if nbytes % width == 0:
            return width
    return 1


def pick_algorithm(nbytes: int, offset_bytes: int, one_shot_max_bytes: int,
                   two_shot_max_bytes: int) -> str | None:
    """ONE_SHOT, TWO_SHOT or None (NCCL) for a contiguous message of a supported dtype.

    The kernels move 4-byte (or wider) vectors, read the caller's tensor with the buffer's
    alignment and write the result with it: so the size must be a multiple of 4 bytes and the
    tensor's start at least as aligned as its size."""
    if nbytes <= 0 or nbytes % 4 or _alignment(offset_bytes) < _alignment(nbytes):
        return None
    if nbytes <= one_shot_max_bytes:
        return ONE_SHOT
    if nbytes <= two_shot_max_bytes:
        return TWO_SHOT
    return None


class CustomAllReduce:
    """Sum-all-reduce of small CUDA tensors over one group's symmetric buffer (see the module
    doc). Build with `create()`, which returns None (and says why) when it cannot serve."""

    def __init__(self, group: "GroupCoordinator", buffer: torch.Tensor, handle,
                 one_shot_max_bytes: int, two_shot_max_bytes: int,
                 fused_norm_bytes: int = 0) -> None:
        """buffer: the symmetric allocation; its first two_shot_max_bytes serve torch's
        all-reduce kernels, the fused_norm_bytes after them the fused all-reduce + RMSNorm
        (0: not fused)."""
        self.group_name: str = group.device_group.group_name
        self.world_size = group.world_size
        self.buffer = buffer[:two_shot_max_bytes]  # uint8, allocated by symm_mem.empty
        self._handle = handle  # the rendezvous: keeps the peers' mappings alive
        self.max_bytes = self.buffer.numel()
        self.one_shot_max_bytes = min(one_shot_max_bytes, self.max_bytes)
        ops = torch.ops.symm_mem
        self._has_two_shot = hasattr(ops, "two_shot_all_reduce_out")
        self.two_shot_max_bytes = self.max_bytes if self._has_two_shot else self.one_shot_max_bytes
        # One kernel instead of a copy and a kernel (torch >= 2.8 or so).
        self._has_fused_copy = hasattr(ops, "one_shot_all_reduce_copy_out")
        self._views = {dtype: self.buffer.view(dtype) for dtype in SUPPORTED_DTYPES}
        self._norm = (_FusedNormSetup.create(handle, buffer, self.world_size, self.max_bytes,
                                             fused_norm_bytes) if fused_norm_bytes else None)
        self._cpu_group = group.cpu_group

    @classmethod
    def create(cls, group: "GroupCoordinator", disabled: bool = False,
               max_bytes: int = DEFAULT_MAX_BYTES, nnodes: int = 1,
               num_local_ranks: int | None = None,
               one_shot_max_bytes: int | None = None,
               fuse_norm: bool = True) -> "CustomAllReduce | None":
        """Set the path up for `group` (collective over its ranks), or None with the reason
        logged. Every rank returns the same kind of answer: the checks that could differ
        between ranks are agreed on over the group's CPU group before anything collective."""
        max_bytes = max_bytes // 16 * 16  # whole 16-byte vectors: a view as any dtype fits
        backend = dist.get_backend(group.device_group) if group.device_group is not None else ""
        reason = config_reason_off(group.ranks, backend, disabled, max_bytes, nnodes,
                                   num_local_ranks)
        if reason is not None:
            _log_off(group, reason, logging.INFO)
            return None

        device = _current_device()
        mine = (socket.gethostname(), device, local_reason_off())
        infos: list = [None] * group.world_size
        dist.all_gather_object(infos, mine, group=group.cpu_group)
        reason = peers_reason_off([tuple(info) for info in infos])
        if reason is not None:
            _log_off(group, reason, logging.INFO)
            return None

        # Imported here: the kernels' modules pick Triton's mode (GPU or interpreter) when
        # first imported, which importing this module must not decide.
        from shardserve.kernels.all_reduce_rms_norm import region_bytes
        if one_shot_max_bytes is None:
            one_shot_max_bytes = ONE_SHOT_MAX_BYTES[group.world_size]
        # The fused all-reduce + RMSNorm's own region: messages up to the one-shot size.
        fused_norm_bytes = (region_bytes(group.world_size,
                                         min(one_shot_max_bytes, max_bytes) // 16 * 16)
                            if fuse_norm else 0)
        buffer, local_error = None, p2p_reason_off(device, [info[1] for info in infos])
        if local_error is None:
            try:
                buffer = _allocate(max_bytes + fused_norm_bytes, device)
            except Exception as exc:  # noqa: BLE001 - any failure means NCCL, said once
                local_error = f"allocating the symmetric buffer failed: {exc!r}"
        if not _agree(group, local_error):
            return None
        handle, local_error = None, None
        try:
            handle = _rendezvous(buffer, group.device_group.group_name)
        except Exception as exc:  # noqa: BLE001
            local_error = f"the symmetric-memory rendezvous failed: {exc!r}"
        if not _agree(group, local_error):
            return None
        custom = cls(group, buffer, handle, one_shot_max_bytes, max_bytes, fused_norm_bytes)
        # All ranks fused or none: a rank at the fused kernel's barrier and a peer in torch's
        # all-reduce would wait for each other forever.
        if group.all_reduce_int(int(custom._norm is not None), "min") == 0:
            custom._norm = None
        if group.is_first_rank:
            logger.info("%s group %s: custom all-reduce on (one-shot <= %d KiB, two-shot <= %d "
                        "KiB, NCCL above; fused with the next RMSNorm: %s)", group.name,
                        group.ranks, custom.one_shot_max_bytes // KiB,
                        custom.two_shot_max_bytes // KiB,
                        "yes" if custom._norm is not None else "no")
        return custom

    def algorithm_for(self, tensor: torch.Tensor) -> str | None:
        """Which kernel takes `tensor`, or None when NCCL must.

        It looks only at dtype, size and view layout, which the same code gives every rank,
        so all ranks pick the same path: one rank in NCCL and another at the custom kernel's
        barrier would wait for each other forever."""
        if not tensor.is_cuda or tensor.dtype not in self._views or not tensor.is_contiguous():
            return None
        size = tensor.element_size()
        return pick_algorithm(tensor.numel() * size, tensor.storage_offset() * size,
                              self.one_shot_max_bytes, self.two_shot_max_bytes)

    def all_reduce(self, tensor: torch.Tensor, algorithm: str | None = None) -> torch.Tensor | None:
        """Sum `tensor` over the group in place and return it; None (nothing done) when the
        message is not for this path. `algorithm` forces one (benchmarks, tests)."""
        if algorithm is None:
            algorithm = self.algorithm_for(tensor)
            if algorithm is None:
                return None
        flat = tensor.view(-1)
        staged = self._views[tensor.dtype][:flat.numel()]
        ops = torch.ops.symm_mem
        if algorithm == ONE_SHOT:
            if self._has_fused_copy:
                # In place is safe: each thread reads its input slice into the buffer before
                # the barrier and writes the same slice of the output after it.
                ops.one_shot_all_reduce_copy_out(staged, flat, "sum", self.group_name, flat)
            else:
                staged.copy_(flat)
                ops.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        elif algorithm == TWO_SHOT:
            staged.copy_(flat)
            ops.two_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        else:
            raise ValueError(f"unknown all-reduce algorithm {algorithm!r}")
        return tensor

    def takes_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether `all_reduce_rms_norm` takes (x, residual): within the fused kernel's slab and
        row limit, contiguous, same shape and dtype (or no residual). Like `algorithm_for`, it
        sees only what every rank shares."""
        norm = self._norm
        return (norm is not None and x.is_cuda and x.dtype in FUSED_NORM_DTYPES
                and x.is_contiguous() and x.dim() >= 1
                and (residual is None or (residual.is_contiguous() and residual.shape == x.shape
                                          and residual.dtype == x.dtype))
                and 0 < x.shape[-1] <= FUSED_NORM_MAX_HIDDEN
                and x.numel() // x.shape[-1] <= norm.max_rows
                and x.numel() * x.element_size() <= norm.slab_bytes)

    def all_reduce_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                            weight: torch.Tensor, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RMSNorm(all_reduce(x) + residual) and the new residual, in one kernel; None
        (nothing done) when the message is not for it. x is not modified."""
        if not self.takes_rms_norm(x, residual):
            return None
        return self.fused_rms_norm(x, residual, weight, eps)

    def fused_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """all_reduce_rms_norm for (x, residual) that `takes_rms_norm` has already accepted."""
        from shardserve.kernels.all_reduce_rms_norm import all_reduce_rms_norm
        norm = self._norm
        row_bytes = x.shape[-1] * x.element_size()
        if row_bytes != norm.row_bytes:
            # The kernel's slots are laid out by row width: change it only once no peer can
            # still be reading the old layout. A server has one width (the model's hidden
            # size), set by the first (eager) step; tests and benchmarks change it.
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the fused all-reduce + RMSNorm's row width changed inside "
                                   "a CUDA graph capture; run one call eagerly first")
            torch.cuda.synchronize()
            dist.barrier(group=self._cpu_group)
            norm.row_bytes = row_bytes
        return all_reduce_rms_norm(x, residual, weight, eps, norm.buffer_ptrs,
                                   norm.region_offset, norm.slab_bytes, norm.signal_pad_ptrs,
                                   norm.rank, self.world_size, norm.slot_base, norm.max_rows)

    def __repr__(self) -> str:
        return (f"CustomAllReduce(world={self.world_size}, one_shot<={self.one_shot_max_bytes}, "
                f"two_shot<={self.two_shot_max_bytes})")


FUSED_NORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FUSED_NORM_MAX_HIDDEN = 16384  # one row per program pass: a BLOCK of registers at most this


class _FusedNormSetup:
    """What the fused all-reduce + RMSNorm kernel needs from the rendezvous: every rank's
    buffer and signal-pad address (int64 on the GPU, group-rank order), its region of the
    buffer (offset, and the slab size = the largest message), this rank, the first signal-pad
    slot it may use (the upper half; torch's kernels use the lower), the most rows a call may
    have, and the row width in use (see CustomAllReduce.all_reduce_rms_norm)."""

    def __init__(self, buffer_ptrs: torch.Tensor, signal_pad_ptrs: torch.Tensor, rank: int,
                 slot_base: int, max_rows: int, region_offset: int, slab_bytes: int) -> None:
        self.buffer_ptrs, self.signal_pad_ptrs = buffer_ptrs, signal_pad_ptrs
        self.rank, self.slot_base, self.max_rows = rank, slot_base, max_rows
        self.region_offset, self.slab_bytes = region_offset, slab_bytes
        self.row_bytes = 0

    @classmethod
    def create(cls, handle, buffer: torch.Tensor, world_size: int, region_offset: int,
               region_size: int) -> "_FusedNormSetup | None":
        from shardserve.kernels.all_reduce_rms_norm import MAX_ROWS, clear_region
        try:
            buffer_ptrs, pad_ptrs = list(handle.buffer_ptrs), list(handle.signal_pad_ptrs)
            rank, pad_slots = int(handle.rank), int(handle.signal_pad_size) // 4
        except (AttributeError, TypeError) as exc:  # another torch's handle
            logger.info("fused all-reduce + RMSNorm off: the symmetric-memory handle lacks %s", exc)
            return None
        slot_base = pad_slots // 2
        max_rows = min(MAX_ROWS, pad_slots - slot_base)  # a call count a row
        if max_rows < 1:
            logger.info("fused all-reduce + RMSNorm off: the signal pad (%d slots) is too small",
                        pad_slots)
            return None
        if len(buffer_ptrs) != world_size or buffer_ptrs[rank] != buffer.data_ptr():
            logger.info("fused all-reduce + RMSNorm off: unexpected buffer pointers")
            return None
        # Marked empty before any peer can push (the caller's group-wide vote on the fused
        # path comes after this, on every rank, and synchronizes with it).
        clear_region(buffer[region_offset:region_offset + region_size])
        torch.cuda.synchronize(buffer.device)

        def as_tensor(ptrs: list[int]) -> torch.Tensor:
            return torch.tensor(ptrs, dtype=torch.int64, device=buffer.device)
        return cls(as_tensor(buffer_ptrs), as_tensor(pad_ptrs), rank, slot_base, max_rows,
                   region_offset, region_size // (2 * world_size) // 16 * 16)


def _current_device() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else -1


def _allocate(max_bytes: int, device: int) -> torch.Tensor:
    import torch.distributed._symmetric_memory as symm_mem
    return symm_mem.empty(max_bytes, dtype=torch.uint8, device=torch.device("cuda", device))


def _rendezvous(buffer: torch.Tensor, group_name: str):
    import torch.distributed._symmetric_memory as symm_mem
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    # Older torch needs the group registered first; newer registers every group itself and
    # marks the call deprecated. Registering twice fails in C++: ignore it, the group is known.
    if enable is not None and not hasattr(enable, "__deprecated__"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                enable(group_name)
            except Exception as exc:  # noqa: BLE001
                logger.debug("enable_symm_mem_for_group(%s): %r", group_name, exc)
    return symm_mem.rendezvous(buffer, group_name)


def _agree(group: "GroupCoordinator", local_error: str | None) -> bool:
    """True when no rank of the group failed; else False on every rank, so none goes on alone
    into a collective. Each failed rank logs its error; the first rank says when another did."""
    all_ok = group.all_reduce_int(0 if local_error else 1, "min") == 1
    if local_error is not None:
        _log_off(group, local_error, logging.WARNING, every_rank=True)
    elif not all_ok:
        _log_off(group, "another rank of the group failed to set it up", logging.WARNING)
    return all_ok


def _log_off(group: "GroupCoordinator", reason: str, level: int, every_rank: bool = False) -> None:
    """Say once per group (on its first rank, unless the reason is this rank's own) why its
    all-reduces stay on NCCL."""
    if every_rank or group.is_first_rank:
        logger.log(level, "%s group %s (rank %d): custom all-reduce off, NCCL all-reduce for "
                   "every size: %s", group.name, group.ranks, group.rank_in_group, reason)
