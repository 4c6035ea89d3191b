"""The router against stand-in replicas: overload, health, backend-file re-reads, retries,
broken streams. Each test runs in a few seconds."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from shardserve.router.backends import Backend
from shardserve.router.policy import make_policy, prefix_key
from tests.router.conftest import start_router, wait_for
from tests.router.fake_replica import FakeReplica

BODY = {"model": "m", "prompt": "hello", "max_tokens": 2}


@pytest.fixture
def fakes():
    replicas = [FakeReplica("a").start(), FakeReplica("b").start()]
    yield replicas
    for r in replicas:
        r.stop()


@pytest.fixture
def router_factory(tmp_path):
    routers = []

    def make(*args: str, wait_healthy: bool = True):
        routers.append(start_router(tmp_path, *args, wait_healthy=wait_healthy))
        return routers[-1]

    yield make
    for r in routers:
        r.stop()


def _post(router, body=BODY, timeout=10.0) -> httpx.Response:
    return httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=timeout)


def _backends(router) -> dict[str, dict]:
    return {b["url"]: b for b in httpx.get(f"{router.base_url}/backends", timeout=5).json()}


def test_forwards_and_balances(fakes, router_factory):
    a, b = fakes
    router = router_factory("--backend", a.url, "--backend", b.url)
    assert wait_for(lambda: all(x["healthy"] for x in _backends(router).values()), 10)
    served = {_post(router).json()["served_by"] for _ in range(6)}
    assert served == {"a", "b"}  # idle pool: ties rotate
    models = httpx.get(f"{router.base_url}/v1/models", timeout=5)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "m"
    with httpx.stream("POST", f"{router.base_url}/v1/completions", json={**BODY, "stream": True},
                      timeout=10) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) == 4
    metrics = router.metrics()
    assert metrics[("shardserve:router_requests_total", ())] == 8
    assert metrics[("shardserve:router_healthy_replicas", ())] == 2
    name_a = a.url.removeprefix("http://")  # a standalone router names replicas by host:port
    assert metrics[("shardserve:router_backend_healthy",
                    (("backend", a.url), ("replica", name_a)))] == 1
    # The replicas' own series follow the router's, each labelled with its replica.
    assert metrics[("shardserve:router_backend_scraped",
                    (("backend", a.url), ("replica", name_a)))] == 1
    assert metrics[("shardserve:num_requests_waiting", (("replica", name_a),))] == 0
    own = httpx.get(f"{router.base_url}/metrics?replicas=false", timeout=5).text
    assert "\nshardserve:router_requests_total 8.0\n" in own
    assert "shardserve:num_requests_waiting" not in own and "router_backend_scraped" not in own


def test_all_saturated_gives_503_with_retry_after(fakes, router_factory):
    a, b = fakes
    router = router_factory("--backend", a.url, "--backend", b.url, "--max-waiting", "8")
    a.waiting = b.waiting = 50
    assert wait_for(lambda: all(x["waiting"] == 50 for x in _backends(router).values()), 10)
    r = _post(router)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    assert a.num_requests == b.num_requests == 0  # nothing was queued on a replica
    assert router.metric("shardserve:router_requests_rejected_total") == 1
    b.waiting = 0  # one replica frees up: traffic resumes there
    assert wait_for(lambda: _post(router).status_code == 200, 10)
    assert _post(router).json()["served_by"] == "b"


def test_unhealthy_replicas_leave_and_come_back(fakes, router_factory):
    a, b = fakes
    router = router_factory("--backend", a.url, "--backend", b.url)
    a.healthy = b.healthy = False
    assert wait_for(lambda: httpx.get(f"{router.base_url}/health", timeout=5).status_code == 503, 5)
    r = _post(router)
    assert r.status_code == 503 and "retry-after" in r.headers
    assert r.json()["error"]["code"] == "no_healthy_replica"
    a.healthy = True
    assert wait_for(lambda: httpx.get(f"{router.base_url}/health", timeout=5).status_code == 200, 5)
    assert {_post(router).json()["served_by"] for _ in range(4)} == {"a"}


def test_every_replica_refusing_connections_gives_503_not_502(fakes, router_factory):
    """Replicas that went away since the last probe: the first request to find them all gone
    reached no engine, so it gets the router's own 503 + Retry-After (safe to retry), as the
    requests after it do, not a 502 naming the last connection refused."""
    a, b = fakes
    router = router_factory("--backend", a.url, "--backend", b.url, "--health-interval", "30")
    a.stop()
    b.stop()
    r = _post(router)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "no_healthy_replica"
    assert router.metric("shardserve:router_requests_rejected_total") == 1


def test_proxy_settings_in_the_environment_do_not_capture_replica_traffic(fakes, tmp_path):
    """$HTTP_PROXY (set for model downloads behind a corporate proxy) used to carry the
    router's probes and requests too: under `serve -dp N` its own 127.0.0.1 replicas were
    then never healthy and every request got 503."""
    a, _ = fakes
    dead = f"http://127.0.0.1:{FakeReplica('unused').port}"  # a proxy that is not there
    router = start_router(tmp_path, "--backend", a.url,
                          env={"HTTP_PROXY": dead, "http_proxy": dead, "ALL_PROXY": dead,
                               "NO_PROXY": "", "no_proxy": ""})
    try:
        assert _post(router).json()["served_by"] == "a"
        assert router.metric("shardserve:router_backend_scraped", backend=a.url,
                             replica=a.url.removeprefix("http://")) == 1
    finally:
        router.stop()


def test_backends_file_is_reread(fakes, router_factory, tmp_path):
    a, b = fakes
    listing = tmp_path / "backends.txt"
    # A line that is no URL is skipped (and logged), not probed: its InvalidURL stopped the
    # router at start-up, and later failed every refresh round.
    listing.write_text(f"# replicas\n{a.url}\nhttp://127.0.0.1:notaport\n")
    router = router_factory("--backends-file", str(listing))
    assert set(_backends(router)) == {a.url}
    assert {_post(router).json()["served_by"] for _ in range(3)} == {"a"}
    listing.write_text(f"{b.url}  # a moved to b\n")
    assert wait_for(lambda: set(_backends(router)) == {b.url}
                    and _backends(router)[b.url]["healthy"], 10)
    assert {_post(router).json()["served_by"] for _ in range(3)} == {"b"}
    listing.write_text(f"{a.url}\n{b.url}\n")
    assert wait_for(lambda: len([x for x in _backends(router).values() if x["healthy"]]) == 2, 10)


def test_failed_replica_is_retried_elsewhere(fakes, router_factory):
    a, b = fakes
    dead = f"http://127.0.0.1:{FakeReplica('unused').port}"  # nothing listens there
    router = router_factory("--backend", a.url, "--backend", b.url, "--backend", dead)
    a.mode = "500"
    for _ in range(6):  # some land on a (500) or dead (refused) first and move on
        r = _post(router)
        assert r.status_code == 200 and r.json()["served_by"] == "b"
    assert router.metric("shardserve:router_retries_total") >= 1
    assert router.metric("shardserve:router_request_failures_total") == 0
    assert router.metric("shardserve:router_backend_failures_total", backend=a.url,
                         replica=a.url.removeprefix("http://")) >= 1
    b.mode = "500"  # nowhere left to go: the replica's own error comes back
    assert _post(router).status_code == 500


def test_stream_broken_midway_ends_with_error_event(fakes, router_factory):
    a, b = fakes
    router = router_factory("--backend", a.url)
    a.mode = "break"
    with httpx.stream("POST", f"{router.base_url}/v1/completions", json={**BODY, "stream": True},
                      timeout=10) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_failed" and "mid-stream" in error["message"]
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-2]] == ["t0", "t1"]
    assert router.metric("shardserve:router_request_failures_total") == 1


def test_client_disconnect_closes_the_replica_stream(fakes, router_factory):
    a, b = fakes
    router = router_factory("--backend", a.url)
    a.mode = "long"  # 10 s of chunks
    with httpx.stream("POST", f"{router.base_url}/v1/completions", json={**BODY, "stream": True},
                      timeout=10) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    assert wait_for(lambda: a.num_streams_closed == 1, 3), "the replica kept streaming"
    assert wait_for(lambda: _backends(router)[a.url]["in_flight"] == 0, 3)


def test_hung_replica_is_given_up(fakes, router_factory):
    """A replica that stops answering (no connection reset): once its probes fail twice, its
    non-streamed request moves to another replica and its stream ends with an error event."""
    a, b = fakes
    router = router_factory("--backend", a.url, "--backend", b.url)
    b.waiting = 50  # saturated: both requests below land on a
    assert wait_for(lambda: _backends(router)[b.url]["waiting"] == 50, 10)
    a.mode = "hang"

    def stream() -> list[str]:
        with httpx.stream("POST", f"{router.base_url}/v1/completions",
                          json={**BODY, "stream": True}, timeout=30) as r:
            return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream)
        plain = pool.submit(_post, router, BODY, 30.0)
        assert wait_for(lambda: a.num_requests == 2, 10)
        time.sleep(0.3)  # the stream's first chunks are through
        b.waiting = 0
        a.hung = True
        started = time.monotonic()
        events = streamed.result(timeout=30)
        answer = plain.result(timeout=30)
    print(f"hung replica given up after {time.monotonic() - started:.1f} s")
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "replica_failed"
    assert answer.status_code == 200 and answer.json()["served_by"] == "b"
    assert not _backends(router)[a.url]["healthy"]
    a.hung = False
    a.mode = "ok"


def test_prefix_aware_policy_is_sticky_until_overloaded():
    backends = [Backend(f"http://r{i}") for i in range(3)]
    policy = make_policy("prefix-aware", max_imbalance=4)
    keys = [f"system prompt {i} " * 10 for i in range(30)]
    first = {k: policy.choose(backends, k) for k in keys}
    assert len({b.url for b in first.values()}) == 3  # prefixes spread over the replicas
    assert all(policy.choose(backends, k) is first[k] for k in keys)  # and stay put
    # A replica leaving moves only its own prefixes.
    gone = backends[0]
    rest = backends[1:]
    for k in keys:
        if first[k] is not gone:
            assert policy.choose(rest, k) is first[k]
    # Overloaded target: least-load decides.
    target = first[keys[0]]
    target.in_flight = 10
    assert policy.choose(backends, keys[0]) is not target


def test_prefix_key_reads_completions_and_chat():
    assert prefix_key("/v1/completions", b'{"prompt": "abcdef"}', 3) == "abc"
    assert prefix_key("/v1/completions", b'{"prompt": ["xyz", "q"]}', 10) == "xyz"
    assert prefix_key("/v1/completions", b'{"prompt": [1, 2, 3]}', 10) == "1,2,3"
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert prefix_key("/v1/chat/completions", json.dumps(chat).encode(), 100) == \
        "system\nbe brief\nuser\nhi\n"
    assert prefix_key("/v1/completions", b"not json", 10) is None


@pytest.mark.parametrize("argv, message", [
    (["--backend", "http://127.0.0.1:notaport"], "Invalid port"),
    (["--backend", "ftp://127.0.0.1:8000"], "give http://HOST:PORT"),
    (["--backend", ""], "give http://HOST:PORT"),
    (["--backend", "http://bad host:8000"], "give http://HOST:PORT"),
    (["--backends-dns", "my-svc-headless"], "expected NAME:PORT"),
    (["--backend", "h:1", "--max-retries", "-1"], "at least 0"),
    (["--backend", "h:1", "--health-interval", "0"], "more than 0"),
    (["--backend", "h:1", "--max-in-flight", "0"], "at least 1"),
    (["--backend", "h:1", "--max-waiting", "0"], "more than 0"),
    (["--backend", "h:1", "--health-interval", "nan"], "finite"),
    (["--backend", "h:1", "--health-interval", "inf"], "finite"),
])
def test_bad_router_flags_are_usage_errors(argv, message, capsys):
    """Caught when the command line is read: before, a bad port stopped the router at start-up
    with httpx's traceback, other bad URLs were probed (and unhealthy) forever, --max-retries
    -1 answered every request 503 and --health-interval 0 probed in a busy loop."""
    from shardserve.cli import build_parser
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["router", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_backend_urls_are_normalized():
    from shardserve.cli import build_parser
    args = build_parser().parse_args(["router", "--backend", "10.0.0.5:8000/",
                                      "--backend", " https://r1:8443 "])
    assert args.backend == ["http://10.0.0.5:8000", "https://r1:8443"]
