"""Parallel-layout numbers from the engine core reach /metrics under shardserve: names."""

from prometheus_client.parser import text_string_to_metric_families

from shardserve.engine.core_messages import CoreStats
from shardserve.engine.scheduler import SchedulerStats
from shardserve.server.metrics import ServerMetrics


def test_tp_comm_share_and_pp_stage_busy_are_exported():
    metrics = ServerMetrics("m")
    metrics.record_core_stats(CoreStats(SchedulerStats(), parallel={
        "tp_comm_time_ratio": 0.125, "pp_stage_busy_ratio_0": 0.5, "pp_stage_busy_ratio_1": 0.75}))
    samples = {(s.name, s.labels.get("stage")): s.value
               for fam in text_string_to_metric_families(metrics.render().decode())
               for s in fam.samples}
    assert samples[("shardserve:tp_comm_time_ratio", None)] == 0.125
    assert samples[("shardserve:pp_stage_busy_ratio", "0")] == 0.5
    assert samples[("shardserve:pp_stage_busy_ratio", "1")] == 0.75
