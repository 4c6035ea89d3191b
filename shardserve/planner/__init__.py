"""The parallel-layout planner: per-GPU memory and a TP/PP/DP recommendation for a model on a
pool of GPUs, from config.json alone (no weights, no torch).

    shape.py         ModelShape from config.json (Llama/Qwen2/Qwen3; MoE and MLA fields)
    weights.py       parameters per TP rank, exactly as the engine's layers allocate them
    memory.py        one GPU: weights, activations, overhead, KV cache, CUDA graphs
    stages.py        the pipeline stage partition (shared with the PP implementation)
    layouts.py       every (TP, PP, DP) layout evaluated, ranked, and the pick's reason
    plan.py          make_plan(shape, PlanRequest) -> Plan (and its JSON)
    report.py        the human table
    auto.py          --tensor-parallel-size auto (and -pp/-dp) at serve time
    cli.py           `shardserve plan`
"""

from shardserve.planner.auto import resolve_auto_parallel
from shardserve.planner.plan import Plan, PlanRequest, make_plan
from shardserve.planner.shape import ModelShape, load_model_shape
from shardserve.planner.stages import parse_layer_partition, partition_layers, pipeline_stage_layers

__all__ = ["ModelShape", "Plan", "PlanRequest", "load_model_shape", "make_plan",
           "parse_layer_partition", "partition_layers", "pipeline_stage_layers",
           "resolve_auto_parallel"]
