"""Process groups from the rank grid, and their collectives, on real gloo worlds."""

from __future__ import annotations

import pytest
import torch

from shardserve.distributed import parallel_state as ps
from shardserve.distributed.local_launch import run_local_ranks


def test_single_process_needs_no_setup() -> None:
    for get in (ps.get_tp_group, ps.get_pp_group, ps.get_dp_group, ps.get_world_group):
        group = get()
        assert (group.world_size, group.rank_in_group, group.ranks) == (1, 0, [0])
    x = torch.arange(6.0).reshape(2, 3)
    tp = ps.get_tp_group()
    assert tp.all_reduce(x) is x and tp.all_gather(x) is x and tp.gather(x) is x
    assert tp.broadcast(x) is x and tp.broadcast_object({"a": 1}) == {"a": 1}
    tp.barrier()
    ps.initialize_model_parallel(1, 1)  # allowed without a world
    assert ps.model_parallel_is_initialized()
    ps.destroy_model_parallel()
    with pytest.raises(RuntimeError):
        ps.initialize_model_parallel(2, 1)


def test_rank_grid_is_tp_innermost() -> None:
    tp, pp, dp = ps.rank_grid_groups(8, 2, 2)
    assert tp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert pp == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dp == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _tp2_pp2_worker(rank: int) -> None:
    ps.initialize_model_parallel(tensor_parallel_size=2, pipeline_parallel_size=2)
    tp, pp, dp = ps.get_tp_group(), ps.get_pp_group(), ps.get_dp_group()
    assert ps.get_world_group().world_size == 4
    assert tp.ranks == [rank // 2 * 2, rank // 2 * 2 + 1] and tp.rank_in_group == rank % 2
    assert pp.ranks == [rank % 2, rank % 2 + 2] and pp.rank_in_group == rank // 2
    assert dp.ranks == [rank] and dp.world_size == 1

    x = torch.full((2, 3), float(rank + 1))
    assert torch.equal(tp.all_reduce(x.clone()), torch.full((2, 3), float(sum(r + 1 for r in tp.ranks))))
    assert torch.equal(pp.all_reduce(x.clone()), torch.full((2, 3), float(sum(r + 1 for r in pp.ranks))))
    gathered = tp.all_gather(x, dim=-1)
    assert gathered.shape == (2, 6)
    assert torch.equal(gathered, torch.cat([torch.full((2, 3), float(r + 1)) for r in tp.ranks], -1))
    assert tp.all_gather(x, dim=0).shape == (4, 3)
    obj = pp.broadcast_object({"from": rank} if pp.is_first_rank else None)
    assert obj == {"from": pp.ranks[0]}
    ps.get_world_group().barrier()
    ps.destroy_model_parallel()


@pytest.mark.multiproc
def test_tp2_pp2_groups_on_four_ranks() -> None:
    run_local_ranks(_tp2_pp2_worker, 4, timeout_s=90)


def _tp2_worker(rank: int, device: str = "cpu") -> None:
    ps.initialize_model_parallel(2, 1)
    tp = ps.get_tp_group()
    assert tp.ranks == [0, 1] and tp.rank_in_group == rank
    torch.set_default_device(device if device == "cpu" else f"cuda:{rank}")
    x = torch.arange(4.0).reshape(2, 2) + 10 * rank
    assert torch.equal(tp.all_reduce(x.clone()), torch.arange(4.0).reshape(2, 2) * 2 + 10)
    assert torch.equal(tp.all_gather(x, dim=-1), torch.cat([x - 10 * rank, x - 10 * rank + 10], -1))
    gathered = tp.gather(x, dst=1, dim=0)
    if rank == 1:
        assert torch.equal(gathered, torch.cat([x - 10, x], 0))
    else:
        assert gathered is None
    y = tp.broadcast(x.clone(), src=1)
    assert torch.equal(y, torch.arange(4.0).reshape(2, 2) + 10)
    assert tp.broadcast_object(["meta", rank], src=0) == ["meta", 0]
    ps.destroy_model_parallel()


@pytest.mark.multiproc
def test_tp2_collectives_on_two_ranks() -> None:
    run_local_ranks(_tp2_worker, 2, timeout_s=60)


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tp2_collectives_nccl() -> None:
    run_local_ranks(_tp2_worker, 2, args=("cuda",), timeout_s=120, backend="nccl")
