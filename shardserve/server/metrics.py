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
from shardserve.engine.stat_logger import StatLogger

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "shardserve:"

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class ServerMetrics(StatLogger):
    def __init__(self, model_name: str) -> None:
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
                                    _LATENCY_BUCKETS)
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
                       self.queue_time):
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

    def record_rejected(self, reason: str) -> None:
        self.requests_rejected.labels(self._model, reason).inc()
