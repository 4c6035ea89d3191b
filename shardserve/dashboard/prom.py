"""Prometheus samples -> a flat `Snapshot` the dashboard computes with, and histogram quantiles.

The same code reads the server's own registry (`registry.collect()`) and a replica's /metrics
text (`text_string_to_metric_families`): both yield families whose samples carry the full
sample name (`shardserve:prompt_tokens_total`, `..._bucket` with an `le` label). Names are keyed
without their `prefix:` so a vLLM replica (`vllm:`) reads the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Labels that split a series the dashboard shows per value; every other label (model_name) is
# summed over.
KEPT_LABELS = ("gpu", "stage", "finished_reason", "reason")


@dataclass
class Histogram:
    """Cumulative bucket counts, as Prometheus exports them: counts[i] = observations <= les[i];
    the last `le` is +Inf."""

    les: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def minus(self, earlier: "Histogram | None") -> "Histogram":
        """The observations made after `earlier` (same buckets; a restart gives back self)."""
        if earlier is None or earlier.les != self.les or earlier.count > self.count:
            return self
        return Histogram(list(self.les), [a - b for a, b in zip(self.counts, earlier.counts)],
                         self.sum - earlier.sum)

    def plus(self, other: "Histogram") -> "Histogram":
        if not self.les:
            return Histogram(list(other.les), list(other.counts), other.sum)
        if other.les != self.les:  # replicas with other buckets: not mergeable; keep ours
            return self
        return Histogram(list(self.les), [a + b for a, b in zip(self.counts, other.counts)],
                         self.sum + other.sum)

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.les, self.counts)

    def to_json(self) -> dict[str, Any]:
        # +Inf is not JSON; the last bucket is +Inf by construction.
        return {"le": self.les[:-1], "counts": self.counts, "sum": self.sum}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Histogram":
        return cls([*data["le"], math.inf], list(data["counts"]), float(data.get("sum", 0.0)))


@dataclass
class Snapshot:
    """One reading of every series: `values` by short name (labels other than KEPT_LABELS summed
    over), `labelled[name][label_value]` for the KEPT_LABELS splits, histograms by short name."""

    values: dict[str, float] = field(default_factory=dict)
    labelled: dict[str, dict[str, float]] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def get(self, name: str, default: float = 0.0) -> float:
        return self.values.get(name, default)


def short_name(name: str) -> str:
    """'shardserve:prompt_tokens_total' -> 'prompt_tokens_total'."""
    return name.rpartition(":")[2]


def snapshot_from_families(families: Iterable[Any]) -> Snapshot:
    snap = Snapshot()
    buckets: dict[str, dict[float, float]] = {}
    for family in families:
        for sample in family.samples:
            name, labels, value = short_name(sample.name), sample.labels, float(sample.value)
            if family.type == "histogram":
                base = short_name(family.name)
                if name.endswith("_bucket"):
                    le = float(labels["le"])
                    per = buckets.setdefault(base, {})
                    per[le] = per.get(le, 0.0) + value
                elif name.endswith("_sum"):
                    snap.histograms.setdefault(base, Histogram()).sum += value
                continue
            snap.values[name] = snap.values.get(name, 0.0) + value
            for label in KEPT_LABELS:
                if label in labels:
                    split = snap.labelled.setdefault(name, {})
                    split[labels[label]] = split.get(labels[label], 0.0) + value
    for base, per in buckets.items():
        hist = snap.histograms.setdefault(base, Histogram())
        hist.les = sorted(per)
        hist.counts = [per[le] for le in hist.les]
    return snap


def snapshot_from_text(text: str) -> Snapshot:
    from prometheus_client.parser import text_string_to_metric_families
    return snapshot_from_families(text_string_to_metric_families(text))


def histogram_quantile(q: float, les: list[float], counts: list[float]) -> float | None:
    """Prometheus' histogram_quantile: find the bucket holding rank q * total and interpolate
    linearly inside it (the first bucket starts at 0); a rank in the +Inf bucket gives the highest
    finite bound. None when there are no observations."""
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    for i, (le, cumulative) in enumerate(zip(les, counts)):
        if cumulative >= rank:
            if math.isinf(le):
                return les[i - 1] if i > 0 else None
            lower = les[i - 1] if i > 0 else 0.0
            below = counts[i - 1] if i > 0 else 0.0
            inside = cumulative - below
            if inside <= 0:
                return le
            return lower + (le - lower) * (rank - below) / inside
    return les[-2] if len(les) > 1 else None
