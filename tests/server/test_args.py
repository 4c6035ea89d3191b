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
