"""The router's /dashboard over a real replica (the tiny server, behind --api-key) and a
stand-in replica that has no dashboard: per-replica health and load, totals, the key passed
through to the replicas, and the page in Chromium."""

from __future__ import annotations

import httpx
import pytest

from tests.bench.png import png_size
from tests.dashboard.chromium import elements_by_id, have_chromium, number, run_chromium
from tests.dashboard.conftest import AUTH
from tests.router.conftest import start_router, wait_for
from tests.router.fake_replica import FakeReplica
from tests.server.conftest import API_KEY


@pytest.fixture
def fake():
    replica = FakeReplica("fake").start()
    yield replica
    replica.stop()


@pytest.fixture
def router(dashboard_server, fake, tmp_path):
    router = start_router(tmp_path, "--backend", dashboard_server.base_url, "--backend", fake.url)
    yield router
    router.stop()


def _data(router, headers=AUTH) -> httpx.Response:
    return httpx.get(f"{router.base_url}/dashboard/data", headers=headers, timeout=15)


def test_router_dashboard_data(dashboard_server, fake, router):
    assert httpx.get(f"{router.base_url}/dashboard", timeout=10).status_code == 200
    # The router has no key of its own: the replica behind --api-key refuses, so does the router.
    assert _data(router, {}).status_code == 401
    assert _data(router, {"Authorization": "Bearer wrong"}).status_code == 401

    r = httpx.post(f"{router.base_url}/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": "through the router", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200
    fake.waiting = 3
    metrics = dashboard_server.wait_idle()

    def settled():
        d = _data(router).json()
        rows = {row["url"]: row for row in d["replicas"]}
        return d if rows[fake.url]["waiting"] == 3 and all(x["healthy"] for x in rows.values()) \
            else None

    data = wait_for(settled, 15)
    assert data is not None, _data(router).json()
    assert data["kind"] == "router" and data["server"]["healthy_replicas"] == 2
    rows = {row["url"]: row for row in data["replicas"]}
    real, stand_in = rows[dashboard_server.base_url], rows[fake.url]
    assert real["data"]["kind"] == "server" and real["data"]["layout"]["tp"] == 1
    assert real["requests"] >= 1  # what the router sent it
    assert stand_in["data"] is None and stand_in["data_error"] == "HTTP 404"
    assert stand_in["load"] >= 3  # from the router's own /metrics probe of it
    assert data["gauges"]["waiting"] == 3 and data["layout"]["dp"] == 2
    generated = metrics[("shardserve:generation_tokens_total", ())]
    assert data["totals"]["generation_tokens"] == generated
    assert data["latency"]["ttft"]["lifetime"]["count"] == \
        metrics[("shardserve:time_to_first_token_seconds_count", ())]

    fake.healthy = False  # /health 503: out of the healthy set on the next probe
    data = wait_for(lambda: (d := _data(router).json())["server"]["healthy_replicas"] == 1 and d,
                    15)
    assert data, "the stand-in replica never left the healthy set"
    stand_in = next(row for row in data["replicas"] if row["url"] == fake.url)
    assert not stand_in["healthy"] and "503" in stand_in["status"]


@pytest.mark.skipif(not have_chromium(), reason="needs /usr/bin/chromium")
def test_router_dashboard_in_chromium(dashboard_server, fake, router, tmp_path):
    fake.waiting = 2
    url = f"{router.base_url}/dashboard?interval=500#key={API_KEY}"
    assert wait_for(lambda: len([r for r in _data(router).json()["replicas"]
                                 if r["healthy"]]) == 2, 15)
    page = elements_by_id(run_chromium(url, tmp_path, budget_ms=2000))
    assert page["kind"]["text"] == "router" and number(page, "layout-dp") == 2
    rows = [page[f"replica-{i}-row"]["text"] for i in (0, 1)]
    for replica_url in (dashboard_server.base_url, fake.url):
        assert sum(replica_url in row for row in rows) == 1, rows
    for i in (0, 1):
        assert number(page, f"replica-{i}-health") == 1
    loads = sorted(number(page, f"replica-{i}-load") for i in (0, 1))
    assert loads[1] >= 2
    shot = tmp_path / "router-dashboard.png"
    run_chromium(url, tmp_path, screenshot=shot, budget_ms=2000)
    assert png_size(shot) == (1280, 900)
    print(f"screenshot: {shot}")


def _row(index: int, healthy: bool, data: dict | None, running: float, waiting: float,
         kv: float) -> dict:
    return {"index": index, "url": f"http://10.0.0.{index}:8000", "healthy": healthy,
            "data": data, "running": running, "waiting": waiting, "kv_cache_usage": kv}


def _replica_data(recent_window_s: float | None) -> dict:
    return {"totals": {}, "rates": {}, "latency": {}, "gpus": [], "layout": None,
            "recent_window_s": recent_window_s}


def test_totals_leave_out_a_dead_replicas_stale_numbers():
    from shardserve.dashboard.router_view import _totals

    rows = [_row(0, True, _replica_data(58.0), 2, 1, 0.8),
            _row(1, False, _replica_data(61.0), 1, 0, 0.4),  # draining/loading: data is current
            _row(2, True, None, 3, 0, 0.6),  # no dashboard: the router's probe is current
            _row(3, False, None, 8, 5, 0.9)]  # killed: the last probe's numbers, stale
    t = _totals(rows)
    assert t["gauges"]["running"] == 6 and t["gauges"]["waiting"] == 1
    assert t["gauges"]["kv_cache_usage"] == pytest.approx(0.6)
    # The page labels the recent percentiles with the window; without it, it says "waiting".
    assert t["recent_window_s"] == 61.0
    assert _totals([_row(0, False, None, 1, 1, 0.5)])["gauges"] == \
        {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}
    assert _totals([_row(0, True, _replica_data(None), 0, 0, 0)])["recent_window_s"] is None


def test_status_while_the_replicas_load():
    from shardserve.dashboard.router_view import _status

    loading = {**_replica_data(None), "server": {"status": "loading"}}
    assert _status([_row(0, False, loading, 0, 0, 0), _row(1, False, None, 0, 0, 0)]) == "loading"
    assert _status([_row(0, False, loading, 0, 0, 0), _row(1, True, None, 0, 0, 0)]) == "ok"
    dead = {**_replica_data(None), "server": {"status": "dead"}}
    assert _status([_row(0, False, dead, 0, 0, 0), _row(1, False, None, 0, 0, 0)]) == \
        "no_healthy_replica"
