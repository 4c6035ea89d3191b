"""The router's /metrics: its own series and every healthy replica's, in one Prometheus text page,
so one scrape of the front port (or an autoscaler's query) sees the whole deployment.

    shardserve:router_*   the router's counters and gauges; the per-replica ones
                          (router_backend_*) carry labels backend=URL and replica=NAME
    every other family    each healthy replica's own /metrics (vLLM's names under shardserve:),
                          read at scrape time, each sample with the label replica=NAME added

NAME is the replica's index ("0" .. "N-1") under `serve -dp N`, and its host:port behind a
standalone `shardserve router` (what Prometheus would call the instance had it scraped the
replica itself). A label `replica` a replica already sets (a router behind a router) is kept as
`exported_replica`, as Prometheus itself does.

Per-replica series and no pre-summed totals, because Prometheus sums at query time
(`sum without (replica) (rate(shardserve:request_success_total[1m]))`,
`histogram_quantile(0.9, sum by (le) (rate(shardserve:e2e_request_latency_seconds_bucket[1m])))`)
and a total exported under the same name would be counted twice by every such sum. Each
replica's histogram passes through whole, so its _bucket, _sum and _count stay consistent. A
restarted replica's counters start again at 0; rate() reads that as a counter reset.

A replica that is unhealthy, or whose /metrics does not answer within SCRAPE_TIMEOUT_S or does
not parse, is left out of that scrape (`router_backend_scraped` 0). `/metrics?replicas=false`
gives the router's own series alone: for a Prometheus that scrapes the replicas directly (the
Kubernetes objects from `shardserve deploy k8s` do), so that nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import httpx
from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from shardserve.router.backends import Backend
from shardserve.router.proxy import Proxy

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "shardserve:"
REPLICA_LABEL = "replica"
SCRAPE_TIMEOUT_S = 2.0  # per replica; well inside a Prometheus scrape timeout (10 s by default)


async def render_metrics(proxy: Proxy, include_replicas: bool = True) -> bytes:
    backends = list(proxy.pool.backends.values())
    scraped: dict[Backend, list[Metric]] = {}
    if include_replicas:
        healthy = [b for b in backends if b.healthy]
        results = await asyncio.gather(*(_scrape(proxy.client, b) for b in healthy))
        scraped = {b: families for b, families in zip(healthy, results) if families is not None}
    families = router_families(proxy, backends, scraped if include_replicas else None)
    for backend, parsed in scraped.items():
        merge_replica(families, backend.name, parsed)
    return generate_latest(_Families(families.values()))


async def _scrape(client: httpx.AsyncClient, backend: Backend) -> list[Metric] | None:
    try:
        answer = await client.get(backend.url + "/metrics", timeout=SCRAPE_TIMEOUT_S)
        if answer.status_code != 200:
            return None
        return list(text_string_to_metric_families(answer.text))  # parses it all, here
    except (httpx.HTTPError, ValueError) as exc:
        logger.debug("Metrics of %s left out of this scrape: %s", backend.url, exc)
        return None


def merge_replica(families: dict[str, Metric], replica: str, parsed: Iterable[Metric]) -> None:
    """Add one replica's parsed families to `families` (name -> family), each sample labelled
    replica=`replica`. One family per name, so HELP and TYPE appear once; the first declaration
    wins, and samples of a family another replica declared with a different type are dropped
    (replicas of mixed versions) rather than emitted under the wrong TYPE."""
    for family in parsed:
        out = families.get(family.name)
        if out is None:
            out = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                 family.unit)
        elif out.type != family.type:
            logger.debug("Replica %s declares %s as %s, not %s: left out", replica, family.name,
                         family.type, out.type)
            continue
        for s in family.samples:
            labels = dict(s.labels)
            if REPLICA_LABEL in labels:
                labels["exported_" + REPLICA_LABEL] = labels.pop(REPLICA_LABEL)
            labels[REPLICA_LABEL] = replica
            out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)


def router_families(proxy: Proxy, backends: list[Backend],
                    scraped: dict[Backend, list[Metric]] | None) -> dict[str, Metric]:
    """The router's own series: totals, then one per replica (labels backend, replica).
    `scraped`: the replicas read in this scrape, or None when replicas are not included."""
    s, out = proxy.stats, {}

    def total(kind: type, name: str, doc: str, value: float) -> None:
        out[PREFIX + name] = kind(PREFIX + name, doc, value=value)

    def per(kind: type, name: str, doc: str, value) -> None:
        family = kind(PREFIX + name, doc, labels=["backend", REPLICA_LABEL])
        for b in backends:
            family.add_metric([b.url, b.name], float(value(b)))
        out[PREFIX + name] = family

    C, G = CounterMetricFamily, GaugeMetricFamily
    total(C, "router_requests", "Requests the router received.", s.num_requests)
    total(C, "router_requests_rejected", "Requests answered 503 by the router (nothing "
          "healthy, or every replica saturated).", s.num_rejected)
    total(C, "router_retries", "Requests moved to another replica after a failure.",
          s.num_retries)
    total(C, "router_request_failures", "Requests that ended in an error status or a broken "
          "stream.", s.num_failures)
    total(G, "router_in_flight", "Requests open through the router.", s.in_flight)
    total(G, "router_healthy_replicas", "Replicas in the healthy set.",
          sum(b.healthy for b in backends))
    total(G, "router_replicas", "Replicas known.", len(backends))
    per(C, "router_backend_requests", "Requests sent to the replica (attempts).",
        lambda b: b.num_requests)
    per(C, "router_backend_failures", "Connection errors, 5xx answers and broken streams from "
        "the replica.", lambda b: b.num_failures)
    per(C, "router_backend_retries", "Requests that failed on the replica and were moved to "
        "another.", lambda b: b.num_retries_from)
    per(G, "router_backend_healthy", "1 if the replica is in the healthy set.",
        lambda b: b.healthy)
    per(G, "router_backend_in_flight", "Requests the router has open on the replica.",
        lambda b: b.in_flight)
    per(G, "router_backend_load", "Outstanding requests: router in-flight plus the replica's "
        "running + waiting.", lambda b: b.load)
    per(G, "router_backend_kv_cache_usage_perc", "The replica's reported KV usage.",
        lambda b: b.kv_usage)
    if scraped is not None:
        per(G, "router_backend_scraped", "1 if this page holds the replica's own series.",
            lambda b: b in scraped)
    return out


class _Families:
    """What generate_latest needs of a registry: the families to write."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families
