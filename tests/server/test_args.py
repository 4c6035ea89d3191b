"""The server's own flags, as `shardserve serve` parses them."""

from __future__ import annotations

import pytest

from shardserve.cli import build_parser
from shardserve.server.args import API_KEY_ENV, VLLM_API_KEY_ENV, ServerArgs


def _api_key(*argv: str) -> str | None:
    return ServerArgs.from_namespace(build_parser().parse_args(["serve", *argv])).api_key


@pytest.mark.parametrize("env,argv,expected", [
    ({}, [], None),
    ({API_KEY_ENV: "ours"}, [], "ours"),
    # vLLM's variable: a deployment moved over from vLLM keeps its key instead of going open.
    ({VLLM_API_KEY_ENV: "theirs"}, [], "theirs"),
    ({API_KEY_ENV: "ours", VLLM_API_KEY_ENV: "theirs"}, [], "ours"),
    ({API_KEY_ENV: "ours", VLLM_API_KEY_ENV: "theirs"}, ["--api-key", "flag"], "flag"),
])
def test_api_key_from_flag_or_environment(monkeypatch, env, argv, expected):
    for name in (API_KEY_ENV, VLLM_API_KEY_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _api_key(*argv) == expected


def _preflight(app, origin: str, path: str = "/v1/chat/completions"):
    import asyncio

    import httpx

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as client:
            pre = await client.options(path, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            get = await client.get("/health", headers={"Origin": origin})
            return pre, get
    return asyncio.run(run())


@pytest.mark.parametrize("argv,origin,allowed", [
    ([], "https://app.example", True),  # vLLM's default: every origin
    (["--allowed-origins", '["https://app.example"]'], "https://app.example", True),
    (["--allowed-origins", '["https://app.example"]'], "https://evil.example", False),
])
def test_cors_preflight_as_vllm(tiny_llama_dir, argv, origin, allowed):
    """A browser on another origin: the preflight (OPTIONS, no API key) is answered before
    routing and the key check, and allowed origins get Access-Control-Allow-Origin."""
    from shardserve.engine.async_llm import AsyncLLM
    from shardserve.engine_args import engine_config_from_args
    from shardserve.server.app import build_app
    from shardserve.server.metrics import ServerMetrics
    from shardserve.server.state import ServerState

    args = build_parser().parse_args(["serve", "--model", tiny_llama_dir, "--max-model-len",
                                      "256", "--api-key", "k", *argv])
    config = engine_config_from_args(args).resolve()
    metrics = ServerMetrics(config.model_config.served_model_name)
    state = ServerState(config, ServerArgs.from_namespace(args), AsyncLLM(config, metrics, None),
                        metrics, [config.model_config.served_model_name])
    pre, get = _preflight(build_app(state), origin)
    assert (pre.status_code == 200) == allowed, pre.text
    assert (pre.headers.get("access-control-allow-origin") in ("*", origin)) == allowed
    assert (get.headers.get("access-control-allow-origin") in ("*", origin)) == allowed
    if allowed:
        assert "POST" in pre.headers["access-control-allow-methods"]


def test_cors_flags_reach_the_router():
    from shardserve.router.app import RouterArgs, build_router_app

    ns = build_parser().parse_args(["router", "--backend", "http://127.0.0.1:9",
                                    "--allowed-origins", '["https://app.example"]'])
    app = build_router_app(RouterArgs.from_namespace(ns))
    pre, _ = _preflight(app, "https://app.example")
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert _preflight(app, "https://evil.example")[0].status_code == 400


@pytest.mark.parametrize("argv,message", [
    # 0 would refuse every request, its expiry check spinning the event loop at full CPU.
    (["--max-queue-time", "0"], "above 0"),
    (["--max-queue-time", "-1"], "above 0"),
    (["--max-queue-time", "nan"], "finite"),
    (["--shutdown-timeout", "-5"], "at least 0"),
    (["--shutdown-timeout", "inf"], "finite"),
    (["--shutdown-timeout", "soon"], "not a number"),
])
def test_time_limits_out_of_range_are_refused_when_parsed(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--model", "m", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and message in err, err


def test_time_limits_in_range_are_kept():
    args = build_parser().parse_args(["serve", "--model", "m", "--max-queue-time", "0.5",
                                      "--shutdown-timeout", "0"])
    server_args = ServerArgs.from_namespace(args)
    assert (server_args.max_queue_time, server_args.shutdown_timeout) == (0.5, 0.0)
