"""`shardserve serve -dp 2` on CPU with a tiny random model: the same outputs as DP 1, both
replicas serve, prefix-aware routing raises the prefix-cache hit rate over round-robin, and a
replica killed under load loses no request. The supervisor restarts replicas that exit, gives
up after MAX_RESTARTS, and kills (then restarts) one that accepts connections but answers no
health probe, with its whole process tree."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.router.conftest import start_router, wait_for
from tests.server.conftest import ServerProcess, start_server

pytestmark = pytest.mark.multiproc

PROMPTS = ["The quick brown fox", "Once upon a time", "In a galaxy far away", "Hello world"]


@pytest.fixture(scope="module")
def dp1(tmp_path_factory, tiny_model_dir):
    server = start_server(tmp_path_factory.mktemp("dp1"), "--max-model-len", "1024",
                          model=tiny_model_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dp2(tmp_path_factory, tiny_model_dir):
    server = start_server(tmp_path_factory.mktemp("dp2"), "--max-model-len", "1024",
                          "--data-parallel-size", "2", "--router-health-interval", "0.5",
                          model=tiny_model_dir)
    assert wait_for(lambda: _healthy(server) == 2, 120), server.log_tail()
    yield server
    # Children die with the parent, even one killed outright (PR_SET_PDEATHSIG).
    pids = [b["pid"] for b in _replicas(server)]
    server.proc.kill()
    server.proc.wait(10)
    left = wait_for(lambda: not any(_alive(pid) for pid in pids), 30) is None
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not left, "replica processes outlived the killed front process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _replicas(front: ServerProcess) -> list[dict]:
    return httpx.get(f"{front.base_url}/backends", timeout=5).json()


def _healthy(front: ServerProcess) -> int:
    return sum(b["healthy"] for b in _replicas(front))


def _replica_metrics(url: str) -> ServerProcess:
    # ServerProcess only needs a port to read /metrics.
    return ServerProcess(proc=None, port=int(url.rsplit(":", 1)[1]), log_path=None, api_key=None)


def _complete(server: ServerProcess, prompt: str, **kw) -> str:
    body = {"prompt": prompt, "max_tokens": 12, **kw}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=server.headers,
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_same_outputs_as_dp1(dp1, dp2):
    for params in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}):
        for prompt in PROMPTS:
            one, two = _complete(dp1, prompt, **params), _complete(dp2, prompt, **params)
            assert one == two, (prompt, params)
    # Chat too, through both layers of the stack.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 0.7, "seed": 7}
    texts = [httpx.post(f"{s.base_url}/v1/chat/completions", json=body, headers=s.headers,
                        timeout=60).json()["choices"][0]["message"]["content"] for s in (dp1, dp2)]
    assert texts[0] == texts[1]


@pytest.mark.heavy
def test_tp2_dp4_eight_ranks_match_dp1(dp1, tmp_path):
    """Issue 11's TP 2 x DP 4 (8 ranks) at tiny size: four replicas of two TP ranks each come
    up behind the router, give DP 1's outputs, and share the requests."""
    server = start_server(tmp_path, "--max-model-len", "1024", "-tp", "2",
                          "--data-parallel-size", "4", "--router-health-interval", "0.5",
                          model=dp1_model(dp1))
    try:
        assert wait_for(lambda: _healthy(server) == 4, 240), server.log_tail()
        params = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda p: _complete(server, p, **params), PROMPTS * 2))
        assert texts == [_complete(dp1, p, **params) for p in PROMPTS * 2]
        served = [sum(v for (name, _), v in _replica_metrics(r["url"]).metrics().items()
                      if name == "shardserve:request_success_total")
                  for r in _replicas(server)]
        assert len(served) == 4 and sum(served) >= len(PROMPTS) * 2, served
        assert sum(c > 0 for c in served) >= 2, served  # routed, not all to one replica
    finally:
        server.stop()


def dp1_model(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/v1/models", headers=server.headers,
                     timeout=10).json()["data"][0]["root"]


def test_both_replicas_serve(dp2):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: _complete(dp2, p, max_tokens=16, ignore_eos=True), PROMPTS * 2))
    counts = {}
    for replica in _replicas(dp2):
        m = _replica_metrics(replica["url"]).metrics()
        counts[replica["url"]] = sum(v for (name, _), v in m.items()
                                     if name == "shardserve:request_success_total")
    print("requests per replica:", counts)
    assert len(counts) == 2 and all(c > 0 for c in counts.values()), counts


def test_front_metrics_aggregate_the_replicas(dp2):
    """The front port's /metrics holds the router's series and every replica's, labelled
    replica="0" / "1": each replica's counters there equal its own /metrics, so their sum is the
    deployment's, and they move as requests are served."""
    def success(m: dict, replica: str | None = None) -> float:
        return sum(v for (name, labels), v in m.items()
                   if name == "shardserve:request_success_total"
                   and (replica is None or ("replica", replica) in labels))

    before = dp2.metrics()
    for prompt in PROMPTS:
        _complete(dp2, prompt, max_tokens=4)
    text = httpx.get(f"{dp2.base_url}/metrics", timeout=10).text
    front = dp2.metrics()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a family declared twice"
    assert front[("shardserve:router_requests_total", ())] == \
        before[("shardserve:router_requests_total", ())] + len(PROMPTS)
    assert success(front) == success(before) + len(PROMPTS)
    names = {dict(labels)["replica"]: dict(labels)["backend"] for (name, labels) in front
             if name == "shardserve:router_backend_requests_total"}
    assert sorted(names) == ["0", "1"]
    for replica, url in names.items():
        assert front[("shardserve:router_backend_scraped",
                      (("backend", url), ("replica", replica)))] == 1
        assert success(front, replica) == success(_replica_metrics(url).metrics()) > 0
        hist = "shardserve:e2e_request_latency_seconds"
        count = front[(hist + "_count", (("replica", replica),))]
        assert front[(hist + "_bucket", (("le", "+Inf"), ("replica", replica)))] == count > 0


def _hit_rate_run(router: ServerProcess, replicas: list[str], tag: str,
                  headers: dict[str, str]) -> float:
    """3 groups of 4 requests; each group shares a ~600-character prefix no earlier run used.
    Returns prefix-cache hits / queries over both replicas for this run alone."""
    def totals() -> tuple[float, float]:
        hits = queries = 0.0
        for url in replicas:
            m = _replica_metrics(url)
            hits += m.metric("shardserve:prefix_cache_hits_total")
            queries += m.metric("shardserve:prefix_cache_queries_total")
        return hits, queries

    rng = random.Random(tag)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
    h0, q0 = totals()
    for group in range(3):
        prefix = f"[{tag} {group}] " + " ".join(rng.choice(words) for _ in range(100))
        for i in range(4):
            r = httpx.post(f"{router.base_url}/v1/completions", timeout=60, headers=headers,
                           json={"prompt": f"{prefix} question {i}: {rng.random()}",
                                 "max_tokens": 1})
            assert r.status_code == 200, r.text
    time.sleep(1.5)  # let the replicas publish their last counters
    h1, q1 = totals()
    return (h1 - h0) / max(q1 - q0, 1.0)


def test_prefix_aware_beats_round_robin(dp2, tmp_path):
    replicas = [b["url"] for b in _replicas(dp2)]
    backend_args = [arg for url in replicas for arg in ("--backend", url)]
    rates = {}
    for policy in ("round-robin", "prefix-aware"):
        router = start_router(tmp_path, *backend_args, "--policy", policy)
        assert wait_for(lambda: all(b["healthy"] for b in _replicas(router)), 10)
        try:
            rates[policy] = _hit_rate_run(router, replicas, policy, dp2.headers)
        finally:
            router.stop()
    print(f"prefix-cache hit rate: round-robin {rates['round-robin']:.2f}, "
          f"prefix-aware {rates['prefix-aware']:.2f}")
    assert rates["prefix-aware"] > 1.3 * rates["round-robin"], rates
    assert rates["prefix-aware"] > 0.5, rates


def test_client_disconnect_through_router_frees_the_replica(dp2):
    """A client that hangs up mid-stream: the router closes its replica stream, the replica
    aborts the request and frees its KV blocks."""
    body = {"prompt": "Disconnect me", "max_tokens": 400, "ignore_eos": True, "stream": True}
    for _ in range(4):
        with httpx.stream("POST", f"{dp2.base_url}/v1/completions", json=body,
                          headers=dp2.headers, timeout=30) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data: "))
    assert wait_for(lambda: all(b["in_flight"] == 0 for b in _replicas(dp2)), 10)
    for replica in _replicas(dp2):
        m = _replica_metrics(replica["url"]).wait_idle(timeout=15)
        busy = [m.get((f"shardserve:{g}", ()), 0.0) for g in
                ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        assert not any(busy), (replica["url"], busy)


def _run_request(front: ServerProcess, i: int, stream: bool) -> str:
    """'complete', 'error' (a clear OpenAI error) or 'lost' (anything else, hangs included)."""
    body = {"prompt": f"Request {i}: tell a long story", "max_tokens": 160,
            "ignore_eos": True, "temperature": 0.0, "stream": stream}
    url = f"{front.base_url}/v1/completions"
    try:
        if not stream:
            r = httpx.post(url, json=body, headers=front.headers, timeout=90)
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                ok = choice["finish_reason"] == "length" and r.json()["usage"][
                    "completion_tokens"] == 160
                return "complete" if ok else "lost"
            return "error" if r.json().get("error", {}).get("message") else "lost"
        events = []
        with httpx.stream("POST", url, json=body, headers=front.headers, timeout=90) as r:
            if r.status_code != 200:
                r.read()
                return "error" if r.json().get("error", {}).get("message") else "lost"
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "lost"
        last = json.loads(events[-2])
        if "error" in last:
            return "error" if last["error"].get("message") else "lost"
        return "complete" if last["choices"][0]["finish_reason"] == "length" else "lost"
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return "lost"


def test_replica_killed_under_load_loses_nothing(dp2):
    """Runs last in this module: it kills one of the shared server's replicas (which the
    front restarts)."""
    num = 8
    with concurrent.futures.ThreadPoolExecutor(num) as pool:
        futures = [pool.submit(_run_request, dp2, i, i % 2 == 0) for i in range(num)]
        busy = wait_for(lambda: [b for b in _replicas(dp2) if b["in_flight"] > 0]
                        if all(b["in_flight"] > 0 for b in _replicas(dp2)) else None, 30, 0.05)
        assert busy, "requests never reached both replicas"
        time.sleep(0.5)  # let streams get under way
        victim = busy[0]
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        # New requests succeed within seconds, while the old ones are still running.
        first_ok = None
        while time.monotonic() - killed_at < 15:
            try:
                r = httpx.post(f"{dp2.base_url}/v1/completions", headers=dp2.headers, timeout=30,
                               json={"prompt": "after the kill", "max_tokens": 4})
                if r.status_code == 200:
                    first_ok = time.monotonic() - killed_at
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        outcomes = [f.result(timeout=120) for f in futures]
    after = [_complete(dp2, "after the kill", max_tokens=4) for _ in range(4)]
    counts = {k: outcomes.count(k) for k in ("complete", "error", "lost")}
    print(f"replica killed with {num} requests in flight: {counts['complete']} complete, "
          f"{counts['error']} clear errors, {counts['lost']} lost or hung; first new request "
          f"succeeded {first_ok:.1f} s after the kill" if first_ok is not None else
          f"no new request succeeded within 15 s; {counts}")
    assert counts["lost"] == 0, outcomes
    assert first_ok is not None and first_ok < 10
    assert len(after) == 4
    assert wait_for(lambda: any(not b["healthy"] or b["pid"] != victim["pid"]
                                for b in _replicas(dp2) if b["url"] == victim["url"]), 10)


def test_layout_that_does_not_fit_is_refused_before_any_replica_starts(tiny_model_dir):
    """-dp 2 -tp 3 on a model with 4 heads: one clear error and exit 2 from the front process,
    not two replicas failing and being restarted over and over behind a router."""
    import subprocess
    import sys

    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "shardserve.cli", "serve", "--model", tiny_model_dir, "--device",
         "cpu", "--port", "0", "-dp", "2", "-tp", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tensor_parallel_size=3 does not fit this model" in proc.stderr
    assert "Replica" not in proc.stdout + proc.stderr  # none was started
    assert time.monotonic() - start < 60


def _supervise(supervisor, timeout: float) -> list[float]:
    """Run a Supervisor (no router) until it gives up -> the times it gave up."""
    import asyncio

    from shardserve.router.backends import BackendPool, DiscoveryConfig

    gave_up: list[float] = []
    supervisor.on_give_up = lambda: gave_up.append(time.monotonic())

    async def run() -> None:
        supervisor.start(BackendPool(DiscoveryConfig(static=[])))
        await asyncio.wait_for(supervisor._task, timeout)

    asyncio.run(run())
    return gave_up


def test_front_gives_up_once_every_replica_is_dead_for_good(monkeypatch):
    """Replicas that keep exiting are restarted MAX_RESTARTS times each; then the front stops
    (exit code 1) instead of answering 503 forever."""
    import sys

    from shardserve.router import data_parallel as dp

    monkeypatch.setattr(dp, "MAX_RESTARTS", 2)
    replicas = [dp.Replica(i, 1, [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
                for i in range(2)]
    for r in replicas:
        r.may_restart = True  # they served before: each exit is worth a restart
    gave_up = _supervise(dp.Supervisor(replicas), timeout=60)
    assert len(gave_up) == 1
    assert [r.restarts for r in replicas] == [2, 2]
    assert all(r.proc.returncode == 3 for r in replicas)


def test_replica_failing_at_start_up_stops_the_front_at_once():
    """A replica that exits before it was ever ready (an error only loading finds) stops the
    whole command with exit code 1, as vLLM's DP start-up does, rather than being restarted
    MAX_RESTARTS times (minutes of reloading, the same error each time) while the front serves
    on with the other replicas."""
    import sys

    from shardserve.router import data_parallel as dp

    replicas = [dp.Replica(0, 1, [sys.executable, "-c", "import time; time.sleep(60)"],
                           dict(os.environ)),
                dp.Replica(1, 2, [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))]
    supervisor = dp.Supervisor(replicas)
    try:
        gave_up = _supervise(supervisor, timeout=20)
        assert len(gave_up) == 1
        assert [r.restarts for r in replicas] == [0, 0]
        assert replicas[1].proc.returncode == 3
    finally:
        supervisor.stop(signal.SIGKILL, timeout=5)
    assert replicas[0].proc.returncode == -signal.SIGKILL  # the healthy one goes too


def test_replica_port_is_held_from_the_start_and_freed_when_it_dies(tmp_path):
    """The front binds each replica's port when it plans the replica and hands the socket to
    the child: no other process can take the port before the replica binds it (14 test
    processes on one machine did). Once the child has it the front's copy is closed, so a dead
    replica's port refuses connections (the router sends them elsewhere); a restart binds it
    again and hands it over the same way."""
    import socket
    import sys

    from shardserve.router import data_parallel as dp
    from shardserve.server.listen import listen_socket

    report = tmp_path / "report"
    code = ("import os, pathlib, sys, time\n"
            "from shardserve.server.listen import INHERITED_FD_ENV, bound_port, serving_socket\n"
            "fd = os.environ.get(INHERITED_FD_ENV)\n"
            "sock = serving_socket('127.0.0.1', int(sys.argv[1]))\n"
            "pathlib.Path(sys.argv[2]).write_text(f'{fd} {bound_port(sock)}')\n"
            "time.sleep(60)\n")
    held = listen_socket("127.0.0.1", 0)
    port = held.getsockname()[1]
    replica = dp.Replica(0, port, [sys.executable, "-c", code, str(port), str(report)], dict(os.environ),
                         sock=held)
    try:
        for _ in ("first start", "restart"):
            report.unlink(missing_ok=True)
            replica.start()
            assert replica.sock is None  # handed over, not kept
            assert wait_for(lambda: report.exists() and report.read_text(), 30)
            fd, child_port = report.read_text().split()
            assert fd != "None" and int(child_port) == port  # it served on the handed socket
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # listening, in the child alone
            replica.proc.kill()
            replica.proc.wait(10)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        if replica.proc is not None and replica.proc.poll() is None:
            replica.proc.kill()


def test_frozen_replica_is_killed_with_its_children_and_restarted(monkeypatch):
    """A replica (here a process with a child, standing for its engine core) that answered
    before and whose port now accepts connections but never answers /health, as a SIGSTOPped
    server's does: after HUNG_AFTER_S of probes timing out, both processes are killed and the
    replica restarted. A port that refuses connections, or one that accepts them but has not
    answered since the replica started (it binds its port before it resolves the model and
    builds its app: slow on a busy host), is a replica still starting, never taken for hung."""
    import asyncio
    import socket
    import sys

    from shardserve.router import data_parallel as dp
    from shardserve.router.backends import BackendPool, DiscoveryConfig

    monkeypatch.setattr(dp, "HUNG_AFTER_S", 1.5)
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)  # the kernel completes handshakes; nobody ever reads
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    starting = socket.socket()
    starting.bind(("127.0.0.1", 0))
    starting.listen(64)  # as frozen's, but it never answered: still starting
    # The child outlives a killed parent (for 20 s: no test leaves it behind for long).
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(20)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n")
    replicas = [dp.Replica(i, sock.getsockname()[1], [sys.executable, "-c", code],
                           dict(os.environ))
                for i, sock in enumerate((frozen, refused, starting))]
    for r in replicas:
        r.start = lambda r=r: setattr(r, "proc", _popen_with_stdout(r.argv))
    supervisor = dp.Supervisor(replicas)
    pool = BackendPool(DiscoveryConfig(static=[r.url for r in replicas]),
                       health_interval_s=0.2, probe_timeout_s=0.3)

    async def run() -> None:
        await pool.start()
        supervisor.start(pool)
        pool.add(replicas[0].url).answered_at = time.monotonic()  # it served before freezing
        first = replicas[0].proc
        first_child = int(first.stdout.readline())
        deadline = time.monotonic() + 30
        while replicas[0].restarts == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert replicas[0].restarts == 1 and first.returncode == -signal.SIGKILL
        assert wait_for(lambda: not _alive(first_child), 5)
        for r in replicas[1:]:
            assert r.restarts == 0 and r.proc.poll() is None
        await pool.stop()

    try:
        asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        supervisor.stop(signal.SIGKILL, timeout=5)
        for sock in (frozen, refused, starting):
            sock.close()


def test_replica_that_will_not_stop_is_killed_with_its_children():
    """A replica still there when the front stops (its engine core waits on a frozen rank) is
    killed, and so is what runs below it: a stopped rank cannot leave by itself."""
    import sys

    from shardserve.router import data_parallel as dp

    code = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "rank = subprocess.Popen([sys.executable, '-c', 'import os, signal; "
            "os.kill(os.getpid(), signal.SIGSTOP)'])\n"
            "print(rank.pid, flush=True)\n"
            "time.sleep(600)\n")
    replica = dp.Replica(0, 0, [sys.executable, "-c", code], dict(os.environ))
    replica.proc = _popen_with_stdout(replica.argv)
    rank = int(replica.proc.stdout.readline())
    try:
        assert wait_for(lambda: Path(f"/proc/{rank}/stat").read_text().rsplit(") ", 1)[1][0]
                        == "T", 10)
        dp.Supervisor([replica]).stop(signal.SIGINT, timeout=0.5)
        assert replica.proc.returncode == -signal.SIGKILL
        assert wait_for(lambda: not _alive(rank), 5)
    finally:
        replica.proc.kill()
        if _alive(rank):
            os.kill(rank, signal.SIGKILL)


def _popen_with_stdout(argv: list[str]):
    import subprocess
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def test_sigterm_turns_the_front_health_503_at_once():
    """`serve -dp N` on SIGTERM: /health says draining at once, as one server's does, not a
    probe interval later when the replicas' own 503s have been read (a readiness probe or load
    balancer in that window kept sending work to a stopping deployment)."""
    import asyncio

    import uvicorn

    from shardserve.router import data_parallel as dp
    from shardserve.router.app import RouterArgs, build_router_app

    app = build_router_app(RouterArgs())
    pool = app.state.pool
    pool.add("http://127.0.0.1:1").healthy = True  # as the last probe left it
    supervisor = dp.Supervisor([])
    supervisor.pool = pool  # what Supervisor.start records
    front = dp._FrontServer(uvicorn.Config(app), supervisor, shutdown_timeout=1.0)

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            assert (await client.get("/health")).status_code == 200
            front.handle_exit(signal.SIGTERM, None)
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "draining", r.text
        while not front.should_exit:  # the drain ends, nothing left to wait for
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(run(), 10))
