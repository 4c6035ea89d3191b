"""Requests that arrive while the model is still loading get a 503 "overloaded" with the
OpenAI error shape, on every generation route: chat included, whose template needs the
tokenizer the engine has not loaded yet (it used to answer 400 "no chat template")."""

from __future__ import annotations

import asyncio

import httpx

from shardserve.cli import build_parser
from shardserve.engine.async_llm import AsyncLLM
from shardserve.engine_args import engine_config_from_args
from shardserve.server.app import build_app
from shardserve.server.metrics import ServerMetrics
from shardserve.server.state import ServerArgs, ServerState


def test_requests_during_loading_get_503(tiny_llama_dir):
    args = build_parser().parse_args(["serve", "--model", tiny_llama_dir, "--max-model-len", "256"])
    config = engine_config_from_args(args).resolve()
    metrics = ServerMetrics(config.model_config.served_model_name)
    engine = AsyncLLM(config, metrics, None)
    state = ServerState(config, ServerArgs.from_namespace(args), engine, metrics,
                        [config.model_config.served_model_name])
    # No lifespan: the engine is never started, as in the seconds before a real one is ready.
    transport = httpx.ASGITransport(app=build_app(state))

    async def post(path: str, body: dict) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body)

    for path, body in (("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
                       ("/v1/completions", {"prompt": "Hi", "max_tokens": 4})):
        response = asyncio.run(post(path, body))
        assert response.status_code == 503, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "overloaded" and "loading" in error["message"], error
    health = asyncio.run(_get(transport, "/health"))
    assert health.status_code == 503


async def _get(transport, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)
