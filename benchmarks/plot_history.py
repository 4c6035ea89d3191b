"""Benchmark results over time: one panel per workload of benchmarks/history.csv (Llama-3-8B
shape, bf16, one GPU), output tokens/s per measured commit, with the issue's target dashed.

    python benchmarks/plot_history.py [--csv benchmarks/history.csv] [--out docs/benchmark_history.png]

Append a row per workload to the CSV after each run of benchmarks/llama8b_vs_hf.py (its command,
date, GPU and commit are in BENCHMARKS.md). The 256 x (512/256) target is 8x transformers eager
measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default="benchmarks/history.csv")
    p.add_argument("--out", default="docs/benchmark_history.png")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(args.csv) as f:
        for row in csv.DictReader(f):
            series[row["workload"]].append(row)
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (workload, rows) in zip(axes[0], series.items()):
        labels = [f"{r['commit']}\n{r['date']}" for r in rows]
        values = [float(r["output_tok_s"]) for r in rows]
        ax.plot(range(len(rows)), values, marker="o", label="shardserve")
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}", (i, v), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
        targets = [float(r["target"]) for r in rows if r["target"]]
        if targets:
            ax.plot(range(len(rows)), [float(r["target"] or "nan") for r in rows], "--",
                    color="grey", label="target")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(f"{workload} on {rows[-1]['gpu']}", fontsize=10)
        ax.set_ylabel("output tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Llama-3-8B shape, bf16 weights, one GPU: results over time")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
