"""The dashboard's arithmetic on CPU, no server: quantiles from buckets, snapshots from a
registry and from /metrics text alike, rates and windows over the history."""

from __future__ import annotations

import math

import pytest

from shardserve.dashboard.history import MetricsHistory
from shardserve.dashboard.prom import (Histogram, histogram_quantile, snapshot_from_families,
                                       snapshot_from_text)
from shardserve.dashboard.stats import latencies, rates
from shardserve.engine.core_messages import CoreStats
from shardserve.engine.scheduler import SchedulerStats
from shardserve.server.metrics import ServerMetrics

INF = math.inf


def test_histogram_quantile_like_prometheus():
    les, counts = [0.1, 0.5, 1.0, INF], [2.0, 6.0, 8.0, 10.0]
    # rank 5 of 10 lies in (0.1, 0.5]: 3 of its 4 observations -> 0.1 + 0.4 * 3/4
    assert histogram_quantile(0.5, les, counts) == pytest.approx(0.4)
    assert histogram_quantile(0.1, les, counts) == pytest.approx(0.05)  # first bucket from 0
    assert histogram_quantile(0.99, les, counts) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, les, [0.0, 0.0, 0.0, 0.0]) is None
    assert histogram_quantile(0.5, [1.0, INF], [4.0, 4.0]) == pytest.approx(0.5)


def test_histogram_minus_and_plus():
    a = Histogram([1.0, INF], [3.0, 5.0], 7.0)
    b = Histogram([1.0, INF], [1.0, 2.0], 2.0)
    assert a.minus(b).counts == [2.0, 3.0] and a.minus(b).sum == 5.0
    assert b.minus(a) is b  # went backwards: a restart, so the whole of b
    assert a.plus(b).counts == [4.0, 7.0]
    assert Histogram.from_json(a.to_json()) == a


def _metrics_with_traffic() -> ServerMetrics:
    m = ServerMetrics("m")
    m.record_first_token(0.03, 20)
    m.record_first_token(0.3, 12)
    for gap in (0.02, 0.02, 0.2):
        m.record_tokens(1, gap)
    m.record_finished("length", 1.2)
    m.record_core_stats(CoreStats(SchedulerStats(2, 1, 0.25, 32, 16, 1), {0: 5 << 30}, {0: 80 << 30},
                                  {"tp_comm_time_ratio": 0.1, "pp_stage_busy_ratio_1": 0.7}))
    return m


def test_registry_and_text_give_the_same_snapshot():
    m = _metrics_with_traffic()
    direct = snapshot_from_families(m.registry.collect())
    parsed = snapshot_from_text(m.render().decode())
    assert direct == parsed
    assert direct.get("prompt_tokens_total") == 32 and direct.get("generation_tokens_total") == 3
    assert direct.get("num_requests_running") == 2 and direct.get("kv_cache_usage_perc") == 0.25
    assert direct.labelled["gpu_memory_used_bytes"] == {"0": float(5 << 30)}
    assert direct.labelled["pp_stage_busy_ratio"] == {"1": 0.7}
    assert direct.labelled["request_success_total"]["length"] == 1
    ttft = direct.histograms["time_to_first_token_seconds"]
    assert ttft.count == 2 and ttft.sum == pytest.approx(0.33)


def test_history_rates_and_windows():
    m = ServerMetrics("m")
    history = MetricsHistory(min_interval_s=1.0, max_age_s=30.0)
    first = history.record(snapshot_from_families(m.registry.collect()), mono=100.0, wall=1e9)
    assert history.view(first)["rates"]["generation_tokens_per_s"] is None  # nothing to compare
    m.record_first_token(0.05, 100)
    m.record_tokens(40, 0.01)
    history.record(snapshot_from_families(m.registry.collect()), mono=101.0, wall=1e9 + 1)
    m.record_tokens(60, 0.01)
    history.record(snapshot_from_families(m.registry.collect()), mono=101.5, wall=1e9 + 1.5)
    assert len(history.samples) == 2  # 0.5 s after the last stored one: not stored
    now = history.record(snapshot_from_families(m.registry.collect()), mono=106.0, wall=1e9 + 6)
    view = history.view(now)
    # The 5 s rate window reaches back to the sample at 101.0: 60 tokens since then.
    assert view["rates"]["window_s"] == pytest.approx(5.0)
    assert view["rates"]["generation_tokens_per_s"] == pytest.approx(60 / 5)
    # Less than 60 s of history: "recent" covers all of it (since 100.0).
    assert view["recent_window_s"] == pytest.approx(6.0)
    lat = latencies(now.snap, view["recent_base"].snap)
    assert lat["ttft"]["recent"]["count"] == 1 and lat["itl"]["lifetime"]["count"] == 2
    series = history.series()
    assert series["generation_tokens_per_s"] == [pytest.approx(40.0), pytest.approx(60 / 5)]
    # Samples older than max_age_s are dropped.
    later = history.record(now.snap, mono=140.0, wall=1e9 + 40)
    assert [s.mono for s in history.samples] == [140.0]
    assert rates(later.snap, None, None)["window_s"] is None
