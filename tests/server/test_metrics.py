"""/metrics parses with prometheus_client, carries vLLM's names under shardserve:, and its
counters and histograms move as requests are served."""

from __future__ import annotations

import httpx
import pytest

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


def test_request_histograms_have_each_finished_requests_numbers(tiny_server):
    """vLLM's per-request histograms take one observation per finished request, with its
    numbers; iteration_tokens_total one per engine step, summing to the tokens computed. On the
    tiny server, which schedules asynchronously (a step in flight must not count twice)."""
    before = tiny_server.wait_idle()
    requests = [{"prompt": "Fourteen quiet otters read the metrics page", "max_tokens": 5},
                {"prompt": "Seven owls", "max_tokens": 3, "n": 2}]
    usages = []
    for body in requests:
        r = httpx.post(f"{tiny_server.base_url}/v1/completions", headers=AUTH, timeout=60,
                       json={**body, "ignore_eos": True, "temperature": 1.0})
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    after = tiny_server.wait_idle()

    def delta(name: str, labels: tuple = ()) -> float:
        key = (f"shardserve:{name}", labels)
        return after[key] - before.get(key, 0.0)

    def bucket(name: str, le: str) -> float:
        return delta(f"{name}_bucket", (("le", le),))

    prompts = [u["prompt_tokens"] for u in usages]
    for name, total in (("request_prompt_tokens", sum(prompts)),
                        ("request_generation_tokens", 5 + 2 * 3),
                        ("request_params_n", 1 + 2),
                        ("request_params_max_tokens", 5 + 3)):
        assert delta(f"{name}_count") == 2, name
        assert delta(f"{name}_sum") == total, name
        assert bucket(name, "+Inf") == 2, name
    assert bucket("request_params_n", "1.0") == 1 and bucket("request_params_n", "2.0") == 2
    assert bucket("request_params_max_tokens", "2.0") == 0
    assert bucket("request_params_max_tokens", "5.0") == 2
    assert bucket("request_generation_tokens", "5.0") == 1  # 5 tokens; the other has 6
    # Token-count buckets are vLLM's 1-2-5 series up to max_model_len (1024 here).
    assert ("shardserve:request_prompt_tokens_bucket", (("le", "1000.0"),)) in after
    assert ("shardserve:request_prompt_tokens_bucket", (("le", "2000.0"),)) not in after
    # Prefill and decode split the time between first scheduling and the last token.
    for name in ("request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(f"{name}_count") == 2 and delta(f"{name}_sum") > 0, name
    assert (delta("request_prefill_time_seconds_sum") + delta("request_decode_time_seconds_sum")
            <= delta("e2e_request_latency_seconds_sum"))
    # Each sample computes its prompt (less prefix-cache hits) and every token but its last.
    computed = (prompts[0] + 5 - 1) + 2 * (prompts[1] + 3 - 1) - delta("prefix_cache_hits_total")
    assert delta("iteration_tokens_total_sum") == computed
    assert 5 <= delta("iteration_tokens_total_count") <= 5 + 3 + 3


def _samples(metrics) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))):
            s.value for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples}


def test_millisecond_latencies_land_in_their_own_buckets():
    """A GPU decode step is a few ms: inter-token gaps and queue times that short were all in
    vLLM's first bucket (10 ms, 300 ms). vLLM's bounds stay, finer ones come before them."""
    from shardserve.server.metrics import ServerMetrics
    metrics = ServerMetrics("m", 1024)
    for gap in (0.004, 0.004, 0.02):
        metrics.record_tokens(1, gap)
    metrics.record_scheduled(0.003)
    samples = _samples(metrics)

    def bucket(name: str, le: str) -> float:
        return samples[(f"shardserve:{name}_bucket", (("le", le),))]

    assert bucket("inter_token_latency_seconds", "0.005") == 2
    assert bucket("inter_token_latency_seconds", "0.01") == 2  # vLLM's first bound is kept
    assert bucket("inter_token_latency_seconds", "0.025") == 3
    assert bucket("request_queue_time_seconds", "0.005") == 1
    assert ("shardserve:request_queue_time_seconds_bucket", (("le", "0.3"),)) in samples


def test_per_request_inference_time_and_time_per_output_token():
    """vLLM's request_inference_time_seconds (prefill + decode) and
    request_time_per_output_token_seconds: decode time over the tokens after the first, per
    sample (n samples decode side by side)."""
    from shardserve.engine.stat_logger import FinishedRequestStats
    from shardserve.server.metrics import ServerMetrics
    metrics = ServerMetrics("m", 1024)
    metrics.record_request(FinishedRequestStats(10, 2 * 5, 2, 5, 0.5, 0.2))  # n=2, 5 tokens each
    metrics.record_request(FinishedRequestStats(10, 1, 1, 1, 0.5, 0.0))  # one token: no TPOT
    samples = _samples(metrics)
    assert samples[("shardserve:request_inference_time_seconds_count", ())] == 2
    assert samples[("shardserve:request_inference_time_seconds_sum", ())] == pytest.approx(1.2)
    assert samples[("shardserve:request_time_per_output_token_seconds_count", ())] == 1
    assert samples[("shardserve:request_time_per_output_token_seconds_sum", ())] == \
        pytest.approx(0.05)
