"""When the engine core process dies, requests in flight end with an error, new ones get 503,
/live and /health say 503, the HTTP server keeps answering for --exit-on-engine-death seconds,
then exits with status 1. A core that stops answering without dying (SIGSTOP) is found by its
silent heartbeat and killed, with the same outcome and no process left behind; a step that is
merely slow (longer than the heartbeat timeout) is not mistaken for that."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

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


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").iterdir():
            children = [int(c) for c in (task / "children").read_text().split()]
            out += children
            stack += children
    return out


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.multiproc
def test_frozen_core_is_killed_and_slow_steps_are_not(tmp_path, tiny_llama_dir):
    """-pp 2 with every stage sleeping 1.2 s a forward: steps take longer than the 1 s
    heartbeat timeout and still finish. Then the core is SIGSTOPped mid-stream: it never exits
    and never answers, yet the stream ends with engine_dead within seconds, /live turns 503,
    the server exits 1 and neither the core nor its ranks are left behind."""
    server = start_server(tmp_path, "--max-model-len", "2048", "-pp", "2",
                          "--heartbeat-timeout-s", "1", "--exit-on-engine-death", "1",
                          model=tiny_llama_dir, api_key=None,
                          env_extra={"SHARDSERVE_PP_STAGE_DELAY_S": "1.2"})
    core = None
    try:
        start = time.monotonic()
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                       json={"prompt": "Once upon a time", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert time.monotonic() - start > 2 * 2 * 1.2  # two steps of two slow stages
        assert httpx.get(f"{server.base_url}/live", timeout=5).status_code == 200

        core = core_pid(server)
        processes = _descendants(server.proc.pid)
        body = {"prompt": "Once upon a time", "max_tokens": 20, "ignore_eos": True,
                "stream": True}
        events, stopped_at = [], None
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body,
                          timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if stopped_at is None:
                        os.kill(core, signal.SIGSTOP)
                        stopped_at = time.monotonic()
        # The heartbeat timeout plus a step in flight and the front's check interval.
        assert time.monotonic() - stopped_at < 10
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and "stopped answering" in error["message"]
        assert httpx.get(f"{server.base_url}/live", timeout=5).status_code == 503
        assert server.proc.wait(timeout=30) == 1
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in processes if _alive(pid)]
    finally:
        if core is not None and _alive(core):
            os.kill(core, signal.SIGKILL)
        server.stop()
