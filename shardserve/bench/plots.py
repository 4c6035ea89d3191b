"""PNG charts for `bench serve --plot` and `bench throughput --plot` (matplotlib, optional).

Sizes are fixed so a chart drops into a report at a known size:

    bench serve, one rate       1500 x 450   latency percentiles | latency over time | throughput
    bench serve, several rates  1500 x 900   the same over time (one colour per rate), and below:
                                             latency percentiles | throughput, against the rate
    bench throughput            1200 x 450   throughput over time | per-request latency spread
"""

from __future__ import annotations

import math
import sys
from typing import Any

DPI = 100
SERVE_SIZE = (15.0, 4.5)  # inches; x DPI = pixels
SERVE_RATES_SIZE = (15.0, 9.0)
THROUGHPUT_SIZE = (12.0, 4.5)
_LATENCY_KEYS = ("ttft", "tpot", "itl", "e2el")


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a warning) without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: --plot needs matplotlib (pip install matplotlib); no plot written",
              file=sys.stderr)
        return None
    return plt


def _percentile(values: list[float], p: float) -> float:
    from shardserve.bench.serve_report import percentile
    return percentile(values, p)


def _bins(duration: float, min_bins: int) -> tuple[int, float]:
    """(number, width) of time bins over [0, duration]: about one a second, 60 at most."""
    num = max(min_bins, min(60, int(duration)))
    return num, max(duration, 1e-9) / num


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


# ---- bench serve -----------------------------------------------------------------------------

def save_serve_plot(runs: list[tuple[list[Any], dict[str, Any]]], path: str) -> bool:
    """`runs`: (per-request results, summary) for each --request-rate, in the order run.
    False (and no file) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    several = len(runs) > 1
    fig = plt.figure(figsize=SERVE_RATES_SIZE if several else SERVE_SIZE, dpi=DPI)
    grid = fig.add_gridspec(2 if several else 1, 3)
    ax_bars, ax_time, ax_tput = (fig.add_subplot(grid[0, i]) for i in range(3))
    _latency_bars(ax_bars, runs[-1][1])
    for k, (results, summary) in enumerate(runs):
        color = f"C{k}"
        label = f"rate {_rate_label(summary['config_request_rate'])}"
        _latency_over_time(ax_time, results, summary, color, label if several else None)
        _throughput_over_time(ax_tput, results, summary, color, label if several else None)
    if not ax_time.lines:
        _no_successes(ax_time)
    if several:
        _against_rate(fig.add_subplot(grid[1, 0:2]), fig.add_subplot(grid[1, 2]), runs)
    s = runs[-1][1]
    rates = ", ".join(_rate_label(r[1]["config_request_rate"]) for r in runs)
    fig.suptitle(f"{s['config_model']}  rate={rates} req/s  in={s['config_input_len']} "
                 f"out={s['config_output_len']}  concurrency={s['config_max_concurrency'] or 'inf'}")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _no_successes(ax) -> None:
    """Say so on a latency panel: an empty log axis says nothing (and matplotlib warns)."""
    ax.text(0.5, 0.5, "no successful requests", ha="center", va="center",
            transform=ax.transAxes, color="grey")


def _latency_bars(ax, summary: dict[str, Any]) -> None:
    rate = _rate_label(summary["config_request_rate"])
    ax.set_title(f"Latency percentiles (rate {rate})")
    if not summary["completed"]:  # every latency is 0.0: nothing to draw on a log axis
        ax.set_xticks(range(len(_LATENCY_KEYS)), [m.upper() for m in _LATENCY_KEYS])
        _no_successes(ax)
        return
    width = 0.25
    for j, stat in enumerate(("median", "p90", "p99")):
        values = [summary[f"{stat}_{m}_ms"] for m in _LATENCY_KEYS]
        ax.bar([i + (j - 1) * width for i in range(len(_LATENCY_KEYS))], values, width, label=stat)
    ax.set_xticks(range(len(_LATENCY_KEYS)), [m.upper() for m in _LATENCY_KEYS])
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def _latency_over_time(ax, results: list[Any], summary: dict[str, Any], color: str,
                       label: str | None) -> None:
    """TTFT by when the request started, and ITL by when the token arrived: p50 solid, p99
    dashed, per time bin."""
    num, width = _bins(summary["duration"], 5)
    ttft: list[list[float]] = [[] for _ in range(num)]
    itl: list[list[float]] = [[] for _ in range(num)]
    for r in results:
        if not r.success:
            continue
        ttft[min(int(r.start / width), num - 1)].append(r.ttft * 1e3)
        for t, gap in zip(r.token_times[1:], r.itl):
            itl[min(int(t / width), num - 1)].append(gap * 1e3)
    centers = [(i + 0.5) * width for i in range(num)]
    for values, marker, name in ((ttft, "o", "TTFT"), (itl, ".", "ITL")):
        points = [(c, v) for c, v in zip(centers, values) if v]
        if not points:
            continue
        xs = [c for c, _ in points]
        # One rate: a legend entry per line. Several: one per rate (colour); the title says
        # what marker and line style mean.
        p50_label = f"{name} p50" if label is None else (label if name == "TTFT" else None)
        ax.plot(xs, [_percentile(v, 50) for _, v in points], marker=marker, color=color,
                label=p50_label, linewidth=1.2 if name == "TTFT" else 0.8)
        ax.plot(xs, [_percentile(v, 99) for _, v in points], linestyle="--", color=color,
                label=f"{name} p99" if label is None else None,
                linewidth=1.2 if name == "TTFT" else 0.8)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("ms")
    if label is None:
        ax.set_title("Latency percentiles over time")
    else:
        ax.set_title("Latency over time (o TTFT, . ITL; p50 solid, p99 dashed)", fontsize=10)
    if ax.lines:  # this run's or an earlier one's (several rates share the axes)
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)


def _throughput_over_time(ax, results: list[Any], summary: dict[str, Any], color: str,
                          label: str | None) -> None:
    num, width = _bins(summary["duration"], 5)
    counts = [0] * num
    for r in results:
        if r.success:
            for t in r.token_times:
                counts[min(int(t / width), num - 1)] += 1
    ax.plot([(i + 0.5) * width for i in range(num)], [c / width for c in counts], marker=".",
            color=color, label=label)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output chunks/s (~tokens/s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput over time")
    if label:
        ax.legend(fontsize=8)


def _against_rate(ax_lat, ax_tput, runs: list[tuple[list[Any], dict[str, Any]]]) -> None:
    """Latency percentiles and throughput against the configured rate, the rates evenly spaced
    in increasing order ('inf', all at once, last): rate sweeps are usually geometric."""
    summaries = sorted((s for _, s in runs), key=lambda s: s["config_request_rate"])
    x = list(range(len(summaries)))
    # A rate where every request failed has no latencies (its 0.0s are not measurements).
    ok = [i for i, s in enumerate(summaries) if s["completed"]]
    for k, key in enumerate(_LATENCY_KEYS):
        for stat, style in (("median", "-"), ("p99", "--")):
            ax_lat.plot(ok, [summaries[i][f"{stat}_{key}_ms"] for i in ok], linestyle=style,
                        marker="o", color=f"C{k}", label=f"{key.upper()} {stat}")
    ax_lat.set_ylabel("ms")
    ax_lat.set_title("Latency percentiles against request rate")
    if ok:
        ax_lat.set_yscale("log")
        ax_lat.legend(fontsize=8, ncol=4)
    else:
        _no_successes(ax_lat)
    ax_tput.plot(x, [s["output_throughput"] for s in summaries], marker="o", color="C0",
                 label="output tok/s")
    ax_tput.set_ylabel("output tokens/s")
    ax_tput.set_ylim(bottom=0)
    twin = ax_tput.twinx()
    twin.plot(x, [s["request_throughput"] for s in summaries], marker="s", color="C1",
              linestyle=":", label="requests/s")
    twin.set_ylabel("requests/s (achieved)")
    twin.set_ylim(bottom=0)
    ax_tput.set_title("Throughput against request rate")
    ax_tput.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    for ax in (ax_lat, ax_tput):
        ax.set_xticks(x, [_rate_label(s["config_request_rate"]) for s in summaries])
        ax.set_xlabel("request rate (req/s)")


# ---- bench throughput ------------------------------------------------------------------------

def save_throughput_plot(outputs: list[Any], start: float, elapsed: float, path: str,
                         title: str = "") -> bool:
    """Offline throughput from the requests' own timestamps (time.monotonic(); `start` on the
    same clock): output tokens/s over time, and the spread of per-request latencies.

    Tokens/s over time spreads each request's output evenly between its first and last token:
    under continuous batching a running request gains one token per step, so this is exact up
    to step-to-step time differences, and costs the measured loop nothing.
    """
    plt = _pyplot()
    if plt is None:
        return False
    num, width = _bins(elapsed, 30)  # tokens are spread as a density: fine bins stay smooth
    tokens = [0.0] * num
    finished_at, e2e, ttft = [], [], []
    for out in outputs:
        m = getattr(out, "metrics", None)
        if m is None or m.first_token_time is None:
            continue
        n = sum(len(c.token_ids) for c in out.outputs)
        first, last = m.first_token_time - start, (m.last_token_time or m.first_token_time) - start
        end = (m.finished_time or m.last_token_time or m.first_token_time) - start
        finished_at.append(end)
        e2e.append(end - (m.arrival_time - start))
        ttft.append(m.first_token_time - m.arrival_time)
        _spread(tokens, width, first, last, n)
    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=THROUGHPUT_SIZE, dpi=DPI)
    ax_tput.plot([(i + 0.5) * width for i in range(num)], [t / width for t in tokens],
                 marker=".", color="C0", label="output tokens/s")
    ax_tput.set_xlabel("time since start (s)")
    ax_tput.set_ylabel("output tokens/s")
    ax_tput.set_ylim(bottom=0)
    ax_tput.set_title("Throughput over time")
    ax_tput.legend(loc="upper left", fontsize=8)
    done = ax_tput.twinx()
    finished_at.sort()
    done.step(finished_at, range(1, len(finished_at) + 1), where="post", color="C1",
              label="requests finished")
    done.set_ylabel("requests finished")
    done.set_ylim(bottom=0)
    done.legend(loc="lower right", fontsize=8)
    top = max(e2e + ttft + [1e-3])
    edges = [top * i / 30 for i in range(31)]
    ax_lat.hist(e2e, bins=edges, alpha=0.6, label="end to end", color="C0")
    ax_lat.hist(ttft, bins=edges, alpha=0.6, label="time to first token", color="C1")
    for values, color in ((e2e, "C0"), (ttft, "C1")):
        for p, style in ((50, "-"), (99, "--")):
            if values:
                ax_lat.axvline(_percentile(values, p), color=color, linestyle=style, linewidth=1)
    ax_lat.set_xlabel("seconds (lines: p50 solid, p99 dashed)")
    ax_lat.set_ylabel("requests")
    ax_lat.set_title("Per-request latency")
    ax_lat.legend(fontsize=8)
    fig.suptitle(title or f"bench throughput: {len(outputs)} requests in {elapsed:.1f} s")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _spread(bins: list[float], width: float, first: float, last: float, n: int) -> None:
    """Add n tokens to the time bins: the first at `first`, the other n - 1 spread evenly (as a
    density, so bin edges cause no aliasing) over (first, last]."""
    if n <= 0:
        return
    num = len(bins)

    def index(t: float) -> int:
        return min(max(int(t / width), 0), num - 1)

    bins[index(first)] += 1
    rest = n - 1
    if rest == 0:
        return
    if last <= first:
        bins[index(last)] += rest
        return
    for i in range(index(first), index(last) + 1):
        lo, hi = max(first, i * width), min(last, (i + 1) * width)
        if i == num - 1:
            hi = last  # the last bin takes whatever rounding left past its edge
        if hi > lo:
            bins[i] += rest * (hi - lo) / (last - first)
