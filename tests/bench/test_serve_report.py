"""bench serve's numbers are computed as vLLM's: TPOT leaves out the first token, failed
requests are counted (not in the latencies), and the table shows vLLM's headline rows with the
metrics and percentiles asked for."""

from __future__ import annotations

import io

import pytest

from shardserve.bench.serve import RequestResult
from shardserve.bench.serve_report import (BenchConfig, parse_metric_percentiles,
                                           parse_percentile_metrics, print_summary,
                                           summarize)


def _config(**kw) -> BenchConfig:
    return BenchConfig("http://x", "m", float("inf"), None, 3, 10, 5, 0, **kw)


def _results() -> list[RequestResult]:
    # Two successes: 5 tokens, first after 0.1 s, then 4 gaps of 0.05 s (latency 0.3 s), and 2
    # tokens (0.2 s, then 0.4 s later); one failure whose timings must not count anywhere.
    return [RequestResult(True, 10, 5, 0.0, 0.1, 0.3, [0.05] * 4),
            RequestResult(True, 10, 2, 0.0, 0.2, 0.6, [0.4]),
            RequestResult(False, 10, 0, 0.0, 9.0, 9.0, [], error="HTTP 500: boom")]


def test_summary_numbers():
    s = summarize(_results(), 2.0, _config())
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 20 and s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["total_token_throughput"] == pytest.approx(13.5)
    # TPOT = (latency - TTFT) / (tokens - 1): 50 ms and 400 ms, not latency / tokens.
    assert s["mean_tpot_ms"] == pytest.approx(225.0)
    assert s["mean_ttft_ms"] == pytest.approx(150.0)
    assert s["mean_itl_ms"] == pytest.approx((4 * 50 + 400) / 5)
    assert s["p99_e2el_ms"] == pytest.approx(300 + 300 * 0.99)
    assert s["first_errors"] == ["HTTP 500: boom"]
    assert (s["model_id"], s["num_prompts"], s["burstiness"]) == ("m", 3, 1.0)


def test_table_has_vllm_rows_and_the_chosen_percentiles():
    config = _config(percentile_metrics=("ttft", "e2el"), metric_percentiles=(50.0, 99.9))
    out = io.StringIO()
    print_summary(summarize(_results(), 2.0, config), out)
    text = out.getvalue()
    for row in ("Successful requests:", "Failed requests:", "Benchmark duration (s):",
                "Request throughput (req/s):", "Output token throughput (tok/s):",
                "Total token throughput (tok/s):", "Mean TTFT (ms):", "Median TTFT (ms):",
                "P50 TTFT (ms):", "P99.9 TTFT (ms):", "P99.9 E2EL (ms):"):
        assert row in text, row
    assert "TPOT" not in text and "P90" not in text


def test_percentile_options_parse_as_vllm():
    assert parse_percentile_metrics("ttft,tpot,itl") == ("ttft", "tpot", "itl")
    assert parse_metric_percentiles("25,50,99.9") == (25.0, 50.0, 99.9)
    with pytest.raises(ValueError, match="ttft, tpot, itl, e2el"):
        parse_percentile_metrics("ttft,latency")
    with pytest.raises(ValueError, match="at most 100"):
        parse_metric_percentiles("50,101")
