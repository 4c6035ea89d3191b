"""Benchmark results over time: one panel per workload of benchmarks/history.csv (Llama-3-8B
shape, bf16; one GPU unless the workload says TP 2), output tokens/s per measured commit, with
the issue's target dashed.

    python benchmarks/plot_history.py [--csv benchmarks/history.csv] [--out docs/benchmark_history.png]

Append a row per workload to the CSV after each run of benchmarks/llama8b_vs_hf.py (its command,
date, GPU and commit are in BENCHMARKS.md). The 256 x (512/256) target is 8x transformers eager
measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default="benchmarks/history.csv")
    p.add_argument("--out", default="docs/benchmark_history.png")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_series(args.csv)
    if not series:
        p.error(f"{args.csv} has no rows: nothing to plot")
    fig = draw(series, plt)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")


def read_series(path: str) -> dict[str, list[dict[str, str]]]:
    """The CSV's rows by workload, in file order."""
    series: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            series[row["workload"]].append(row)
    return series


def draw(series: dict[str, list[dict[str, str]]], plt):
    # Up to four panels a row: one long strip is unreadable once scaled to a page.
    cols = min(4, len(series))
    nrows = -(-len(series) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax, (workload, rows) in zip(axes.flat, series.items()):
        labels = [f"{r['commit']}\n{r['date']}" for r in rows]
        values = [float(r["output_tok_s"]) for r in rows]
        ax.plot(range(len(rows)), values, marker="o", label="shardserve")
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}", (i, v), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        # An empty cell, or no target column at all: no target for that row.
        targets = [float(r.get("target") or "nan") for r in rows]
        if not all(math.isnan(t) for t in targets):
            # A marker on each target: a dashed line alone draws nothing for a workload with
            # one row, nor for a target between rows that have none (NaN on both sides).
            ax.plot(range(len(rows)), targets, "--",
                    marker="_", markersize=14, color="grey", label="target")
        # Past 5 points the commit/date labels of a 5-inch panel run into each other.
        ax.set_xticks(range(len(rows)), labels, fontsize=8,
                      rotation=45 if len(rows) > 5 else 0, ha="right" if len(rows) > 5 else "center")
        ax.set_title(f"{workload} on {rows[-1]['gpu']}", fontsize=10)
        ax.set_ylabel("output tokens/s")
        top = max([*values, *(t for t in targets if not math.isnan(t))])
        ax.set_ylim(bottom=0, top=top * 1.12)  # room for the value labels under the title
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Llama-3-8B shape, bf16 weights (one GPU unless a panel says 2x): results over time")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
