"""The dashboard in headless Chromium (Debian's `chromium`, started by the test) while requests
flow: the page gets the key from its #fragment, polls /dashboard/data, and its numbers change
from one load to the next and agree with /metrics read just before and just after each load."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.bench.png import png_size
from tests.dashboard.chromium import elements_by_id, have_chromium, number, run_chromium
from tests.dashboard.conftest import AUTH, Load
from tests.router.conftest import wait_for
from tests.server.conftest import API_KEY

pytestmark = pytest.mark.skipif(not have_chromium(),
                                reason="needs /usr/bin/chromium (Debian: apt-get install chromium)")

COUNTERS = {"gen-tokens-total": "generation_tokens_total",
            "prompt-tokens-total": "prompt_tokens_total",
            "ttft-lifetime-count": "time_to_first_token_seconds_count",
            "itl-lifetime-count": "inter_token_latency_seconds_count"}


def _load_page(server, tmp_path) -> tuple[dict, dict, dict]:
    """/metrics, the page's elements after ~2 s of (virtual) page time, /metrics again."""
    before = server.metrics()
    html = run_chromium(f"{server.base_url}/dashboard?interval=500#key={API_KEY}", tmp_path,
                        budget_ms=2500)
    after = server.metrics()
    assert API_KEY not in html
    return before, elements_by_id(html), after


def _check_against_metrics(before: dict, page: dict, after: dict) -> None:
    for ident, name in COUNTERS.items():
        low, high = before[(f"shardserve:{name}", ())], after[(f"shardserve:{name}", ())]
        assert low <= number(page, ident) <= high, (ident, low, number(page, ident), high)
    finished = [sum(v for (n, _), v in m.items() if n == "shardserve:request_success_total")
                for m in (before, after)]
    assert finished[0] <= number(page, "requests-finished") <= finished[1]
    for ident in ("running", "waiting"):
        assert 0 <= number(page, ident) <= 8  # --max-num-seqs 8, two clients
    assert 0 <= number(page, "kv-usage") <= 1


def test_dashboard_in_chromium(dashboard_server, tmp_path):
    server = dashboard_server
    with Load(server.base_url) as load:
        # A reading or two before the page loads, so its rate windows have a start.
        deadline = time.monotonic() + 60
        while load.num_done < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        httpx.get(f"{server.base_url}/dashboard/data", headers=AUTH, timeout=10)
        first = _load_page(server, tmp_path)
        # Let more requests start and finish before the second load, however slow the machine.
        shown = {name: number(first[1], ident) for ident, name in COUNTERS.items()}
        assert wait_for(lambda: all(server.metric(f"shardserve:{name}") > value
                                    for name, value in shown.items()), 60)
        second = _load_page(server, tmp_path)
        shot = tmp_path / "dashboard.png"
        run_chromium(f"{server.base_url}/dashboard#key={API_KEY}", tmp_path, screenshot=shot,
                     budget_ms=2500)
    assert not load.errors, load.errors[:3]
    for before, page, after in (first, second):
        _check_against_metrics(before, page, after)
        body = page.get("key-form")
        assert body is not None and "hidden" in body["attrs"], "the key form should be hidden"
        assert page["status"]["text"] == "ok"
        assert page["kind"]["text"] == "server"
        assert int(page["page"]["attrs"]["data-polls"]) >= 2  # it polled again within 2.5 s
        # Tokens come out all the time; prompts arrive in bursts, so a short window may hold none.
        assert number(page, "gen-tps") > 0 and number(page, "prompt-tps") >= 0
        assert number(page, "ttft-lifetime-p50") > 0 and number(page, "itl-lifetime-p99") > 0
        assert (number(page, "layout-tp"), number(page, "layout-pp"),
                number(page, "layout-dp")) == (1, 1, 1)
        assert "rank-0" in page and "stage-0" in page
    # The numbers moved between the two loads.
    assert number(second[1], "gen-tokens-total") > number(first[1], "gen-tokens-total")
    assert number(second[1], "ttft-lifetime-count") > number(first[1], "ttft-lifetime-count")
    assert png_size(shot) == (1280, 900)
    print(f"screenshot: {shot}")


def test_without_the_key_the_page_asks_for_it(dashboard_server, tmp_path):
    page = elements_by_id(run_chromium(f"{dashboard_server.base_url}/dashboard", tmp_path,
                                       budget_ms=1500))
    assert "hidden" not in page["key-form"]["attrs"]
    assert page["status"]["text"] == "needs key"
    assert page["gen-tokens-total"]["value"] is None  # no number was shown


def test_page_keeps_polling_after_an_answer_that_is_not_json(tmp_path):
    """A proxy's HTML error page (or a body cut off by a restart) once: the page says so and
    polls on, instead of stopping for good with nothing shown."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from types import SimpleNamespace

    from shardserve.dashboard.routes import _static_files, finite
    from shardserve.dashboard.router_view import RouterDashboard

    files = _static_files()
    empty_router = RouterDashboard(SimpleNamespace(backends={}))
    good = json.dumps(finite(asyncio.run(empty_router.data(None)))).encode()
    answers: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = self.path.partition("?")[0]
            if path == "/dashboard/data":
                body = b"<html>502 Bad Gateway</html>" if not answers else good
                answers.append(body)
                media_type = "application/json"
            elif path == "/dashboard" or path.startswith("/dashboard/static/"):
                body, media_type = files[path.rpartition("/")[2] if "static" in path
                                         else "index.html"]
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", media_type)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        html = run_chromium(f"http://127.0.0.1:{server.server_address[1]}/dashboard?interval=200",
                            tmp_path, budget_ms=1500)
    finally:
        server.shutdown()
    page = elements_by_id(html)
    assert len(answers) >= 2 and int(page["page"]["attrs"]["data-polls"]) >= 1
    assert page["kind"]["text"] == "router" and "hidden" in page["error"]["attrs"]
