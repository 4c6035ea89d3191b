"""The relay in router/proxy.py, in process: a replica's answer reaches the client byte for byte
however it is cut, what has piled up goes out in one write, and a replica given up mid-stream
ends the stream with an error event."""

from __future__ import annotations

import asyncio

import httpx

from shardserve.router.backends import BackendPool, DiscoveryConfig
from shardserve.router.policy import make_policy
from shardserve.router.proxy import Proxy, ProxyConfig

URL = "http://replica.test"


def _proxy(body_chunks, stall_after: int | None = None) -> tuple[Proxy, BackendPool]:
    """A Proxy over one healthy replica whose SSE answer is `body_chunks`, all ready at once
    (then, with stall_after, silent forever after that many chunks)."""

    async def stream():
        for i, chunk in enumerate(body_chunks):
            if i == stall_after:
                await asyncio.Event().wait()
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=stream())

    pool = BackendPool(DiscoveryConfig(static=[URL]))
    pool.add(URL).healthy = True
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return Proxy(pool, make_policy("round-robin"), ProxyConfig(), client), pool


async def _read(response) -> list[bytes]:
    pieces = []
    try:
        async for piece in response.body_iterator:
            pieces.append(piece)
    finally:
        await response._on_close()
    return pieces


def test_relay_is_byte_exact_and_writes_what_piled_up_at_once():
    chunks = [f"data: {{\"i\": {i}}}\n\n".encode() for i in range(500)] + [b"data: [DONE]\n\n"]
    proxy, pool = _proxy(chunks)

    async def run() -> list[bytes]:
        response = await proxy.forward("POST", "/v1/completions", {}, b"{}")
        return await _read(response)

    pieces = asyncio.run(run())
    assert b"".join(pieces) == b"".join(chunks)
    assert len(pieces) < len(chunks) / 10  # everything was ready: a handful of writes
    backend = pool.backends[URL]
    assert backend.in_flight == 0 and not backend.waiters and backend.num_failures == 0


def test_replica_given_up_mid_stream_ends_with_an_error_event():
    chunks = [b"data: {\"i\": 0}\n\n", b"data: {\"i\": 1}\n\n", b"data: never\n\n"]
    proxy, pool = _proxy(chunks, stall_after=2)
    backend = pool.backends[URL]

    async def run() -> list[bytes]:
        response = await proxy.forward("POST", "/v1/completions", {}, b"{}")
        reader = asyncio.ensure_future(_read(response))
        while not backend.waiters:  # the stream's one reading task
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(backend.waiters) == 1
        backend.lost.set()  # as the prober does after LOST_AFTER_FAILURES silent probes
        for task in list(backend.waiters):
            task.cancel()
        return await asyncio.wait_for(reader, 10)

    body = b"".join(asyncio.run(run()))
    assert body.startswith(chunks[0] + chunks[1])
    assert b"replica_failed" in body and body.endswith(b"data: [DONE]\n\n")
    assert b"never" not in body
    assert backend.in_flight == 0 and not backend.waiters and not backend.healthy
