"""executor/gpu_memory.py: gpu_memory_utilization as vLLM counts it, this engine's share of the
GPU whatever other processes hold (the arithmetic, on CPU; tests/gpu runs it on a GPU)."""

from __future__ import annotations

import pytest

from shardserve.errors import InvalidRequestError
from shardserve.executor.gpu_memory import (GiB, MemorySnapshot, check_fits_at_start,
                                            kv_cache_budget)


def test_a_neighbours_memory_does_not_shrink_this_engines_share():
    # 100 GiB GPU, another process holding 40: at 0.5 this engine still gets 50 GiB.
    start = MemorySnapshot(free=60 * GiB, total=100 * GiB, torch_reserved=0)
    check_fits_at_start(start, 0.5)
    # After loading 10 GiB of weights and profiling (12 GiB reserved at the peak, 1 GiB of
    # NCCL buffers outside PyTorch), 13 GiB fewer are free.
    now = MemorySnapshot(free=47 * GiB, total=100 * GiB, torch_reserved=12 * GiB)
    budget = kv_cache_budget(start, now, torch_peak=11 * GiB, utilization=0.5)
    assert budget.non_torch == 1 * GiB
    assert budget.kv_bytes == 50 * GiB - 11 * GiB - 1 * GiB
    assert "gives this engine 50.00 GiB" in budget.explain()
    assert "leaving 38.00 GiB for the KV cache" in budget.explain()


def test_more_than_was_free_at_start_is_refused_up_front():
    start = MemorySnapshot(free=30 * GiB, total=100 * GiB, torch_reserved=0)
    with pytest.raises(InvalidRequestError, match=r"gpu_memory_utilization=0.5 asks for 50.0 GiB "
                       r"of this GPU's 100.0 GiB, but only 30.0 GiB was free when the engine "
                       r"started \(70.0 GiB held by other processes\)\. Lower") as err:
        check_fits_at_start(start, 0.5)
    assert err.value.param == "gpu_memory_utilization"


def test_a_share_smaller_than_the_weights_leaves_nothing_not_a_negative_size():
    start = MemorySnapshot(free=100 * GiB, total=100 * GiB, torch_reserved=0)
    now = MemorySnapshot(free=80 * GiB, total=100 * GiB, torch_reserved=20 * GiB)
    budget = kv_cache_budget(start, now, torch_peak=19 * GiB, utilization=0.1)
    assert budget.non_torch == 0 and budget.kv_bytes == 0


def test_memory_freed_by_a_neighbour_is_not_counted_as_a_gain():
    # A neighbour released 5 GiB during profiling: free went up by more than PyTorch took.
    start = MemorySnapshot(free=60 * GiB, total=100 * GiB, torch_reserved=1 * GiB)
    now = MemorySnapshot(free=62 * GiB, total=100 * GiB, torch_reserved=4 * GiB)
    assert kv_cache_budget(start, now, torch_peak=3 * GiB, utilization=0.5).non_torch == 0


def test_another_engine_in_the_same_process_is_not_counted_as_this_ones():
    # A first engine left 26 GiB of tensors in this process; the second's own peak is what it
    # allocated beyond them.
    start = MemorySnapshot(free=70 * GiB, total=100 * GiB, torch_reserved=27 * GiB,
                           torch_allocated=26 * GiB)
    now = MemorySnapshot(free=66 * GiB, total=100 * GiB, torch_reserved=31 * GiB,
                         torch_allocated=26 * GiB)
    budget = kv_cache_budget(start, now, torch_peak=30 * GiB, utilization=0.3)
    assert budget.torch_peak == 4 * GiB and budget.non_torch == 0
    assert budget.kv_bytes == 26 * GiB
