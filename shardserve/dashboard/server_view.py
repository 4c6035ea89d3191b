"""GET /dashboard/data on a server: its own Prometheus registry (read directly, the same series
/metrics renders) plus what the registry cannot say: phase, the parallel layout."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from shardserve import __version__
from shardserve.dashboard.history import MetricsHistory, lifetime_hit_rate
from shardserve.dashboard.layout import parallel_layout
from shardserve.dashboard.prom import snapshot_from_families
from shardserve.dashboard.stats import gauges, latencies, totals

if TYPE_CHECKING:
    from shardserve.server.state import ServerState


class ServerDashboard:
    def __init__(self, state: "ServerState") -> None:
        self.state = state
        self.history = MetricsHistory()
        self._layout: dict[str, Any] | None = None  # the config does not change: built once

    def data(self) -> dict[str, Any]:
        state = self.state
        snap = snapshot_from_families(state.metrics.registry.collect())
        now = self.history.record(snap)
        view = self.history.view(now)
        recent_base = view["recent_base"]
        if self._layout is None:
            self._layout = parallel_layout(state.config)
        layout = {**self._layout,
                  "tp_comm_time_ratio": snap.values.get("tp_comm_time_ratio"),
                  "pp_stage_busy_ratio": snap.labelled.get("pp_stage_busy_ratio", {})}
        used = snap.labelled.get("gpu_memory_used_bytes", {})
        total = snap.labelled.get("gpu_memory_total_bytes", {})
        gpus = [{"gpu": gpu, "used_bytes": used.get(gpu), "total_bytes": total.get(gpu)}
                for gpu in sorted(set(used) | set(total), key=_gpu_order)]
        cc, sc = state.config.cache_config, state.config.scheduler_config
        return {
            "kind": "server",
            "time": now.wall,
            "server": {"model": state.model_name, "version": __version__,
                       "status": _status(state), "uptime_s": time.time() - state.start_time,
                       "in_flight": state.num_inflight, "max_num_seqs": sc.max_num_seqs,
                       "block_size": cc.block_size,
                       "prefix_caching": cc.enable_prefix_caching},
            "gauges": gauges(snap),
            "totals": totals(snap),
            "finished_by_reason": snap.labelled.get("request_success_total", {}),
            "rejected_by_reason": snap.labelled.get("num_requests_rejected_total", {}),
            "prefix_cache_hit_rate": lifetime_hit_rate(snap),
            "rates": view["rates"],
            "latency": latencies(snap, recent_base and recent_base.snap),
            "recent_window_s": view["recent_window_s"],
            "gpus": gpus,
            "layout": layout,
            "history": self.history.series(),
        }


def _status(state: "ServerState") -> str:
    if not state.engine.is_alive or state.startup_error:
        return "dead"
    if state.draining:
        return "draining"
    return "ok" if state.ready else "loading"


def _gpu_order(label: str) -> tuple[int, str]:
    return (int(label), "") if label.isdigit() else (1 << 30, label)
