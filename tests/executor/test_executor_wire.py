"""The executor's wire and settings, without processes: SchedulerOutput round trip, node
layout and LWS variables, comm timing, gather-to-rank-0 on one process."""

from __future__ import annotations

import pytest
import torch

from shardserve.config import EngineConfig, ParallelConfig
from shardserve.distributed.comm_timer import CommTimer
from shardserve.distributed.parallel_state import GroupCoordinator
from shardserve.engine.outputs import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                       SchedulerOutput, TokenLogprobs)
from shardserve.errors import InvalidRequestError
from shardserve.executor.wire import Endpoints, WireCodec
from shardserve.sampling_params import SamplingParams


def test_scheduler_output_round_trips():
    codec = WireCodec()
    out = SchedulerOutput(
        [NewRequestData("a", [1, 2, 3], [], SamplingParams(temperature=0.5, seed=3, stop=["x"]),
                        [4, 5], 0, [2])],
        [CachedRequestData("c", [7], [9], 12), CachedRequestData("b", [], [], 3)],
        {"c": 1, "a": 3, "b": 1}, 5, {"d", "e"}, step_id=5)
    back = codec.decode(codec.encode_step(1, 0.5, out))
    assert back == ["step", 1, 0.5, out]
    assert list(back[3].num_scheduled_tokens) == ["c", "a", "b"]  # batch order survives
    empty = SchedulerOutput([], [], {}, 0, set())
    assert codec.decode(codec.encode_step(2, 0.0, empty))[3] == empty
    result = ModelRunnerOutput(["a"], [8], [TokenLogprobs([8, 1], [-0.1, -2.0], [1, 2])],
                               {"a": [TokenLogprobs([2], [-1.0], [3])]})
    assert codec.decode(codec.encode(["out", 1, 0, result, {"step_s": 0.1}]))[3] == result


def test_node_layout_and_driver_rank():
    pc = ParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2, nnodes=2).resolve({})
    assert pc.world_size == 8 and pc.num_local_ranks == 4
    assert list(pc.node_ranks(1)) == [4, 5, 6, 7]
    assert pc.driver_rank == 4  # TP rank 0 of the last PP stage
    assert pc.master_port == 29500 and pc.master_addr == "127.0.0.1" and pc.node_rank == 0
    with pytest.raises(InvalidRequestError, match="nnodes"):
        ParallelConfig(tensor_parallel_size=3, nnodes=2).resolve({})
    with pytest.raises(InvalidRequestError, match="node_rank"):
        ParallelConfig(tensor_parallel_size=2, nnodes=2, node_rank=2).resolve({})


def test_leader_worker_set_variables_fill_unset_fields():
    env = {"LWS_LEADER_ADDRESS": "leader.svc", "LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"}
    pc = ParallelConfig(tensor_parallel_size=2).resolve(env)
    assert (pc.master_addr, pc.nnodes, pc.node_rank) == ("leader.svc", 2, 1)
    pc = ParallelConfig(tensor_parallel_size=2, node_rank=0, master_addr="x").resolve(env)
    assert (pc.master_addr, pc.nnodes, pc.node_rank) == ("x", 2, 0)  # flags win


@pytest.mark.parametrize("tp,env", [(1, {}), (2, {}), (1, {"LWS_GROUP_SIZE": "2"})])
def test_data_parallel_over_nodes_is_refused_as_such(tp, env):
    """-dp with --nnodes (or a LeaderWorkerSet group) names -dp and the way to do it, not the
    TP x PP split over the nodes."""
    nnodes = None if env else 2
    with pytest.raises(InvalidRequestError, match=r"data_parallel_size=2 with nnodes=2: .*"
                                                  r"one `shardserve serve` per replica group"):
        ParallelConfig(tensor_parallel_size=tp, data_parallel_size=2, nnodes=nnodes).resolve(env)


def test_cli_flags_and_engine_kwargs_round_trip():
    from shardserve.cli import build_parser
    from shardserve.engine_args import engine_config_from_args
    args = build_parser().parse_args(["worker", "--nnodes", "2", "--node-rank", "1",
                                      "--master-addr", "10.0.0.1", "--master-port", "1234",
                                      "-tp", "4"])
    config = engine_config_from_args(args)
    pc = config.parallel_config
    assert (pc.nnodes, pc.node_rank, pc.master_addr, pc.master_port,
            pc.tensor_parallel_size) == (2, 1, "10.0.0.1", 1234, 4)
    again = EngineConfig.from_kwargs(**config.to_kwargs())
    assert again.parallel_config == pc and again.cache_config == config.cache_config


def test_endpoints():
    tcp = Endpoints.tcp("node0", 29500)
    assert tcp.steps == "tcp://node0:29501" and tcp.beats_in == "tcp://node0:29504"
    assert tcp.bind_addresses().results == "tcp://*:29502"
    ipc = Endpoints.ipc("/tmp/x")
    assert ipc.steps == "ipc:///tmp/x/steps" and ipc.ipc_directory() == "/tmp/x"


def test_comm_timer_wraps_only_the_timed_group():
    group, other = GroupCoordinator.single("tp"), GroupCoordinator.single("pp")
    timer = CommTimer(torch.device("cpu"))
    group.enable_comm_timer(timer)
    x = torch.ones(3)
    assert group.all_reduce(x) is x and other.all_reduce(x) is x
    seconds, count = timer.collect()
    assert count == 1 and seconds >= 0
    assert timer.collect() == (0.0, 0)
    group.disable_comm_timer()
    group.all_reduce(x)
    assert timer.collect()[1] == 0
    assert group.all_reduce_int(5, "min") == 5
