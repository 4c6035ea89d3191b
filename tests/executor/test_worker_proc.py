"""executor/worker_proc.py: how a serving rank ends, from the messages of node 0's engine.

A clean "stop" exits 0; a stop because the engine failed, or a rendezvous ping from another
engine (node 0 came back), exits EXIT_ENGINE_FAILED, so another node's launcher exits non-zero
and its supervisor restarts it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shardserve.executor.wire import WireCodec
from shardserve.executor.worker_proc import EXIT_ENGINE_FAILED, WorkerProc


class _Sub:
    """The steps socket, as a rank reads it: these messages, then nothing."""

    def __init__(self, codec: WireCodec, messages: list[list]) -> None:
        self._data = [codec.encode(m) for m in messages]

    def recv(self) -> bytes:
        return self._data.pop(0)


@pytest.mark.parametrize("messages,code", [
    ([["stop", None]], 0),
    ([["stop"]], 0),  # as engines before the stop carried a reason
    ([["go", {}], ["stop", "Worker rank 0 (pid 7) died: killed by SIGKILL."]],
     EXIT_ENGINE_FAILED),
    # Used to be ignored: the rank lived on, on the new engine's beats, and the new engine's
    # rendezvous waited out its whole timeout for it.
    ([["ping"], ["stop", None]], EXIT_ENGINE_FAILED),
])
def test_serving_rank_exit_code(messages, code):
    proc = WorkerProc.__new__(WorkerProc)
    proc.codec = WireCodec()
    proc.sub = _Sub(proc.codec, messages)
    proc.engine_host = ""
    proc.is_driver = False
    proc.worker = SimpleNamespace(config=SimpleNamespace(
        scheduler_config=SimpleNamespace(async_scheduling=False)))
    assert proc._loop() == code
