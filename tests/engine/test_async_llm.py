"""AsyncLLM against a scripted core (no process): the test decides what the core says, and when.
tests/server/ runs it with a real core behind HTTP."""

from __future__ import annotations

import asyncio

import pytest

from shardserve.config import EngineConfig
from shardserve.engine import async_llm
from shardserve.engine.async_llm import AsyncLLM
from shardserve.engine.core_messages import (AbortRequests, CoreReady, CoreStepOutputs,
                                             EngineCoreRequest)
from shardserve.engine.outputs import EngineCoreOutput
from shardserve.errors import OverloadedError
from shardserve.sampling_params import SamplingParams


class ScriptedCore:
    """Stands in for CoreProcClient: records what the front sends; recv() returns what the
    test puts in `replies`, in order."""

    def __init__(self, config, log_level) -> None:
        self.sent: list = []
        self.replies: asyncio.Queue = asyncio.Queue()
        self.kill_reason = None
        self.exitcode = None

    async def start(self, on_exit) -> None:
        self.replies.put_nowait(CoreReady(0, 1, {}))

    def send(self, message) -> None:
        self.sent.append(message)

    async def recv(self):
        return await self.replies.get()

    async def shutdown(self, timeout: float, loading: bool = False) -> None:
        pass


def test_a_reused_id_never_gets_the_cancelled_requests_outputs(tiny_model_dirs, monkeypatch):
    """A client cancels and sends a new request under the same id at once. The core's outputs
    for the old one that were already on their way (it had not seen the abort yet) must not
    land on the new one, and the core must never get two requests under one id: it used to,
    and the new request ended with the old one's tokens while the core kept both forever."""
    monkeypatch.setattr(async_llm, "CoreProcClient", ScriptedCore)
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      max_model_len=64).resolve()
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def first_output(llm: AsyncLLM, core: ScriptedCore):
        """Start a request under id "x"; the id the core got and the generator."""
        gen = llm.generate({"prompt_token_ids": [5, 6]}, params, "x")
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0)  # the request reaches the core
        sent = core.sent[-1]
        assert isinstance(sent, EngineCoreRequest)
        return sent.request_id, gen, first

    async def main() -> None:
        llm = AsyncLLM(config)
        await llm.start()
        core = llm._core
        try:
            old_id, old, first = await first_output(llm, core)
            core.replies.put_nowait(CoreStepOutputs([EngineCoreOutput(old_id, [7])], {}))
            assert (await first).outputs[0].token_ids == [7]
            await old.aclose()  # the client went away
            assert core.sent[-1] == AbortRequests([old_id])

            new_id, new, first = await first_output(llm, core)
            # Sent by the core before it read the abort, read by the front only now.
            core.replies.put_nowait(CoreStepOutputs(
                [EngineCoreOutput(old_id, [8], finish_reason="length")], {}))
            core.replies.put_nowait(CoreStepOutputs([EngineCoreOutput(new_id, [9])], {}))
            out = await first
            assert out.request_id == "x"
            assert out.outputs[0].token_ids == [9] and not out.finished
            assert new_id != old_id
            await new.aclose()
            assert core.sent[-1] == AbortRequests([new_id])
            assert llm.num_unfinished_requests == 0 and not llm._by_core and not llm._by_child
        finally:
            await llm.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_abort_all_refuses_later_requests(tiny_model_dirs):
    """After abort_all (the server stopping without waiting) nothing new may start: a request
    the server admitted an instant before, or a beam search's next step, would otherwise run
    on until the process exits under it, cut off mid-response."""
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      max_model_len=64, kv_cache_memory_bytes=1 << 20).resolve()
    llm = AsyncLLM(config)
    llm.ready = True  # as after start(); no request is in flight, so no core is needed
    llm.check_started()
    llm.abort_all("The server is stopping.")
    with pytest.raises(OverloadedError, match="stopping"):
        llm.check_started()


def test_requests_ended_all_at_once_are_counted(tiny_model_dirs, monkeypatch):
    """Engine death fails every request in flight: each counts in request_success as "error"
    (it used to count nowhere); a server stopping without waiting counts them as "abort"."""
    from shardserve.engine.stat_logger import StatLogger

    class Recording(StatLogger):
        def __init__(self):
            self.finished: list[str] = []

        def record_finished(self, finish_reason, e2e_latency):
            self.finished.append(finish_reason)

    monkeypatch.setattr(async_llm, "CoreProcClient", ScriptedCore)
    config = EngineConfig.from_kwargs(model=tiny_model_dirs["llama"], device="cpu",
                                      max_model_len=64).resolve()
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def run(end) -> list[str]:
        stats = Recording()
        llm = AsyncLLM(config, stat_logger=stats)
        await llm.start()
        try:
            gens = [llm.generate({"prompt_token_ids": [5, 6]}, params) for _ in range(2)]
            firsts = [asyncio.ensure_future(anext(g)) for g in gens]
            await asyncio.sleep(0)
            end(llm)
            for first in firsts:
                with pytest.raises(Exception, match="dead|stopping"):
                    await first
        finally:
            await llm.shutdown()
        return stats.finished

    assert asyncio.run(run(lambda llm: llm._mark_dead("killed"))) == ["error", "error"]
    assert asyncio.run(run(lambda llm: llm.abort_all("The server is stopping."))) == [
        "abort", "abort"]
