"""A short history of snapshots, kept by whoever reads the dashboard data.

Why no background sampler: a snapshot is taken when the page polls (about once a second while a
dashboard is open) and nothing runs while nobody looks, so the server carries no extra task to
start and stop with its lifespan. Several open pages share the history: a snapshot is stored
only when the last stored one is `min_interval_s` old, and stored ones older than `max_age_s`
are dropped, so the memory is bounded whatever the number of viewers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from shardserve.dashboard.prom import Snapshot
from shardserve.dashboard.stats import LATENCIES, gauges, hit_rate, quantile_between, rates, totals

RATE_WINDOW_S = 5.0  # tokens/s and requests/s are averaged over about this long
RECENT_WINDOW_S = 60.0  # "recent" latency percentiles cover about this long
SPARK_WINDOW_S = 10.0  # each sparkline point's latency percentile covers about this long


@dataclass
class Sample:
    mono: float  # time.monotonic(): deltas
    wall: float  # time.time(): what the page shows, and what a router aligns replicas on
    snap: Snapshot


class MetricsHistory:
    # 0.9 s: a page polling every second, with jitter, still stores every reading.
    def __init__(self, min_interval_s: float = 0.9, max_age_s: float = 300.0) -> None:
        self.min_interval_s = min_interval_s
        self.max_age_s = max_age_s
        self.samples: deque[Sample] = deque()

    def record(self, snap: Snapshot, mono: float | None = None,
               wall: float | None = None) -> Sample:
        """Note a fresh reading; returns it (stored or not)."""
        sample = Sample(time.monotonic() if mono is None else mono,
                        time.time() if wall is None else wall, snap)
        while self.samples and sample.mono - self.samples[0].mono > self.max_age_s:
            self.samples.popleft()
        if not self.samples or sample.mono - self.samples[-1].mono >= self.min_interval_s:
            self.samples.append(sample)
        return sample

    def base(self, now: Sample, window_s: float) -> Sample | None:
        """The latest stored sample at least `window_s` before `now`, else the oldest one that
        is older than `now` at all (a shorter window beats none while the history fills)."""
        best = None
        for s in self.samples:
            if now.mono - s.mono >= window_s:
                best = s
            elif best is None and s.mono < now.mono:
                return s
            else:
                break
        return best

    def view(self, now: Sample) -> dict[str, Any]:
        """Rates over RATE_WINDOW_S and latency 'recent' over RECENT_WINDOW_S, as of `now`."""
        rate_base = self.base(now, RATE_WINDOW_S)
        recent_base = self.base(now, RECENT_WINDOW_S)
        return {
            "rates": rates(now.snap, rate_base and rate_base.snap,
                           rate_base and now.mono - rate_base.mono),
            "recent_window_s": recent_base and now.mono - recent_base.mono,
            "recent_base": recent_base,
        }

    def series(self) -> dict[str, list]:
        """Sparkline points, one per stored sample after the first: rates over the gap to the
        previous sample, gauges as read, latency p50 over about SPARK_WINDOW_S."""
        out: dict[str, list] = {k: [] for k in (
            "t", "prompt_tokens_per_s", "generation_tokens_per_s", "running", "waiting",
            "kv_cache_usage", "prefix_cache_hit_rate", "ttft_p50", "itl_p50")}
        samples = list(self.samples)
        for i in range(1, len(samples)):
            prev, cur = samples[i - 1], samples[i]
            r = rates(cur.snap, prev.snap, cur.mono - prev.mono)
            g = gauges(cur.snap)
            j = i
            while j > 0 and cur.mono - samples[j].mono < SPARK_WINDOW_S:
                j -= 1
            out["t"].append(round(cur.wall, 3))
            out["prompt_tokens_per_s"].append(r["prompt_tokens_per_s"])
            out["generation_tokens_per_s"].append(r["generation_tokens_per_s"])
            out["running"].append(g["running"])
            out["waiting"].append(g["waiting"])
            out["kv_cache_usage"].append(g["kv_cache_usage"])
            out["prefix_cache_hit_rate"].append(r["prefix_cache_hit_rate"])
            for key in ("ttft", "itl"):
                out[f"{key}_p50"].append(quantile_between(cur.snap, samples[j].snap,
                                                          LATENCIES[key], 0.5))
        return out


def lifetime_hit_rate(snap: Snapshot) -> float | None:
    t = totals(snap)
    return hit_rate(t["prefix_cache_hits"], t["prefix_cache_queries"])
