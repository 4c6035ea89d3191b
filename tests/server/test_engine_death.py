"""When the engine core process dies, requests in flight end with an error, new ones get 503,
/live and /health say 503, the HTTP server keeps answering for --exit-on-engine-death seconds,
then exits with status 1."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

from tests.server.conftest import core_pid, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    server = start_server(tmp_path_factory.mktemp("death_logs"), "--max-model-len", "2048",
                          "--exit-on-engine-death", "8", model=tiny_llama_dir, api_key=None)
    yield server
    server.stop()


def test_core_death_fails_requests_and_liveness(server):
    assert httpx.get(f"{server.base_url}/live", timeout=5).status_code == 200
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:
                os.kill(core_pid(server), signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_dead" and "engine" in error["message"]

    deadline = time.monotonic() + 10
    while httpx.get(f"{server.base_url}/live", timeout=5).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert server.proc.poll() is None  # the HTTP server still answers for a few seconds...
    # ...then exits non-zero so a supervisor restarts it.
    assert server.proc.wait(timeout=30) == 1
