"""GET /dashboard/data on the router: every replica's own /dashboard/data, the router's view of
each replica (health, load, in flight), and totals over all of them.

Auth: the router holds no key of its own; like /v1, the caller's Authorization header goes to
the replicas unchanged, and if any replica answers 401 so does the router (the page then asks
for the key). Replicas without a dashboard (another server, an old version) still get a row,
from the router's own probes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httpx

from shardserve import __version__
from shardserve.dashboard.prom import Histogram
from shardserve.dashboard.stats import LATENCIES, QUANTILES, hit_rate

FETCH_TIMEOUT_S = 3.0
REPLICA_SPARK_POINTS = 60  # the per-replica tokens/s sparkline: about the last minute
_SUMMED_RATES = ("prompt_tokens_per_s", "generation_tokens_per_s", "requests_finished_per_s",
                 "preemptions_per_s")


class ReplicaAuthError(Exception):
    """A replica refused the caller's key (or its absence)."""


class RouterDashboard:
    def __init__(self, pool: Any, min_interval_s: float = 0.9, max_points: int = 300) -> None:
        self.pool = pool  # router.backends.BackendPool
        self.min_interval_s = min_interval_s
        self.points: deque[dict[str, Any]] = deque(maxlen=max_points)

    async def data(self, authorization: str | None) -> dict[str, Any]:
        backends = list(self.pool.backends.values())
        headers = {"Authorization": authorization} if authorization else {}
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, headers=headers,
                                     trust_env=False) as client:  # direct, as the router's
            fetched = await asyncio.gather(*(_fetch(client, b.url) for b in backends))
        if any(status == 401 for status, _ in fetched):
            raise ReplicaAuthError()
        replicas = [_replica_row(i, b, status, body)
                    for i, (b, (status, body)) in enumerate(zip(backends, fetched))]
        totals = _totals(replicas)
        self._record(totals)
        return {"kind": "router", "time": time.time(),
                "server": {"version": __version__, "status": _status(replicas),
                           "replicas": len(replicas),
                           "healthy_replicas": sum(r["healthy"] for r in replicas)},
                **totals, "replicas": replicas, "history": self._series()}

    def _record(self, totals: dict[str, Any]) -> None:
        now = time.time()
        if self.points and now - self.points[-1]["t"] < self.min_interval_s:
            return
        g, r, lat = totals["gauges"], totals["rates"], totals["latency"]
        self.points.append({
            "t": round(now, 3), "prompt_tokens_per_s": r["prompt_tokens_per_s"],
            "generation_tokens_per_s": r["generation_tokens_per_s"], "running": g["running"],
            "waiting": g["waiting"], "kv_cache_usage": g["kv_cache_usage"],
            "prefix_cache_hit_rate": r["prefix_cache_hit_rate"],
            **{f"{k}_p50": (lat[k]["recent"] or {}).get("p50") for k in ("ttft", "itl")}})

    def _series(self) -> dict[str, list]:
        keys = self.points[0].keys() if self.points else ()
        return {k: [p[k] for p in self.points] for k in keys}


async def _fetch(client: httpx.AsyncClient, url: str) -> tuple[int | None, Any]:
    try:
        response = await client.get(url + "/dashboard/data")
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}"
    if response.status_code != 200:
        return response.status_code, f"HTTP {response.status_code}"
    try:
        return 200, response.json()
    except ValueError:
        return 200, "not JSON"


def _replica_row(index: int, b: Any, status: int | None, body: Any) -> dict[str, Any]:
    """The router's own view of a replica, and the replica's dashboard data when it gave it."""
    row: dict[str, Any] = {
        "index": index, "url": b.url, "name": getattr(b, "name", "") or b.url,
        "healthy": bool(b.healthy), "status": b.status,
        "pid": getattr(b, "pid", None), "in_flight": b.in_flight, "load": float(b.load),
        "running": float(b.running), "waiting": float(b.waiting),
        "kv_cache_usage": float(getattr(b, "kv_usage", 0.0)),
        "requests": getattr(b, "num_requests", 0), "failures": getattr(b, "num_failures", 0),
        "retried_elsewhere": getattr(b, "num_retries_from", 0),
        "data": None, "data_error": None}
    if status == 200 and isinstance(body, dict):
        history = body.get("history") or {}
        body = {k: v for k, v in body.items() if k != "history"}
        body["spark"] = {k: (history.get(k) or [])[-REPLICA_SPARK_POINTS:]
                         for k in ("t", "generation_tokens_per_s")}
        row["data"] = body
        # The replica's own numbers are fresher than the router's last probe.
        row["running"] = float(body["gauges"]["running"])
        row["waiting"] = float(body["gauges"]["waiting"])
        row["kv_cache_usage"] = float(body["gauges"]["kv_cache_usage"])
    else:
        row["data_error"] = body if isinstance(body, str) else "no data"
    return row


def _status(replicas: list[dict[str, Any]]) -> str:
    if any(r["healthy"] for r in replicas):
        return "ok"
    # Replicas that are still loading their model (`serve -dp N` starting up): the page shows
    # that as a server's own "loading", not as a failure.
    if any(((r["data"] or {}).get("server") or {}).get("status") == "loading" for r in replicas):
        return "loading"
    return "no_healthy_replica"


def _totals(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    with_data = [r["data"] for r in replicas if r["data"] is not None]
    # A replica that neither passes its health check nor gave its data is down: its numbers are
    # the last probe's from before it went (a killed replica would show its requests running
    # forever and halve the KV mean). One that gave data (e.g. still loading) is current.
    live = [r for r in replicas if r["healthy"] or r["data"] is not None]
    gauges = {"running": sum(r["running"] for r in live),
              "waiting": sum(r["waiting"] for r in live),
              "kv_cache_usage": (sum(r["kv_cache_usage"] for r in live) / len(live)
                                 if live else 0.0)}
    totals: dict[str, float] = {}
    for d in with_data:
        for k, v in d["totals"].items():
            totals[k] = totals.get(k, 0.0) + v
    rates: dict[str, Any] = {}
    for k in _SUMMED_RATES:
        values = [d["rates"][k] for d in with_data if d["rates"].get(k) is not None]
        rates[k] = sum(values) if values else None
    windows = [d["rates"]["window_s"] for d in with_data if d["rates"].get("window_s")]
    rates["window_s"] = max(windows) if windows else None
    rates["prefix_cache_hit_rate"] = _weighted_hit_rate(with_data)
    # The page labels the "recent" percentiles with this (without it: "waiting for a second
    # reading" forever); the merged buckets cover up to the longest replica's window.
    recent = [d["recent_window_s"] for d in with_data if d.get("recent_window_s")]
    gpus = []
    seen: set[tuple[str, str]] = set()
    for r in replicas:
        host = urlsplit(r["url"]).hostname or r["url"]
        for g in (r["data"] or {}).get("gpus", []):
            if (host, g["gpu"]) not in seen:  # NVML lists every GPU of the host to each replica
                seen.add((host, g["gpu"]))
                gpus.append({**g, "host": host, "replica": r["index"]})
    return {"gauges": gauges, "totals": totals, "rates": rates,
            "recent_window_s": max(recent) if recent else None,
            "prefix_cache_hit_rate": hit_rate(totals.get("prefix_cache_hits", 0.0),
                                              totals.get("prefix_cache_queries", 0.0)),
            "latency": _merged_latency(with_data), "gpus": gpus,
            "layout": {"dp": len(replicas),
                       "replicas": [{"index": r["index"], "url": r["url"],
                                     "layout": (r["data"] or {}).get("layout")}
                                    for r in replicas]}}


def _weighted_hit_rate(with_data: list[dict[str, Any]]) -> float | None:
    # Replicas' windowed hit rates, weighted by their prompt-token rate (queries ~ prompt tokens).
    num = den = 0.0
    for d in with_data:
        rate, weight = d["rates"].get("prefix_cache_hit_rate"), d["rates"].get("prompt_tokens_per_s")
        if rate is not None and weight:
            num += rate * weight
            den += weight
    return num / den if den else None


def _merged_latency(with_data: list[dict[str, Any]]) -> dict[str, Any]:
    """Quantiles of the replicas' histograms added bucket by bucket (averaging the replicas'
    percentiles would be wrong)."""
    out: dict[str, Any] = {}
    for key in LATENCIES:
        entry: dict[str, Any] = {}
        for part in ("lifetime", "recent"):
            merged, found = Histogram(), False
            for d in with_data:
                summary = (d.get("latency", {}).get(key) or {}).get(part) or {}
                if summary.get("buckets"):
                    merged = merged.plus(Histogram.from_json(summary["buckets"]))
                    found = True
            count = merged.count
            entry[part] = {"count": count, "mean": merged.sum / count if count else None,
                           **{k: merged.quantile(q) for k, q in QUANTILES.items()}} if found else None
        out[key] = entry
    return out
