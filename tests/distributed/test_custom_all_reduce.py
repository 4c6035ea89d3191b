"""When the custom (symmetric-memory) all-reduce serves and when NCCL does, on CPU: the pure
decisions, the agreement between ranks on a real gloo world, and GroupCoordinator's dispatch.
The kernels themselves run in tests/gpu/test_custom_all_reduce.py."""

from __future__ import annotations

import argparse
import logging
import types

import pytest
import torch
import torch.distributed as dist

from shardserve.config import EngineConfig, ParallelConfig
from shardserve.distributed import custom_all_reduce as car
from shardserve.distributed import parallel_state as ps
from shardserve.distributed.comm_timer import CommTimer
from shardserve.distributed.custom_all_reduce import (MULTICAST_OFF_ENV, ONE_SHOT, TWO_SHOT,
                                                      KiB, MiB, config_reason_off,
                                                      local_reason_off, peers_reason_off,
                                                      pick_algorithm)
from shardserve.distributed.local_launch import run_local_ranks
from shardserve.engine_args import add_engine_args, engine_config_from_args


# ---- settings every rank shares ---------------------------------------------------------------

def test_config_allows_one_node_nccl_groups_of_2_4_8() -> None:
    for ranks in ([0, 1], [4, 5, 6, 7], list(range(8))):
        assert config_reason_off(ranks, "nccl", False, 8 * MiB) is None


@pytest.mark.parametrize("kwargs,needle", [
    ({"disabled": True}, "--disable-custom-all-reduce"),
    ({"max_bytes": 0}, "max_bytes is 0"),
    ({"group_ranks": [0, 1, 2]}, "group size 3"),
    ({"group_ranks": list(range(16))}, "group size 16"),
    ({"backend": "gloo"}, "gloo"),
    # 2 nodes of 2 ranks each, TP 4: the group spans both nodes.
    ({"group_ranks": [0, 1, 2, 3], "nnodes": 2, "num_local_ranks": 2}, "spans nodes [0, 1]"),
])
def test_config_reasons_to_fall_back(kwargs, needle) -> None:
    args = {"group_ranks": [0, 1], "backend": "nccl", "disabled": False, "max_bytes": 8 * MiB,
            **kwargs}
    reason = config_reason_off(**args)
    assert reason is not None and needle in reason


def test_multi_node_tp_group_inside_one_node_is_allowed() -> None:
    # 2 nodes x 4 GPUs, TP 2 (x PP 4): [2, 3] and [4, 5] each sit on one node.
    for ranks in ([2, 3], [4, 5], [6, 7]):
        assert config_reason_off(ranks, "nccl", False, 8 * MiB, nnodes=2, num_local_ranks=4) is None


# ---- this process -----------------------------------------------------------------------------

def test_multicast_guard_is_required() -> None:
    for env in ({}, {MULTICAST_OFF_ENV: "0"}, {MULTICAST_OFF_ENV: "true"}):
        reason = local_reason_off(env)
        assert reason is not None and MULTICAST_OFF_ENV in reason


def test_nvshmem_backend_is_refused() -> None:
    reason = local_reason_off({MULTICAST_OFF_ENV: "1", "TORCH_SYMMMEM": "NVSHMEM"})
    assert reason is not None and "NVSHMEM" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_no_cuda_is_a_reason() -> None:
    assert local_reason_off({MULTICAST_OFF_ENV: "1"}) == "CUDA is not available"


# ---- what the ranks report to each other ------------------------------------------------------

def test_peers_must_agree_share_a_host_and_name_distinct_gpus() -> None:
    assert peers_reason_off([("h", 0, None), ("h", 1, None)]) is None
    assert "rank 1 of the group: no" in peers_reason_off([("h", 0, None), ("h", 1, "no")])
    assert "spans hosts" in peers_reason_off([("a", 0, None), ("b", 1, None)])
    # CUDA_VISIBLE_DEVICES=<one GPU> per rank: every rank calls its GPU cuda:0.
    assert "not distinct" in peers_reason_off([("h", 0, None), ("h", 0, None)])


# ---- which messages take which path -----------------------------------------------------------

@pytest.mark.parametrize("nbytes,expected", [
    (8 * KiB, ONE_SHOT),  # batch-1 decode, Llama-3-8B in bf16
    (4, ONE_SHOT),
    (512 * KiB, ONE_SHOT),
    (512 * KiB + 16, TWO_SHOT),
    (8 * MiB, TWO_SHOT),
    (8 * MiB + 16, None),  # larger than the buffer: NCCL
    (64 * MiB, None),
    (0, None),
    (6, None),  # 3 bf16 values: not a multiple of the kernels' 4-byte vectors
])
def test_pick_algorithm_by_size(nbytes, expected) -> None:
    assert pick_algorithm(nbytes, 0, 512 * KiB, 8 * MiB) == expected


def test_pick_algorithm_needs_an_aligned_start() -> None:
    assert pick_algorithm(8 * KiB, 16, 512 * KiB, 8 * MiB) == ONE_SHOT
    assert pick_algorithm(8 * KiB, 4, 512 * KiB, 8 * MiB) is None  # x[2:] of a bf16 row
    assert pick_algorithm(12, 4, 512 * KiB, 8 * MiB) == ONE_SHOT  # both only 4-byte aligned


def _fake_custom(max_bytes: int = 64) -> car.CustomAllReduce:
    group = types.SimpleNamespace(device_group=types.SimpleNamespace(group_name="g"),
                                  world_size=2, cpu_group=None)
    return car.CustomAllReduce(group, torch.zeros(max_bytes, dtype=torch.uint8), None,
                               one_shot_max_bytes=1 << 20, two_shot_max_bytes=max_bytes)


def test_thresholds_are_capped_by_the_buffer_and_cpu_tensors_decline() -> None:
    custom = _fake_custom(64)
    assert custom.one_shot_max_bytes == 64 and custom.max_bytes == 64
    x = torch.ones(4)
    assert custom.algorithm_for(x) is None and custom.all_reduce(x) is None
    assert torch.equal(x, torch.ones(4))
    # Not set up for the fused all-reduce + RMSNorm (no region): it declines everything.
    assert not custom.takes_rms_norm(x, x.clone())
    assert custom.all_reduce_rms_norm(x, x.clone(), torch.ones(4), 1e-5) is None


# ---- the config reaches the TP group ----------------------------------------------------------

def test_parallel_config_is_passed_to_create(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(car.CustomAllReduce, "create",
                        classmethod(lambda cls, group, **kw: seen.update(kw) or "made"))
    group = ps.GroupCoordinator.single("tp")
    group.world_size, group.device_group = 2, object()
    pc = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, nnodes=2,
                        disable_custom_all_reduce=True, custom_all_reduce_max_bytes=MiB,
                        disable_fused_all_reduce_norm=True)
    group.init_custom_all_reduce(pc)
    assert group.custom_all_reduce == "made"
    assert seen == {"disabled": True, "max_bytes": MiB, "nnodes": 2, "num_local_ranks": 2,
                    "fuse_norm": False}
    group.init_custom_all_reduce(None)
    assert seen == {"disabled": False, "max_bytes": car.DEFAULT_MAX_BYTES, "nnodes": 1,
                    "num_local_ranks": None, "fuse_norm": True}


def test_flags() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    default = engine_config_from_args(parser.parse_args([])).parallel_config
    assert default.disable_custom_all_reduce is False
    assert default.custom_all_reduce_max_bytes == 8 * MiB
    assert default.disable_fused_all_reduce_norm is False
    args = parser.parse_args(["--disable-custom-all-reduce",
                              "--custom-all-reduce-max-bytes", "2MiB",
                              "--disable-fused-all-reduce-norm"])
    pc = engine_config_from_args(args).parallel_config
    assert pc.disable_custom_all_reduce is True and pc.custom_all_reduce_max_bytes == 2 * MiB
    assert pc.disable_fused_all_reduce_norm is True
    kwargs = EngineConfig.from_kwargs(disable_custom_all_reduce=True).to_kwargs()
    assert kwargs["disable_custom_all_reduce"] is True  # reaches the other nodes' workers


# ---- on a real (gloo) world -------------------------------------------------------------------

def _gloo_falls_back_worker(rank: int) -> None:
    ps.initialize_model_parallel(2, 1)
    tp = ps.get_tp_group()
    assert tp.custom_all_reduce is None  # gloo: NCCL's (here gloo's) all-reduce as before
    x = torch.full((3, 5), float(rank + 1))
    assert torch.equal(tp.all_reduce(x), torch.full((3, 5), 3.0))
    ps.destroy_model_parallel()


@pytest.mark.multiproc
def test_gloo_world_falls_back() -> None:
    run_local_ranks(_gloo_falls_back_worker, 2, timeout_s=60)


def _agreement_worker(rank: int) -> None:
    """Pretend to be on GPUs (the config and local checks pass) and fail one rank at each
    set-up stage: every rank must end with no custom all-reduce, none left waiting."""
    car.config_reason_off = lambda *a, **k: None
    car._current_device = lambda: rank  # as cuda:0 and cuda:1 would be
    car.p2p_reason_off = lambda *a, **k: None
    calls, logged = [], []
    car._rendezvous = lambda buffer, name: calls.append(name) or "handle"
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    car.logger.addHandler(handler)
    car.logger.setLevel(logging.INFO)

    def init(local=None, allocate_fails=False, rendezvous_fails=False):
        car.local_reason_off = lambda env=None: local if rank == 1 else None

        def allocate(nbytes, device):
            if allocate_fails and rank == 1:
                raise RuntimeError("out of memory")
            return torch.zeros(nbytes, dtype=torch.uint8)
        car._allocate = allocate
        if rendezvous_fails:
            def rendezvous(buffer, name):
                if rank == 0:
                    raise RuntimeError("no peer access")
                return "handle"
            car._rendezvous = rendezvous
        group = ps.GroupCoordinator([[0, 1]], rank, "gloo", "tp")
        group.init_custom_all_reduce(ParallelConfig(custom_all_reduce_max_bytes=1024))
        return group

    def said() -> str:  # what this rank logged for the last set-up ('' if nothing)
        text = " | ".join(logged)
        logged.clear()
        return text

    # The group's first rank says why, once; the rank that failed says its own error.
    assert init(local="no GPU on this rank").custom_all_reduce is None
    assert calls == []  # never reached the (collective) rendezvous
    assert said().endswith("rank 1 of the group: no GPU on this rank") if rank == 0 else (
        said() == "")
    assert init(allocate_fails=True).custom_all_reduce is None
    assert calls == []
    assert ("another rank" if rank == 0 else "out of memory") in said()
    assert init(rendezvous_fails=True).custom_all_reduce is None
    assert ("no peer access" in said()) if rank == 0 else (said() == "")
    car._rendezvous = lambda buffer, name: "handle"
    group = init()
    custom = group.custom_all_reduce
    assert custom is not None, "custom all-reduce was not set up"
    assert custom.max_bytes == 1024, custom.max_bytes
    assert custom.one_shot_max_bytes == 1024  # capped by the buffer
    # CPU tensors are declined, so the group's own all-reduce still answers.
    x = torch.full((4,), float(rank + 1))
    assert torch.equal(group.all_reduce(x), torch.full((4,), 3.0))


@pytest.mark.multiproc
def test_ranks_agree_before_anything_collective() -> None:
    run_local_ranks(_agreement_worker, 2, timeout_s=60)


class _SmallOnly:
    """Stands in for the custom all-reduce: takes messages of up to 4 elements (summing them
    through gloo, times 1) and declines the rest, recording which it took."""

    def __init__(self, group) -> None:
        self.group, self.taken = group, []

    def all_reduce(self, tensor):
        if tensor.numel() > 4:
            return None
        self.taken.append(tensor.numel())
        dist.all_reduce(tensor, group=self.group.device_group)
        return tensor


def _dispatch_worker(rank: int) -> None:
    ps.initialize_model_parallel(2, 1)
    tp = ps.get_tp_group()
    fake = tp.custom_all_reduce = _SmallOnly(tp)
    timer = CommTimer(torch.device("cpu"))
    tp.enable_comm_timer(timer)
    small, large = torch.full((4,), rank + 1.0), torch.full((9,), rank + 1.0)
    assert torch.equal(tp.all_reduce(small), torch.full((4,), 3.0))
    assert torch.equal(tp.all_reduce(large), torch.full((9,), 3.0))
    assert fake.taken == [4]  # the large one went to the group's own all-reduce
    seconds, count = timer.collect()
    assert count == 2 and seconds > 0  # both timed, whichever path took them
    tp.disable_comm_timer()
    ps.destroy_model_parallel()
    assert tp.custom_all_reduce is None  # dropped with the group


@pytest.mark.multiproc
def test_group_dispatches_small_messages_and_times_both_paths() -> None:
    run_local_ranks(_dispatch_worker, 2, timeout_s=60)
