"""Turns `bench serve` request timings into vLLM's summary: throughput, goodput, and TTFT, TPOT,
ITL and end-to-end latency (mean, median, P90, P99), as a table and JSON (plots.py draws the
PNG)."""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

METRICS = ("ttft", "tpot", "itl", "e2el")
_SLO_KEYS = {"ttft": "time to first token", "tpot": "time per output token",
             "e2el": "end-to-end latency"}


@dataclass
class BenchConfig:
    base_url: str
    model: str
    request_rate: float
    max_concurrency: int | None
    num_prompts: int
    input_len: int
    output_len: int
    seed: int
    goodput: dict[str, float] = field(default_factory=dict)  # SLO key -> milliseconds
    burstiness: float = 1.0
    # What the table shows (vLLM's --percentile-metrics and --metric-percentiles); the JSON
    # always has every metric, and P90 and P99 for the plots.
    percentile_metrics: tuple[str, ...] = METRICS
    metric_percentiles: tuple[float, ...] = (90.0, 99.0)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in _SLO_KEYS:
            raise ValueError(f"expected KEY:MILLISECONDS with KEY in {', '.join(_SLO_KEYS)}, "
                             f"got {item!r}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"{value!r} in {item!r} is not a number of milliseconds") from None
        if slos[key] <= 0:
            raise ValueError(f"the SLO in {item!r} must be positive")
    return slos


def parse_percentile_metrics(text: str) -> tuple[str, ...]:
    """"ttft,tpot,itl" -> ("ttft", "tpot", "itl"), as vLLM's --percentile-metrics."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"expected a comma-separated list of {', '.join(METRICS)}, got {text!r}")
    return names


def parse_metric_percentiles(text: str) -> tuple[float, ...]:
    """"50,90,99" -> (50.0, 90.0, 99.0), as vLLM's --metric-percentiles."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers such as 50,90,99, "
                         f"got {text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"expected percentiles above 0 and at most 100, got {text!r}")
    return values


def percentile_key(p: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9" (vLLM's JSON keys)."""
    return f"p{int(p)}" if p == int(p) else f"p{p:g}"


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _stats_ms(values: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    stats = {"mean": statistics.fmean(ms) if ms else 0.0,
             "median": statistics.median(ms) if ms else 0.0,
             "std": statistics.pstdev(ms) if ms else 0.0}
    for p in sorted({90.0, 99.0, *percentiles}):
        stats[percentile_key(p)] = percentile(ms, p)
    return stats


def _tpot(r: Any) -> float | None:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def summarize(results: list[Any], duration: float, config: BenchConfig) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    tpots = [t for t in (_tpot(r) for r in ok) if t is not None]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = 0
    for r in ok:
        measured = {"ttft": r.ttft, "tpot": _tpot(r) or 0.0, "e2el": r.latency}
        if all(measured[k] * 1000.0 <= slo for k, slo in config.goodput.items()):
            good += 1
    summary: dict[str, Any] = {
        "date": datetime.now().isoformat(timespec="seconds"),
        **{f"config_{k}": v for k, v in asdict(config).items()},
        # vLLM's names for the run's settings, so scripts reading its result files work here.
        "model_id": config.model, "num_prompts": config.num_prompts,
        "request_rate": config.request_rate, "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "request_goodput": (good / duration if duration else 0.0) if config.goodput else None,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots),
                         ("itl", [x for r in ok for x in r.itl]), ("e2el", [r.latency for r in ok])):
        for stat, value in _stats_ms(values, config.metric_percentiles).items():
            summary[f"{stat}_{name}_ms"] = value
    errors = [r.error for r in results if not r.success]
    summary["first_errors"] = sorted(set(errors))[:5]
    return summary


def print_summary(s: dict[str, Any], out: Any = sys.stdout) -> None:
    def row(label: str, value: Any, fmt: str = "{:<10.2f}") -> None:
        text = fmt.format(value) if isinstance(value, float) else str(value)
        print(f"{label:<40} {text}", file=out)

    def rule(title: str, char: str = "-") -> None:
        print(f"{title:{char}^50}", file=out)

    rule(" Serving Benchmark Result ", "=")
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Request rate configured (req/s):", s["config_request_rate"])
    row("Maximum request concurrency:", s["config_max_concurrency"] or "unlimited")
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    if s["request_goodput"] is not None:
        slos = " ".join(f"{k}:{v:g}ms" for k, v in s["config_goodput"].items())
        row(f"Request goodput (req/s) [{slos}]:", s["request_goodput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key in s["config_percentile_metrics"]:
        rule(titles[key])
        name = key.upper()
        row(f"Mean {name} (ms):", s[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", s[f"median_{key}_ms"])
        for p in s["config_metric_percentiles"]:
            label = percentile_key(p).upper()
            row(f"{label} {name} (ms):", s[f"{percentile_key(p)}_{key}_ms"])
    print("=" * 50, file=out)
    if s["first_errors"]:
        print("Errors (first kinds): " + "; ".join(s["first_errors"]), file=out)
