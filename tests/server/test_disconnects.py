"""A client that goes away, mid-stream (200 of them) or mid-request, aborts its request and
leaves every KV block free. On the tiny model: the accounting does not depend on the weights,
and its steps are fast."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def _stream_then_disconnect(client: httpx.AsyncClient, i: int) -> bool:
    body = {"prompt": f"Count slowly to a hundred, number {i}:", "max_tokens": 200,
            "ignore_eos": True, "stream": True, "temperature": 1.0}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                return True  # leaving the block closes the connection mid-stream
    return False


def test_200_disconnects_mid_stream_free_every_block(tiny_server):
    before = tiny_server.wait_idle()

    async def run() -> list[bool]:
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=tiny_server.base_url, headers=AUTH, timeout=120,
                                     limits=limits) as client:
            semaphore = asyncio.Semaphore(10)

            async def one(i: int) -> bool:
                async with semaphore:
                    return await _stream_then_disconnect(client, i)

            return await asyncio.gather(*(one(i) for i in range(200)))

    assert all(asyncio.run(run()))
    after = tiny_server.wait_idle(timeout=60)
    assert after[("shardserve:kv_cache_usage_perc", ())] == 0.0
    assert after[("shardserve:num_requests_running", ())] == 0.0
    assert after[("shardserve:num_requests_waiting", ())] == 0.0
    aborted = (after[("shardserve:request_success_total", (("finished_reason", "abort"),))]
               - before[("shardserve:request_success_total", (("finished_reason", "abort"),))])
    assert aborted == 200
    generated = (after[("shardserve:generation_tokens_total", ())]
                 - before[("shardserve:generation_tokens_total", ())])
    assert generated < 200 * 200 / 4  # they were stopped, not run to max_tokens


def test_non_streaming_disconnect_aborts(tiny_server):
    before = tiny_server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        # The read timeout must fire while the answer is still being generated: 500 tokens
        # take well over a second even for the tiny model, the timeout is a quarter of one.
        httpx.post(f"{tiny_server.base_url}/v1/completions", headers=AUTH,
                   timeout=httpx.Timeout(0.25, connect=10),
                   json={"prompt": "Tell a very long story.", "max_tokens": 500, "ignore_eos": True})
    start = time.monotonic()
    after = tiny_server.wait_idle(timeout=30)
    assert after[("shardserve:kv_cache_usage_perc", ())] == 0.0
    assert time.monotonic() - start < 30
    key = ("shardserve:request_success_total", (("finished_reason", "abort"),))
    assert after[key] - before[key] == 1
