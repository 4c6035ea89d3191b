"""Scraping and dashboards: a Prometheus-operator ServiceMonitor for the server's /metrics (and one
for the router's, when there is one) and a Grafana dashboard over the server's metrics
(server/metrics.py names; `shardserve:` prefix)."""

from __future__ import annotations

from typing import Any

from shardserve.deploy.router import router_labels, router_name
from shardserve.deploy.spec import DeploySpec
from shardserve.deploy.workloads import pod_labels

P = "shardserve:"
# Every series the dashboard reads: tests check that the server exports each.
DASHBOARD_METRICS = (
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
    "request_success_total", "num_requests_rejected_total", "prompt_tokens_total",
    "generation_tokens_total", "time_to_first_token_seconds_bucket",
    "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
    "request_queue_time_seconds_bucket", "prefix_cache_hits_total", "prefix_cache_queries_total",
    "num_preemptions_total", "gpu_memory_used_bytes", "gpu_memory_total_bytes")


def service_monitor(spec: DeploySpec) -> dict[str, Any]:
    selector = {**pod_labels(spec)}
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": {**spec.labels, "app.kubernetes.io/component": "monitoring"}},
        "spec": {"selector": {"matchLabels": selector},
                 "namespaceSelector": {"matchNames": [spec.namespace]},
                 "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s",
                                "scrapeTimeout": "10s"}]},
    }


def router_service_monitor(spec: DeploySpec) -> dict[str, Any]:
    """The routers' own series (requests, 503s, retries, replica health) from their Service.
    `replicas=false` leaves out the replicas' series the router page would add: Prometheus
    already scrapes them from each pod, and would otherwise hold and sum them twice."""
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {"name": router_name(spec), "namespace": spec.namespace,
                     "labels": {**spec.labels, "app.kubernetes.io/component": "monitoring"}},
        "spec": {"selector": {"matchLabels": router_labels(spec)},
                 "namespaceSelector": {"matchNames": [spec.namespace]},
                 "endpoints": [{"port": "http", "path": "/metrics",
                                "params": {"replicas": ["false"]}, "interval": "15s",
                                "scrapeTimeout": "10s"}]},
    }


def _panel(pid: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int,
           width: int = 12) -> dict[str, Any]:
    return {"id": pid, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": width, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(exprs)]}


def _quantiles(metric: str, sel: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({P}{metric}_bucket{{{sel}}}[$__rate_interval])))",
             f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]


def grafana_dashboard(spec: DeploySpec) -> dict[str, Any]:
    sel = 'namespace="$namespace",service="$service"'
    rate = "[$__rate_interval]"
    panels = [
        _panel(1, "Requests running / waiting",
               [(f"sum({P}num_requests_running{{{sel}}})", "running"),
                (f"sum({P}num_requests_waiting{{{sel}}})", "waiting")], "short", 0, 0),
        _panel(2, "Request rate (QPS) by finish reason",
               [(f"sum by (finished_reason) (rate({P}request_success_total{{{sel}}}{rate}))",
                 "{{finished_reason}}"),
                (f"sum by (reason) (rate({P}num_requests_rejected_total{{{sel}}}{rate}))",
                 "rejected {{reason}}")], "reqps", 12, 0),
        _panel(3, "Tokens per second",
               [(f"sum(rate({P}prompt_tokens_total{{{sel}}}{rate}))", "prompt"),
                (f"sum(rate({P}generation_tokens_total{{{sel}}}{rate}))", "generation")],
               "short", 0, 8),
        _panel(4, "KV-cache usage per pod",
               [(f"max by (pod) ({P}kv_cache_usage_perc{{{sel}}})", "{{pod}}")],
               "percentunit", 12, 8),
        _panel(5, "Time to first token", _quantiles("time_to_first_token_seconds", sel), "s", 0, 16),
        _panel(6, "Inter-token latency", _quantiles("inter_token_latency_seconds", sel), "s", 12, 16),
        _panel(7, "End-to-end latency", _quantiles("e2e_request_latency_seconds", sel), "s", 0, 24),
        _panel(8, "Queue time", _quantiles("request_queue_time_seconds", sel), "s", 12, 24),
        _panel(9, "Prefix-cache hit rate / preemptions",
               [(f"sum(rate({P}prefix_cache_hits_total{{{sel}}}{rate})) / "
                 f"clamp_min(sum(rate({P}prefix_cache_queries_total{{{sel}}}{rate})), 1)",
                 "hit rate"),
                (f"sum(rate({P}num_preemptions_total{{{sel}}}{rate}))", "preemptions/s")],
               "short", 0, 32),
        _panel(10, "GPU memory used",
               [(f"{P}gpu_memory_used_bytes{{{sel}}} / {P}gpu_memory_total_bytes{{{sel}}}",
                 "{{pod}} gpu {{gpu}}")], "percentunit", 12, 32),
    ]
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "namespace", "type": "constant", "query": spec.namespace, "hide": 2},
        {"name": "service", "type": "constant", "query": spec.name, "hide": 2},
    ]
    return {"uid": f"shardserve-{spec.name}"[:40], "title": f"shardserve · {spec.name}",
            "tags": ["shardserve", "llm"], "timezone": "browser", "schemaVersion": 39,
            "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": variables}, "panels": panels}
