"""The engine core's busy loop, driven over real ZMQ sockets with a fake EngineCore: outputs
and first-scheduling times go out, and an exception fails every in-flight request. The step
watchdog ends a core whose step never returns (its heartbeat thread keeps beating) and leaves
slow steps and idle time alone; through the front (AsyncLLM), the requests then fail with
engine_dead within seconds, and the front counts the engine dead as soon as the core reports
its failure, not only once the core process has finished tearing down."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from shardserve.engine.core_messages import (AbortRequests, CoreFailed, CoreStepOutputs,
                                             EngineCoreRequest, ShutdownCore, make_serializer)
from shardserve.engine.core_proc import EngineCoreProc, StepWatchdog
from shardserve.engine.outputs import EngineCoreOutput
from shardserve.engine.scheduler import SchedulerStats
from shardserve.sampling_params import SamplingParams


class FakeCore:
    def __init__(self, fail: bool = False, step_s: float = 0.0) -> None:
        self.config = SimpleNamespace(device_config=SimpleNamespace(device="cpu"))
        self.scheduler = SimpleNamespace(running=[])
        self.requests: dict = {}
        self.aborted: list[str] = []
        self.fail = fail
        self.step_s = step_s  # how long each step takes
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
        time.sleep(self.step_s)
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


def _run(core: FakeCore, messages: list, parent_pid: int | None = None,
         watchdog: StepWatchdog | None = None):
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
    loop = EngineCoreProc(core, core_in, core_out, s,
                          os.getppid() if parent_pid is None else parent_pid, watchdog)
    code = loop.run()
    # What run_engine_core passes on to core.shutdown(), for the workers' stop.
    core.failure = loop.failure
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
    assert core.failure is None  # a clean stop: other nodes' workers exit 0
    steps = [m for m in received if isinstance(m, CoreStepOutputs) and m.outputs]
    assert [o.req_id for o in steps[0].outputs] == ["a"]
    assert set(steps[0].scheduled) == {"a"}
    assert steps[0].stats is not None
    assert steps[0].num_step_tokens == 3  # the step's computed tokens ride along (metrics)


def test_exception_fails_every_inflight_request_and_exits_1():
    core = FakeCore(fail=True)
    code, received = _run(core, [_request("a"), _request("b")])
    assert code == 1
    errors = [o for m in received if isinstance(m, CoreStepOutputs) for o in m.outputs]
    assert sorted(o.req_id for o in errors) == ["a", "b"]
    assert all(o.finish_reason == "error" and "boom" in o.error for o in errors)
    assert isinstance(received[-1], CoreFailed) and "boom" in received[-1].message
    assert core.failure == "the engine core failed: RuntimeError: boom"


def test_exits_when_parent_is_gone():
    core = FakeCore()
    code, _ = _run(core, [], parent_pid=-1)
    assert code == 1
    # Not a clean stop: it used to stop the workers as one, and another node's `shardserve
    # worker` then exited 0 after its server was killed.
    assert core.failure == "the front-end process -1 is gone"


def test_watchdog_reports_a_step_that_never_returns_with_its_stack():
    fired: list[tuple[str, str]] = []
    release = threading.Event()
    watchdog = StepWatchdog(0.5, lambda message, stack: (fired.append((message, stack)),
                                                         release.set()))
    core = FakeCore()
    core.step = lambda: release.wait(30) and []  # a deadlock, until the watchdog fires
    start = time.monotonic()
    _run(core, [_request("a"), ShutdownCore()], watchdog=watchdog)
    assert fired and time.monotonic() - start < 5
    message, stack = fired[0]
    assert "step_timeout_s 0.5" in message and "hung" in message
    assert "in _step" in stack  # where the main thread is stuck


def test_watchdog_leaves_slow_steps_and_idle_time_alone():
    fired: list[str] = []
    watchdog = StepWatchdog(0.4, lambda message, stack: fired.append(message))
    # Three steps of 0.3 s (1 s of stepping in all), then 1 s idle.
    code, _ = _run(FakeCore(step_s=0.3), [_request("a"), _request("b"), _request("c")],
                   watchdog=watchdog, parent_pid=-1)
    time.sleep(1.0)
    assert code == 1 and not fired  # (it left because parent_pid=-1 is not its parent)


def _run_core_with_a_hung_step(*args, **kwargs) -> None:
    """run_engine_core in the spawned core process, with a step that never returns."""
    from shardserve.engine.core import EngineCore
    from shardserve.engine.core_proc import run_engine_core
    EngineCore.step = lambda self: threading.Event().wait()
    run_engine_core(*args, **kwargs)


@pytest.mark.slow
def test_hung_step_with_one_process_fails_requests_as_engine_dead(tiny_model_dirs, monkeypatch):
    """TP 1, PP 1: nothing but the watchdog bounds a step, and the heartbeat goes on."""
    from shardserve.config import EngineConfig
    from shardserve.engine import core_client
    from shardserve.engine.async_llm import AsyncLLM
    from shardserve.errors import EngineDeadError

    monkeypatch.setattr(core_client, "run_engine_core", _run_core_with_a_hung_step)
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      max_model_len=64, kv_cache_memory_bytes=1 << 20,
                                      step_timeout_s=1.5).resolve()

    async def main() -> float:
        llm = AsyncLLM(config)
        await llm.start()
        try:
            start = time.monotonic()
            with pytest.raises(EngineDeadError, match="step_timeout_s 1.5"):
                async for _ in llm.generate("Hi", SamplingParams(max_tokens=4), "r"):
                    pass
            assert llm.dead
            elapsed = time.monotonic() - start
            while llm._core.exitcode is None:  # the core exits on its own, with status 1
                await asyncio.sleep(0.1)
            assert llm._core.exitcode == 1
            return elapsed
        finally:
            await llm.shutdown()

    assert asyncio.run(asyncio.wait_for(main(), 60)) < 10


def _run_core_whose_step_fails_and_teardown_lags(*args, **kwargs) -> None:
    """run_engine_core with a step that fails as a dead rank makes it fail, and a shutdown
    that takes seconds, as stopping the surviving ranks can."""
    from shardserve.engine.core import EngineCore
    from shardserve.engine.core_proc import run_engine_core
    from shardserve.errors import EngineDeadError

    def step(self):
        raise EngineDeadError("Worker rank 1 (pid 1) died: killed by SIGKILL")
    EngineCore.step = step
    EngineCore.shutdown = lambda self, *a, **k: time.sleep(3)
    run_engine_core(*args, **kwargs)


def test_core_failure_marks_the_front_dead_before_the_core_exits(tiny_model_dirs, monkeypatch):
    """The request's error and the engine's death reach the front together: /health and /live
    (which read AsyncLLM.dead) must not stay green while the core is still tearing down."""
    from shardserve.config import EngineConfig
    from shardserve.engine import core_client
    from shardserve.engine.async_llm import AsyncLLM
    from shardserve.errors import EngineDeadError

    monkeypatch.setattr(core_client, "run_engine_core",
                        _run_core_whose_step_fails_and_teardown_lags)
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      max_model_len=64, kv_cache_memory_bytes=1 << 20).resolve()

    async def main() -> None:
        llm = AsyncLLM(config)
        await llm.start()
        try:
            with pytest.raises(EngineDeadError, match="rank 1"):
                async for _ in llm.generate("Hi", SamplingParams(max_tokens=4), "r"):
                    pass
            await asyncio.sleep(0.1)  # the reader takes the CoreFailed that followed
            assert llm._core.exitcode is None  # still tearing down...
            assert llm.dead and not llm.is_alive and "rank 1" in llm.dead_reason  # ...yet dead
            with pytest.raises(EngineDeadError):
                llm.check_started()  # new requests are refused, not sent to a dying core
        finally:
            await llm.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


def _ignore_sigterm_and_sleep(frozen_rank_pid) -> None:
    """A core that ignores SIGTERM, with a rank that is stopped (SIGSTOP): such a rank cannot
    notice that its core is gone and leave, as the ranks otherwise do."""
    import multiprocessing
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as the core does
    rank = multiprocessing.get_context("fork").Process(target=_stop_self)
    rank.start()
    frozen_rank_pid.value = rank.pid
    time.sleep(60)


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


@pytest.mark.parametrize("loading", [True, False])
def test_shutdown_of_a_core_still_loading_is_immediate(loading):
    """A SIGTERM while the model loads: the core reads no message before its load ends and
    ignores SIGTERM, so the front kills it at once rather than waiting out the shutdown
    timeout. A ready core that is not connected (it cannot get ShutdownCore) goes the same way.
    The core's processes go with it, a stopped rank too (it would be left for ever)."""
    import multiprocessing

    from shardserve.engine.core_client import CoreProcClient
    from shardserve.executor.liveness import process_stopped

    ctx = multiprocessing.get_context("spawn")
    rank_pid = ctx.Value("i", 0)
    client = CoreProcClient(SimpleNamespace(), 20)
    client._proc = ctx.Process(target=_ignore_sigterm_and_sleep, args=(rank_pid,))
    client._proc.start()
    try:
        deadline = time.monotonic() + 30
        while not (rank_pid.value and process_stopped(rank_pid.value)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        asyncio.run(client.shutdown(timeout=30, loading=loading))
        assert time.monotonic() - start < 5
        assert not client._proc.is_alive()
        deadline = time.monotonic() + 5
        while _alive(rank_pid.value) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(rank_pid.value)
    finally:
        if client._proc.is_alive():
            client._proc.kill()
        if rank_pid.value and _alive(rank_pid.value):
            os.kill(rank_pid.value, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped by whoever inherited it) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
