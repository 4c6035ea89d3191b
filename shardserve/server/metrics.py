"""Prometheus metrics with vLLM's names under a `shardserve:` prefix, so dashboards, routers and
autoscalers written for vLLM work after a prefix swap (vllm: -> shardserve:).

Gauges mirror the engine core's latest snapshot; its cumulative counters (prefix cache,
preemptions) are turned into Prometheus counters by adding the difference since the last
snapshot. Histograms use vLLM's buckets. Everything lives in this server's own registry (not
the process-global one), so several servers or tests in one process do not collide.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

from shardserve.engine.core_messages import CoreStats
from shardserve.engine.stat_logger import FinishedRequestStats, StatLogger

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "shardserve:"

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
# vLLM's buckets, with finer ones below where vLLM's start: a decode step takes a few
# milliseconds on a GPU (4.5 ms at batch 1 in BENCHMARKS.md), so every gap, and every queue time
# on a server with room, fell into the first bucket and the quantiles said nothing. vLLM's
# bounds are all still there, so its dashboards' queries keep working.
_ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_SHORT_LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2] + _LATENCY_BUCKETS
_ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
_N_BUCKETS = [1, 2, 5, 10, 20]


def buckets_1_2_5(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's buckets for token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class ServerMetrics(StatLogger):
    def __init__(self, model_name: str, max_model_len: int = 131072) -> None:
        # No `*_created` series next to every counter and histogram (vLLM turns them off too);
        # a process-wide switch in prometheus_client, harmless in a server process.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self._model = model_name
        r, m = self.registry, ["model_name"]

        def gauge(name: str, doc: str, labels: list[str] = m) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str] = m) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, m, buckets=buckets, registry=r)

        self.num_requests_running = gauge("num_requests_running", "Requests running on the engine.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "KV-cache usage (1 = full).")
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted (to be recomputed).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = counter("request_success", "Requests finished, by finish reason.",
                                       m + ["finished_reason"])
        self.requests_rejected = counter("num_requests_rejected",
                                         "Requests turned away with 503 (queue_full, queue_time, "
                                         "draining, not_ready).", m + ["reason"])
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's tokens.",
                             _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling.",
                                    _SHORT_LATENCY_BUCKETS)
        # Per finished request (stop or length), as vLLM: sizes, the phases of its time on
        # the engine, and what it asked for.
        tokens = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens",
                                               "Prompt tokens of each finished request.", tokens)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens generated for each finished request (all its "
            "n samples).", tokens)
        self.request_prefill_time = histogram("request_prefill_time_seconds",
                                              "First scheduling to first token.",
                                              _SHORT_LATENCY_BUCKETS)
        self.request_decode_time = histogram("request_decode_time_seconds",
                                             "First token to last token.", _LATENCY_BUCKETS)
        self.request_inference_time = histogram("request_inference_time_seconds",
                                                "First scheduling to last token.", _LATENCY_BUCKETS)
        self.request_tpot = histogram("request_time_per_output_token_seconds",
                                      "Mean time per output token of each finished request "
                                      "(its decode time over its tokens after the first).",
                                      _ITL_BUCKETS)
        self.request_params_n = histogram("request_params_n", "The n of each finished request.",
                                          _N_BUCKETS)
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens", "The max_tokens in force for each finished request "
            "(what max_model_len leaves when the request set none).", tokens)
        self.iteration_tokens = histogram("iteration_tokens_total",
                                          "Tokens computed per engine step (prompt and decode).",
                                          _ITERATION_TOKENS_BUCKETS)
        self.gpu_memory_used = gauge("gpu_memory_used_bytes", "GPU memory in use.", m + ["gpu"])
        self.gpu_memory_total = gauge("gpu_memory_total_bytes", "GPU memory in total.", m + ["gpu"])
        self.tp_comm_time_ratio = gauge("tp_comm_time_ratio",
                                        "Share of recent step time in tensor-parallel collectives "
                                        "(measured on the driver rank).")
        self.pp_stage_busy_ratio = gauge("pp_stage_busy_ratio",
                                         "Share of recent wall time each pipeline stage computed.",
                                         m + ["stage"])
        self._last_core: CoreStats | None = None
        # Create the children up front so every series is exported (as 0) from the start.
        for metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage,
                       self.prefix_cache_queries, self.prefix_cache_hits, self.num_preemptions,
                       self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e,
                       self.queue_time, self.request_prompt_tokens, self.request_generation_tokens,
                       self.request_prefill_time, self.request_decode_time,
                       self.request_inference_time, self.request_tpot, self.request_params_n,
                       self.request_params_max_tokens, self.iteration_tokens):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort", "error"):
            self.request_success.labels(model_name, reason)
        for reason in ("queue_full", "queue_time", "draining", "not_ready"):
            self.requests_rejected.labels(model_name, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- StatLogger ------------------------------------------------------------------------

    def record_core_stats(self, stats: CoreStats) -> None:
        s, model = stats.scheduler, self._model
        self.num_requests_running.labels(model).set(s.num_running)
        self.num_requests_waiting.labels(model).set(s.num_waiting)
        self.kv_cache_usage.labels(model).set(s.kv_cache_usage)
        last = self._last_core.scheduler if self._last_core is not None else None
        for counter, now, before in (
                (self.prefix_cache_queries, s.prefix_cache_queries, last and last.prefix_cache_queries),
                (self.prefix_cache_hits, s.prefix_cache_hits, last and last.prefix_cache_hits),
                (self.num_preemptions, s.num_preemptions, last and last.num_preemptions)):
            delta = now - (before or 0)
            if delta > 0:
                counter.labels(model).inc(delta)
        for gpu, used in stats.gpu_memory_used_bytes.items():
            self.gpu_memory_used.labels(model, str(gpu)).set(used)
        for gpu, total in stats.gpu_memory_total_bytes.items():
            self.gpu_memory_total.labels(model, str(gpu)).set(total)
        parallel = stats.parallel
        if "tp_comm_time_ratio" in parallel:
            self.tp_comm_time_ratio.labels(model).set(parallel["tp_comm_time_ratio"])
        for key, value in parallel.items():
            if key.startswith("pp_stage_busy_ratio_"):
                self.pp_stage_busy_ratio.labels(model, key.rsplit("_", 1)[1]).set(value)
        self._last_core = stats

    def record_scheduled(self, queue_time: float) -> None:
        self.queue_time.labels(self._model).observe(queue_time)

    def record_first_token(self, time_to_first_token: float, num_prompt_tokens: int) -> None:
        self.ttft.labels(self._model).observe(time_to_first_token)
        self.prompt_tokens.labels(self._model).inc(num_prompt_tokens)

    def record_tokens(self, num_tokens: int, inter_token_latency: float | None) -> None:
        self.generation_tokens.labels(self._model).inc(num_tokens)
        if inter_token_latency is not None:
            self.itl.labels(self._model).observe(inter_token_latency)

    def record_finished(self, finish_reason: str, e2e_latency: float) -> None:
        self.request_success.labels(self._model, finish_reason).inc()
        self.e2e.labels(self._model).observe(e2e_latency)

    def record_request(self, stats: FinishedRequestStats) -> None:
        model = self._model
        self.request_prompt_tokens.labels(model).observe(stats.num_prompt_tokens)
        self.request_generation_tokens.labels(model).observe(stats.num_generation_tokens)
        self.request_prefill_time.labels(model).observe(stats.prefill_time)
        self.request_decode_time.labels(model).observe(stats.decode_time)
        self.request_inference_time.labels(model).observe(stats.prefill_time + stats.decode_time)
        # Per sample: n samples decode side by side, so their tokens do not add up in time.
        tokens_per_sample = stats.num_generation_tokens / max(stats.n, 1)
        if tokens_per_sample > 1:
            self.request_tpot.labels(model).observe(stats.decode_time / (tokens_per_sample - 1))
        self.request_params_n.labels(model).observe(stats.n)
        self.request_params_max_tokens.labels(model).observe(stats.max_tokens)

    def record_iteration(self, num_tokens: int) -> None:
        self.iteration_tokens.labels(self._model).observe(num_tokens)

    def record_rejected(self, reason: str) -> None:
        self.requests_rejected.labels(self._model, reason).inc()
