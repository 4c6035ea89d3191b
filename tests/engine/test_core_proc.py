"""The engine core's busy loop, driven over real ZMQ sockets with a fake EngineCore: outputs
and first-scheduling times go out, and an exception fails every in-flight request."""

from __future__ import annotations

import time
from types import SimpleNamespace

import zmq

from shardserve.engine.core_messages import (AbortRequests, CoreFailed, CoreStepOutputs,
                                             EngineCoreRequest, ShutdownCore, make_serializer)
from shardserve.engine.core_proc import EngineCoreProc
from shardserve.engine.outputs import EngineCoreOutput
from shardserve.engine.scheduler import SchedulerStats
from shardserve.sampling_params import SamplingParams


class FakeCore:
    def __init__(self, fail: bool = False) -> None:
        self.config = SimpleNamespace(device_config=SimpleNamespace(device="cpu"))
        self.scheduler = SimpleNamespace(running=[])
        self.requests: dict = {}
        self.aborted: list[str] = []
        self.fail = fail
        self.num_step_tokens = 0

    def add_request(self, request) -> None:
        self.requests[request.request_id] = request

    def abort_requests(self, ids) -> None:
        for rid in ids:
            self.aborted.append(rid)
            self.requests.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self):
        if self.fail:
            raise RuntimeError("boom")
        outputs = []
        self.num_step_tokens = 0
        for rid, request in list(self.requests.items()):
            request.first_scheduled_time = time.monotonic()
            outputs.append(EngineCoreOutput(rid, [7], finish_reason="length"))
            self.num_step_tokens += len(request.prompt_token_ids)
            del self.requests[rid]
        return outputs

    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=len(self.requests))

    def parallel_stats(self) -> dict[str, float]:
        return {"tp_comm_time_ratio": 0.25}

    class executor:  # noqa: N801 - stands in for the executor attribute
        @staticmethod
        def check_health() -> None:
            return None


def _run(core: FakeCore, messages: list, parent_pid: int | None = None):
    import os
    s = make_serializer()
    ctx = zmq.Context()
    front_in = ctx.socket(zmq.PUSH)
    front_in.bind("inproc://in")
    front_out = ctx.socket(zmq.PULL)
    front_out.bind("inproc://out")
    core_in = ctx.socket(zmq.PULL)
    core_in.connect("inproc://in")
    core_out = ctx.socket(zmq.PUSH)
    core_out.connect("inproc://out")
    for m in messages:
        front_in.send(s.encode(m))
    code = EngineCoreProc(core, core_in, core_out, s,
                          os.getppid() if parent_pid is None else parent_pid).run()
    received = []
    while front_out.poll(200):
        received.append(s.decode(front_out.recv()))
    for sock in (front_in, front_out, core_in, core_out):
        sock.close(linger=0)
    ctx.term()
    return code, received


def _request(rid: str) -> EngineCoreRequest:
    return EngineCoreRequest(rid, [1, 2, 3], SamplingParams(max_tokens=1), [0], time.monotonic(), 1)


def test_outputs_and_scheduled_times_then_clean_exit():
    core = FakeCore()
    code, received = _run(core, [_request("a"), _request("b"), AbortRequests(["b"]), ShutdownCore()])
    assert code == 0 and core.aborted == ["b"]
    steps = [m for m in received if isinstance(m, CoreStepOutputs) and m.outputs]
    assert [o.req_id for o in steps[0].outputs] == ["a"]
    assert set(steps[0].scheduled) == {"a"}
    assert steps[0].stats is not None
    assert steps[0].num_step_tokens == 3  # the step's computed tokens ride along (metrics)


def test_exception_fails_every_inflight_request_and_exits_1():
    code, received = _run(FakeCore(fail=True), [_request("a"), _request("b")])
    assert code == 1
    errors = [o for m in received if isinstance(m, CoreStepOutputs) for o in m.outputs]
    assert sorted(o.req_id for o in errors) == ["a", "b"]
    assert all(o.finish_reason == "error" and "boom" in o.error for o in errors)
    assert isinstance(received[-1], CoreFailed) and "boom" in received[-1].message


def test_exits_when_parent_is_gone():
    code, _ = _run(FakeCore(), [], parent_pid=-1)
    assert code == 1
