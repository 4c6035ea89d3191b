"""How much GPU memory one engine rank may give its KV cache, by vLLM's rule for
gpu_memory_utilization: the share of the whole GPU that this engine may use, whatever other
processes hold. Two engines at 0.45 fit on one GPU side by side; an engine asking for more than
was free when it started is refused at once rather than left with a cache of nothing.

The rank's own use is what it allocated through PyTorch at its peak (the weights and one
profiling forward) beyond what the process held at start-up (another engine in the same
process), plus what grew outside PyTorch's allocator since start-up (NCCL and other library
buffers). The arithmetic is pure, so it is tested on CPU; `snapshot` is the only call
into CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardserve.errors import InvalidRequestError

GiB = 2**30


@dataclass(frozen=True)
class MemorySnapshot:
    """One GPU's memory as this process sees it at one moment."""

    free: int  # free on the device, for every process
    total: int
    torch_reserved: int  # held by this process's PyTorch allocator
    torch_allocated: int = 0  # of that, in live tensors


def snapshot(device: torch.device) -> MemorySnapshot:
    free, total = torch.cuda.mem_get_info(device)
    return MemorySnapshot(int(free), int(total), int(torch.cuda.memory_reserved(device)),
                          int(torch.cuda.memory_allocated(device)))


def check_fits_at_start(start: MemorySnapshot, utilization: float) -> None:
    """InvalidRequestError when the GPU had less free at start-up than the engine asks for."""
    requested = int(start.total * utilization)
    if start.free < requested:
        raise InvalidRequestError(
            f"gpu_memory_utilization={utilization} asks for {requested / GiB:.1f} GiB of this "
            f"GPU's {start.total / GiB:.1f} GiB, but only {start.free / GiB:.1f} GiB was free "
            f"when the engine started ({(start.total - start.free) / GiB:.1f} GiB held by other "
            "processes). Lower --gpu-memory-utilization, set the cache size with "
            "--kv-cache-memory, or free the GPU.", "gpu_memory_utilization")


@dataclass(frozen=True)
class KVCacheBudget:
    """What the KV cache gets once the rank's own use is taken from its share."""

    utilization: float
    requested: int  # total * utilization
    torch_peak: int  # weights plus the profiling forward's activations, beyond start-up
    non_torch: int  # this rank's growth outside PyTorch's allocator since start-up

    @property
    def kv_bytes(self) -> int:
        return max(self.requested - self.torch_peak - self.non_torch, 0)

    def explain(self) -> str:
        return (f"gpu_memory_utilization={self.utilization} gives this engine "
                f"{self.requested / GiB:.2f} GiB; the weights and activations peak at "
                f"{self.torch_peak / GiB:.2f} GiB and other CUDA memory of this process takes "
                f"{self.non_torch / GiB:.2f} GiB, leaving {self.kv_bytes / GiB:.2f} GiB for the "
                "KV cache.")


def kv_cache_budget(start: MemorySnapshot, now: MemorySnapshot, torch_peak: int,
                    utilization: float) -> KVCacheBudget:
    """The KV cache's share from snapshots at start-up and after the profiling forward, and
    the process's peak of PyTorch allocations in between. Memory another process took in
    between counts as this rank's (it cannot be told apart), as in vLLM; it only makes the
    cache smaller."""
    used_since_start = start.free - now.free
    non_torch = max(used_since_start - (now.torch_reserved - start.torch_reserved), 0)
    return KVCacheBudget(utilization, int(start.total * utilization),
                         max(torch_peak - start.torch_allocated, 0), non_torch)
