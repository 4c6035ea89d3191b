"""The router's /metrics page, built in-process from real server registries: every replica's
series kept with a replica label, HELP/TYPE once per family, histograms whole, and a page that
prometheus_client's own parser reads back."""

from __future__ import annotations

from collections import Counter

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shardserve.router.metrics import _Families, merge_replica
from shardserve.server.metrics import ServerMetrics


def _replica_page(num_finished: int, latency: float) -> str:
    metrics = ServerMetrics("m")
    for _ in range(num_finished):
        metrics.record_finished("length", latency)
        metrics.record_first_token(0.05, num_prompt_tokens=7)
    return metrics.render().decode()


def _merged(pages: dict[str, str]) -> str:
    families: dict = {}
    for replica, page in pages.items():
        merge_replica(families, replica, text_string_to_metric_families(page))
    return generate_latest(_Families(families.values())).decode()


def test_replicas_keep_their_series_under_one_family_each() -> None:
    text = _merged({"0": _replica_page(3, 0.4), "1": _replica_page(5, 12.0)})
    declared = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
    assert declared and max(declared.values()) == 1, declared
    families = {f.name: f for f in text_string_to_metric_families(text)}
    single = {f.name for f in text_string_to_metric_families(_replica_page(0, 0))}
    assert set(families) == single  # every family of a replica, empty ones included

    success = {s.labels["replica"]: s.value for s in families["shardserve:request_success"].samples
               if s.labels["finished_reason"] == "length"}
    assert success == {"0": 3, "1": 5}
    prompt = families["shardserve:prompt_tokens"].samples
    assert sum(s.value for s in prompt) == 7 * 8

    e2e = families["shardserve:e2e_request_latency_seconds"]
    assert e2e.type == "histogram"
    for replica, count, total in (("0", 3, 1.2), ("1", 5, 60.0)):
        mine = [s for s in e2e.samples if s.labels["replica"] == replica]
        by_suffix = {s.name.rsplit("_", 1)[1]: s for s in mine if "le" not in s.labels}
        buckets = [s.value for s in mine if s.name.endswith("_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative, +Inf = count
        assert by_suffix["count"].value == count
        assert abs(by_suffix["sum"].value - total) < 1e-9


def test_existing_replica_label_is_kept_as_exported_replica() -> None:
    inner = "# TYPE shardserve:num_requests_running gauge\n" \
            'shardserve:num_requests_running{replica="0"} 2\n' \
            'shardserve:num_requests_running{replica="1"} 3\n'
    text = _merged({"10.0.0.5:8000": inner})
    samples = {(s.labels["replica"], s.labels["exported_replica"]): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {("10.0.0.5:8000", "0"): 2, ("10.0.0.5:8000", "1"): 3}


def test_a_family_redeclared_with_another_type_is_dropped_not_mistyped() -> None:
    gauge = "# TYPE shardserve:x gauge\nshardserve:x 1\n"
    counter = "# TYPE shardserve:x_total counter\nshardserve:x_total 5\n"
    families = list(text_string_to_metric_families(_merged({"0": gauge, "1": counter})))
    assert [(f.name, f.type, [s.labels["replica"] for s in f.samples]) for f in families] == [
        ("shardserve:x", "gauge", ["0"])]
