"""Memory per GPU of each served layout next to the planner's estimate for the same layout.

    python benchmarks/layout_memory.py --model /tmp/llama3-8b --serve-json out/serve_x4.json \\
        --log-dir out/serve_x4_logs [--json out/layout_memory.json]

For every config of a serve_layouts.py run (its -tp/-pp/-dp flags and --max-model-len), the
planner (shardserve/planner) is pinned to that layout on the GPUs the run saw (count and size
from its nvidia-smi record) and its per-GPU estimate is set beside what the run measured:
  - KV-cache blocks: the server log's "KV cache: N blocks" lines (every rank logs its own; the
    engine uses the smallest) against the planner's num_blocks;
  - memory in use per GPU: nvidia-smi after the load (the largest GPU of the config) against
    the planner's total for its largest stage. With gpu_memory_utilization 0.9 both sit near
    0.9 of the card, so the KV blocks are the sharper test of the weights + activations part.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 1 << 30
_KV_LINE = re.compile(r"KV cache: (\d+) blocks of (\d+) tokens \(([\d.]+) GiB\)")


def layout_of(flags: list[str]) -> dict[str, int | float | None]:
    """-tp/-pp/-dp, --max-model-len, --gpu-memory-utilization and --max-num-seqs of a serve
    command line (later flags win, as in argparse)."""
    names = {"-tp": "tp", "--tensor-parallel-size": "tp", "-pp": "pp",
             "--pipeline-parallel-size": "pp", "-dp": "dp", "--data-parallel-size": "dp",
             "--max-model-len": "max_model_len", "--gpu-memory-utilization": "util",
             "--max-num-seqs": "max_num_seqs", "--max-num-batched-tokens": "max_batched"}
    out: dict[str, int | float | None] = {"tp": 1, "pp": 1, "dp": 1, "max_model_len": None,
                                          "util": 0.9, "max_num_seqs": 256, "max_batched": 8192}
    for i, flag in enumerate(flags):
        key, _, value = flag.partition("=")
        if key in names:
            value = value or (flags[i + 1] if i + 1 < len(flags) else "")
            out[names[key]] = float(value) if names[key] == "util" else int(value)
    return out


def measured_kv_blocks(log_path: str) -> list[int]:
    if not os.path.exists(log_path):
        return []
    with open(log_path, errors="replace") as fh:
        return [int(m.group(1)) for m in _KV_LINE.finditer(fh.read())]


def compare(model: str, serve_doc: dict, log_dir: str) -> list[dict]:
    from shardserve.planner.plan import PlanRequest, make_plan
    from shardserve.planner.shape import load_model_shape

    shape = load_model_shape(model)
    base_flags = shlex.split(serve_doc.get("server_flags") or "")
    rows = []
    for cfg in serve_doc.get("configs", []):
        lay = layout_of(base_flags + shlex.split(cfg.get("flags") or ""))
        smi = cfg.get("nvidia_smi") or []
        row: dict = {"config": cfg["config"], "layout": f"TP{lay['tp']} x PP{lay['pp']} x DP{lay['dp']}",
                     "status": cfg.get("status")}
        gpu_bytes = int(smi[0]["total_mib"] * 2**20) if smi else 141 * 10**9
        plan = make_plan(shape, PlanRequest(
            num_gpus=max(len(smi), lay["tp"] * lay["pp"] * lay["dp"]), gpu_memory_bytes=gpu_bytes,
            max_model_len=lay["max_model_len"], gpu_memory_utilization=lay["util"],
            max_num_seqs=lay["max_num_seqs"], max_num_batched_tokens=lay["max_batched"],
            tensor_parallel_size=lay["tp"], pipeline_parallel_size=lay["pp"],
            data_parallel_size=lay["dp"]))
        best = plan.best
        if best is None:
            row["planner"] = f"infeasible: {plan.reason}"
            rows.append(row)
            continue
        stages = best.stages
        row["planner_weights_gib"] = max(s.weights_bytes for s in stages) / GiB
        row["planner_total_gib"] = max(s.total_bytes for s in stages) / GiB
        row["planner_kv_blocks"] = best.num_blocks
        blocks = measured_kv_blocks(os.path.join(log_dir, f"server_{cfg['config']}.log"))
        if blocks:
            # Each replica logs its own; within a replica the smallest rank's count is used.
            row["measured_kv_blocks"] = min(blocks)
            row["kv_blocks_err"] = min(blocks) / best.num_blocks - 1
        used = [r["used_mib"] / 1024 for r in smi if r.get("used_mib")]
        if used:
            row["measured_max_gpu_gib"] = max(used)
            row["memory_err"] = max(used) / row["planner_total_gib"] - 1
        rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'config':<10} {'layout':<16} {'weights/GPU':>11} {'plan GiB':>9} {'meas GiB':>9} "
          f"{'err':>6} {'plan blocks':>11} {'meas blocks':>11} {'err':>6}")

    def f(row, key, fmt):
        v = row.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in rows:
        print(f"{r['config']:<10} {r['layout']:<16} {f(r, 'planner_weights_gib', '.2f'):>11} "
              f"{f(r, 'planner_total_gib', '.1f'):>9} {f(r, 'measured_max_gpu_gib', '.1f'):>9} "
              f"{f(r, 'memory_err', '+.1%'):>6} {f(r, 'planner_kv_blocks', 'd'):>11} "
              f"{f(r, 'measured_kv_blocks', 'd'):>11} {f(r, 'kv_blocks_err', '+.1%'):>6}"
              + (f"  {r['planner']}" if "planner" in r else ""))
    print("GiB per GPU: the planner's largest stage vs nvidia-smi's largest GPU after the load; "
          "blocks: KV-cache blocks per rank (log) vs the planner.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the served folder (config.json is enough)")
    p.add_argument("--serve-json", required=True, help="serve_layouts.py --json output")
    p.add_argument("--log-dir", required=True, help="serve_layouts.py --log-dir")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with open(args.serve_json) as fh:
        doc = json.load(fh)
    rows = compare(args.model, doc, args.log_dir)
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
