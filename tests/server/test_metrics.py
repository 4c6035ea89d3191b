"""/metrics parses with prometheus_client, carries vLLM's names under shardserve:, and its
counters and histograms move as requests are served."""

from __future__ import annotations

import httpx

from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}

GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]
COUNTERS = ["prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
            "generation_tokens_total", "num_preemptions_total"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds"]


def test_metrics_exist_and_move(smollm2_server):
    before = smollm2_server.wait_idle()
    for name in GAUGES + COUNTERS:
        assert (f"shardserve:{name}", ()) in before, name
    for name in HISTOGRAMS:
        assert (f"shardserve:{name}_count", ()) in before, name
        assert (f"shardserve:{name}_bucket", (("le", "+Inf"),)) in before, name

    prompt = "The same long prefix for the prefix cache, repeated twice over. " * 3
    for _ in range(2):
        r = httpx.post(f"{smollm2_server.base_url}/v1/completions", headers=AUTH, timeout=60,
                       json={"prompt": prompt, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200
    after = smollm2_server.wait_idle()

    def delta(name: str, labels: tuple = ()) -> float:
        key = (f"shardserve:{name}", labels)
        return after[key] - before.get(key, 0.0)

    assert delta("prompt_tokens_total") == 2 * r.json()["usage"]["prompt_tokens"]
    assert delta("generation_tokens_total") == 8
    assert delta("request_success_total", (("finished_reason", "length"),)) == 2
    assert delta("prefix_cache_queries_total") > 0 and delta("prefix_cache_hits_total") > 0
    for name in HISTOGRAMS:
        assert delta(f"{name}_count") >= 2, name
        assert delta(f"{name}_sum") > 0, name
    assert delta("inter_token_latency_seconds_count") == 6  # 3 gaps between 4 tokens, twice
    assert after[("shardserve:kv_cache_usage_perc", ())] == 0.0
