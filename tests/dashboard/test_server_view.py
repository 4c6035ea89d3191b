"""GET /dashboard, its assets and /dashboard/data on a live server, without a browser: the key
is required for the data (and appears nowhere else), and the numbers are /metrics' numbers."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardserve.dashboard.prom import histogram_quantile
from tests.dashboard.conftest import AUTH
from tests.server.conftest import API_KEY

ASSETS = ["dashboard.js", "render.js", "spark.js", "dashboard.css"]


def test_page_and_assets_are_public_self_contained_and_keyless(dashboard_server):
    base = dashboard_server.base_url
    page = httpx.get(f"{base}/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ASSETS:
        assert f'"dashboard/static/{name}"' in page.text
    bodies = [page.text]
    for name in ASSETS:
        r = httpx.get(f"{base}/dashboard/static/{name}", timeout=10)
        assert r.status_code == 200, name
        bodies.append(r.text)
    for body in bodies:
        assert API_KEY not in body
        # Nothing loaded from elsewhere: no absolute URL in any src, href, import or fetch.
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", body)
        assert not re.search(r"""(fetch|import)\s*\(\s*["'`](https?:)?//""", body)
    assert httpx.get(f"{base}/dashboard/static/..%2Fapp.py", timeout=10).status_code == 404
    assert httpx.get(f"{base}/dashboard/static/index.html", timeout=10).status_code == 404


def test_data_needs_the_key(dashboard_server):
    url = f"{dashboard_server.base_url}/dashboard/data"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(url, headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers=AUTH, timeout=10).status_code == 200


def _families(server) -> dict:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {f.name.rpartition(":")[2]: f for f in text_string_to_metric_families(text)}


def test_data_matches_metrics(dashboard_server):
    server = dashboard_server
    prompt = "The dashboard counts these tokens, and this prefix is cached. " * 3
    for _ in range(3):
        r = httpx.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=60,
                       json={"prompt": prompt, "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200
    before = server.wait_idle()
    families = _families(server)
    data = httpx.get(f"{server.base_url}/dashboard/data", headers=AUTH, timeout=10).json()
    assert server.wait_idle() == before  # nothing moved while we looked

    def metric(name: str, **labels) -> float:
        return before.get((f"shardserve:{name}", tuple(sorted(labels.items()))), 0.0)

    assert data["kind"] == "server" and data["server"]["status"] == "ok"
    t = data["totals"]
    assert t["prompt_tokens"] == metric("prompt_tokens_total") > 0
    assert t["generation_tokens"] == metric("generation_tokens_total") >= 15
    assert t["requests_finished"] == sum(metric("request_success_total", finished_reason=r)
                                         for r in ("stop", "length", "abort", "error"))
    assert t["preemptions"] == metric("num_preemptions_total")
    assert t["prefix_cache_hits"] == metric("prefix_cache_hits_total") > 0
    assert data["prefix_cache_hit_rate"] == pytest.approx(
        metric("prefix_cache_hits_total") / metric("prefix_cache_queries_total"))
    assert data["gauges"] == {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}
    for key, name in (("ttft", "time_to_first_token_seconds"),
                      ("itl", "inter_token_latency_seconds"),
                      ("e2e", "e2e_request_latency_seconds")):
        samples = [s for s in families[name].samples if s.name.endswith("_bucket")]
        les = [float(s.labels["le"]) for s in samples]
        counts = [s.value for s in samples]
        lifetime = data["latency"][key]["lifetime"]
        assert lifetime["count"] == counts[-1] == metric(f"{name}_count") > 0
        for q, p in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
            assert lifetime[p] == pytest.approx(histogram_quantile(q, les, counts)), (key, p)
    layout = data["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == (1, 1, 1)
    assert layout["stages"][0]["layers"] == [0, layout["num_layers"]]
    assert layout["stages"][0]["ranks"] == [{"rank": 0, "tp_rank": 0, "node": 0, "device": "cpu",
                                            "host_gpu": None, "driver": True}]
    assert data["gpus"] == []  # CPU: no GPU series


def test_rates_from_successive_reads(dashboard_server):
    server = dashboard_server
    url = f"{server.base_url}/dashboard/data"
    first = httpx.get(url, headers=AUTH, timeout=10).json()
    r = httpx.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": "rates", "max_tokens": 6, "ignore_eos": True})
    assert r.status_code == 200
    server.wait_idle()
    import time
    time.sleep(1.0)  # the history stores a reading at most every 0.9 s
    second = httpx.get(url, headers=AUTH, timeout=10).json()
    rates = second["rates"]
    assert rates["window_s"] > 0
    made = second["totals"]["generation_tokens"] - first["totals"]["generation_tokens"]
    assert made == 6
    # The rate window starts at a stored reading no later than `first`'s.
    assert rates["generation_tokens_per_s"] * rates["window_s"] >= made - 1e-6
    assert len(second["history"]["t"]) >= 1
