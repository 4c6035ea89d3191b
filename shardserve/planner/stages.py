"""Which layers each pipeline stage runs: balanced on estimated compute and memory, counting the
embedding (first stage) and the final norm + LM head (last stage), not only the layers.

Each item's cost is its share of the model's compute plus its share of the model's memory:

    cost(i) = flops(i) / total_flops + bytes(i) / total_bytes

The embedding is a lookup (memory, no compute); the LM head is a vocabulary-wide GEMM for every
sampled token (both). A contiguous split minimising the most expensive stage is found exactly
by dynamic programming (at most a few hundred layers and tens of stages). Pipeline parallelism
(issue 6) calls `pipeline_stage_layers`, or `parse_layer_partition` for an explicit
--pp-layer-partition.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardserve.planner.shape import ModelShape
from shardserve.planner.weights import (active_params_per_token, embedding_params,
                                        layer_params, lm_head_params)


def partition_layers(layer_costs: Sequence[float], num_stages: int, first_extra: float = 0.0,
                     last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Split layers into `num_stages` contiguous [start, end) ranges of at least one layer
    each, minimising the largest stage cost (first_extra and last_extra are added to the first
    and last stage). Ties go to the split with the most even layer counts."""
    n = len(layer_costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"Cannot split {n} layers into {num_stages} pipeline stages "
                         "(each stage needs at least one layer).")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(stage: int, start: int, end: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == num_stages - 1 else 0.0)
        return prefix[end] - prefix[start] + extra

    even = n / num_stages
    inf = (float("inf"), float("inf"))
    # best[s][e]: (largest stage cost, unevenness) of stages 0..s covering layers [0, e).
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for e in range(1, n - num_stages + 2):
        best[0][e] = (stage_cost(0, 0, e), abs(e - even))
    for s in range(1, num_stages):
        for e in range(s + 1, n - num_stages + s + 2):
            for b in range(s, e):
                prev = best[s - 1][b]
                if prev[0] == float("inf"):
                    continue
                cand = (max(prev[0], stage_cost(s, b, e)), max(prev[1], abs(e - b - even)))
                if _better(cand, best[s][e]):
                    best[s][e], cut[s][e] = cand, b
    bounds, end = [], n
    for s in range(num_stages - 1, 0, -1):
        start = cut[s][end]
        bounds.append((start, end))
        end = start
    bounds.append((0, end))
    return bounds[::-1]


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    # Costs within a relative 1e-9 are equal, so the evenness tie-break can decide.
    if abs(a[0] - b[0]) > 1e-9 * max(abs(a[0]), abs(b[0]), 1.0):
        return a[0] < b[0]
    return a[1] < b[1]


def stage_costs(shape: ModelShape) -> tuple[list[float], float, float]:
    """(per-layer cost, first-stage extra, last-stage extra) in the combined share above."""
    layer_flops = [2.0 * active_params_per_token(shape, i) for i in range(shape.num_layers)]
    layer_bytes = [float(layer_params(shape, i, 1)) for i in range(shape.num_layers)]
    embed_bytes = float(embedding_params(shape, 1))
    head_bytes = float(shape.hidden_size + lm_head_params(shape, 1, shares_embedding=False))
    head_flops = 2.0 * embedding_params(shape, 1)
    total_flops = sum(layer_flops) + head_flops
    total_bytes = sum(layer_bytes) + embed_bytes + head_bytes
    costs = [f / total_flops + b / total_bytes for f, b in zip(layer_flops, layer_bytes)]
    return costs, embed_bytes / total_bytes, head_flops / total_flops + head_bytes / total_bytes


def pipeline_stage_layers(shape: ModelShape, pp_size: int) -> list[tuple[int, int]]:
    """The default layer range [start, end) of every stage for `pp_size` stages."""
    if pp_size == 1:
        return [(0, shape.num_layers)]
    costs, first, last = stage_costs(shape)
    return partition_layers(costs, pp_size, first, last)


def parse_layer_partition(text: str, num_layers: int, pp_size: int) -> list[tuple[int, int]]:
    """'14,10,8' -> [(0, 14), (14, 24), (24, 32)], checked against the model and pp_size."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--pp-layer-partition is comma-separated layer counts per stage, "
                         f"e.g. '14,10,8', got {text!r}.") from None
    if len(counts) != pp_size or sum(counts) != num_layers or min(counts) < 1:
        # Name the flag and a partition that fits: the user sees this before any rank starts.
        raise ValueError(f"--pp-layer-partition {text!r} must give {pp_size} positive counts "
                         f"(one per pipeline stage) adding up to the model's {num_layers} "
                         f"layers, e.g. {_even_partition(num_layers, pp_size)!r}.")
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


def _even_partition(num_layers: int, pp_size: int) -> str:
    """Layer counts as even as they go, the later stages one smaller: '3,3,2' for 8 over 3."""
    base, extra = divmod(num_layers, pp_size)
    return ",".join(str(base + (stage < extra)) for stage in range(pp_size))


def engine_stage_layers(hf_config, pp_size: int,
                        partition: str | None = None) -> list[tuple[int, int]]:
    """The layer range of every stage the engine runs: `partition` (--pp-layer-partition,
    e.g. "14,10,8") when given, else the balanced default. Raises ValueError for a partition
    that does not fit the model, or more stages than layers."""
    from shardserve.planner.shape import shape_from_config

    shape = shape_from_config(hf_config)
    if partition:
        return parse_layer_partition(partition, shape.num_layers, pp_size)
    return pipeline_stage_layers(shape, pp_size)


def describe_stages(hf_config, bounds: Sequence[tuple[int, int]], tp_size: int,
                    dtype_bytes: int, expert_parallel: bool = False,
                    fp8: bool = False) -> list[str]:
    """One line per stage for the start-up log: its layers, its share of the estimated cost
    (compute + memory, as balanced above) and its weight and KV-cache bytes per TP rank."""
    from shardserve.planner.shape import shape_from_config
    from shardserve.planner.weights import kv_bytes_per_token_layer, stage_weight_bytes

    shape = shape_from_config(hf_config)
    costs, first_extra, last_extra = stage_costs(shape)
    total = sum(costs) + first_extra + last_extra
    lines = []
    for stage, (start, end) in enumerate(bounds):
        first, last = stage == 0, stage == len(bounds) - 1
        cost = sum(costs[start:end]) + (first_extra if first else 0.0) + (last_extra if last else 0.0)
        weights = stage_weight_bytes(shape, tp_size, start, end, first, last, dtype_bytes,
                                     expert_parallel, fp8)
        kv = (end - start) * kv_bytes_per_token_layer(shape, tp_size, dtype_bytes)
        parts = ["embedding"] if first else []
        parts.append(f"layers {start}-{end - 1} ({end - start})")
        if last:
            parts.append("norm + LM head")
        lines.append(f"stage {stage}: {', '.join(parts)}; est. cost {cost / total:.1%}, "
                     f"weights {weights / 2**20:.1f} MiB/rank, KV {kv} B/token/rank")
    return lines
