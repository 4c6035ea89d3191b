"""The numbers the dashboard shows, from one or two `Snapshot`s: totals, rates over a window,
latency percentiles (from histogram buckets), hit rates. Pure functions; no I/O."""

from __future__ import annotations

from typing import Any

from shardserve.dashboard.prom import Histogram, Snapshot

# Page key -> histogram short name (vLLM's names).
LATENCIES = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
             "e2e": "e2e_request_latency_seconds", "queue": "request_queue_time_seconds"}
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}

# Page key -> counter sample name.
COUNTERS = {"prompt_tokens": "prompt_tokens_total", "generation_tokens": "generation_tokens_total",
            "requests_finished": "request_success_total",
            "requests_rejected": "num_requests_rejected_total",
            "preemptions": "num_preemptions_total",
            "prefix_cache_queries": "prefix_cache_queries_total",
            "prefix_cache_hits": "prefix_cache_hits_total"}
GAUGES = {"running": "num_requests_running", "waiting": "num_requests_waiting",
          "kv_cache_usage": "kv_cache_usage_perc"}


def totals(snap: Snapshot) -> dict[str, float]:
    return {key: snap.get(name) for key, name in COUNTERS.items()}


def gauges(snap: Snapshot) -> dict[str, float]:
    return {key: snap.get(name) for key, name in GAUGES.items()}


def hit_rate(hits: float, queries: float) -> float | None:
    return hits / queries if queries > 0 else None


def rates(now: Snapshot, before: Snapshot | None, dt: float | None) -> dict[str, Any]:
    """Per-second rates of the counters between two snapshots `dt` seconds apart, and the prefix
    hit rate over the same window; all None without a usable earlier snapshot."""
    keys = ("prompt_tokens", "generation_tokens", "requests_finished", "preemptions")
    if before is None or not dt or dt <= 0:
        return {"window_s": None, **{f"{k}_per_s": None for k in keys},
                "prefix_cache_hit_rate": None}
    a, b = totals(now), totals(before)
    # max(0, ...): a counter never goes back unless the process restarted; show 0 then.
    out: dict[str, Any] = {"window_s": dt}
    for k in keys:
        out[f"{k}_per_s"] = max(0.0, a[k] - b[k]) / dt
    out["prefix_cache_hit_rate"] = hit_rate(a["prefix_cache_hits"] - b["prefix_cache_hits"],
                                            a["prefix_cache_queries"] - b["prefix_cache_queries"])
    return out


def summarize_histogram(hist: Histogram | None) -> dict[str, Any]:
    """Count, mean and p50/p90/p99 (seconds; None without observations), plus the buckets so a
    router can merge replicas before taking quantiles."""
    if hist is None or not hist.les:
        return {"count": 0.0, "mean": None, **{k: None for k in QUANTILES}, "buckets": None}
    count = hist.count
    return {"count": count, "mean": hist.sum / count if count > 0 else None,
            **{k: hist.quantile(q) for k, q in QUANTILES.items()}, "buckets": hist.to_json()}


def latencies(now: Snapshot, before: Snapshot | None) -> dict[str, dict[str, Any]]:
    """Per latency: 'lifetime' (since the server started) and 'recent' (since `before`)."""
    out = {}
    for key, name in LATENCIES.items():
        hist = now.histograms.get(name)
        recent = None
        if hist is not None and before is not None:
            recent = hist.minus(before.histograms.get(name))
        out[key] = {"lifetime": summarize_histogram(hist),
                    "recent": summarize_histogram(recent) if before is not None else None}
    return out


def quantile_between(now: Snapshot, before: Snapshot | None, name: str, q: float) -> float | None:
    hist = now.histograms.get(name)
    if hist is None:
        return None
    return (hist.minus(before.histograms.get(name)) if before is not None else hist).quantile(q)
