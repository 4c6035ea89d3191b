"""`make_plan`: a model and a GPU pool in, every layout's memory and the recommended one out.

`PlanRequest` gathers the inputs (the CLI's flags, or an EngineConfig for `auto`); `Plan`
holds the model summary, the ranked layouts and the reason for the pick, and turns into the
JSON that `shardserve plan --json` prints and `shardserve deploy k8s --plan` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardserve.config import check_kv_cache_dtype
from shardserve.config_defaults import DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE, QUANTIZATION_METHODS
from shardserve.planner.layouts import (GpuPool, LayoutPlan, pick_reason, plan_layouts)
from shardserve.planner.memory import GiB, ServingLimits
from shardserve.planner.shape import ModelShape, dtype_bytes, normalize_dtype
from shardserve.planner.weights import (expert_parallel_layout_note, expert_parallel_problem,
                                        kv_bytes_per_token_layer, total_params)

PLAN_FORMAT_VERSION = 1


@dataclass
class PlanRequest:
    """What to plan for. max_model_len None: the engine's default (the model's
    max_position_embeddings, stretched by RoPE scaling: shape.default_max_model_len); dtype
    'auto': the checkpoint's half type (bfloat16 for float32 checkpoints), as on CUDA."""

    num_gpus: int
    gpu_memory_bytes: int
    gpus_per_node: int | None = None  # None: min(num_gpus, 8)
    max_model_len: int | None = None
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    target_concurrency: int | None = None
    enforce_eager: bool = False
    max_cuda_graph_batch_size: int = DEFAULT_MAX_CUDA_GRAPH_BATCH_SIZE
    mixed_cuda_graphs: bool = True  # the engine's: steps with prompt tokens are graphs too
    kv_cache_dtype: str = "auto"  # the engine's --kv-cache-dtype: fp8 halves the KV bytes
    quantization: str | None = None  # the engine's --quantization: fp8 weights (1 byte + scales)
    enable_expert_parallel: bool = False  # MoE: whole experts per TP rank (layers/moe.py)
    tensor_parallel_size: int | None = None  # pin a dimension; None: search it
    pipeline_parallel_size: int | None = None
    data_parallel_size: int | None = None


@dataclass
class Plan:
    shape: ModelShape
    request: PlanRequest
    pool: GpuPool
    limits: ServingLimits
    dtype: str
    layouts: list[LayoutPlan] = field(default_factory=list)
    reason: str = ""
    warnings: list[str] = field(default_factory=list)  # what the engine would warn about too

    @property
    def best(self) -> LayoutPlan | None:
        return self.layouts[0] if self.layouts and self.layouts[0].feasible else None

    def to_dict(self) -> dict[str, Any]:
        return plan_to_dict(self)


# The engine's --dtype (config.py): fp8 is no model dtype there, only --quantization fp8
# (weights) or --kv-cache-dtype fp8, so a plan at --dtype fp8 would deploy a server that
# refuses to start.
SERVE_DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: str, shape: ModelShape) -> str:
    dtype = normalize_dtype(dtype)
    if dtype != "auto":
        if dtype not in SERVE_DTYPES:
            hint = (" (fp8: --quantization fp8 for the weights, --kv-cache-dtype fp8 for the "
                    "KV cache)" if "8" in dtype else "")
            raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16 (as for "
                             f"`shardserve serve`), got {dtype!r}{hint}.")
        return dtype
    return shape.checkpoint_dtype if shape.checkpoint_dtype in ("float16", "bfloat16") else "bfloat16"


def make_plan(shape: ModelShape, request: PlanRequest) -> Plan:
    if request.num_gpus < 1 or request.gpu_memory_bytes <= 0:
        raise ValueError("Planning needs at least one GPU and a positive GPU memory size.")
    if request.gpu_memory_bytes < GiB:  # '--gpu-memory 80' is 80 bytes, not 80 GiB
        raise ValueError(f"GPU memory of {request.gpu_memory_bytes} bytes is too small to plan "
                         "for; give a unit, e.g. --gpu-memory 80GiB.")
    _check_request(request)
    gpus_per_node = request.gpus_per_node or min(request.num_gpus, 8)
    if request.num_gpus > gpus_per_node and request.num_gpus % gpus_per_node:
        raise ValueError(f"{request.num_gpus} GPUs do not make whole nodes of {gpus_per_node}.")
    dtype = resolve_dtype(request.dtype, shape)
    check_kv_cache_dtype(request.kv_cache_dtype)
    if request.quantization not in (None, *QUANTIZATION_METHODS):
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or "
                         f"left out), got {request.quantization!r}.")
    if request.kv_cache_dtype != "auto" and shape.mla is not None:  # as EngineConfig.resolve()
        raise ValueError(f"kv_cache_dtype={request.kv_cache_dtype!r} is not supported for "
                         "multi-head latent attention models (DeepSeek-V2/V3) yet: their latent "
                         "cache stays in the model's dtype. Use --kv-cache-dtype auto.")
    limits = ServingLimits(
        max_model_len=request.max_model_len or shape.default_max_model_len,
        dtype_bytes=dtype_bytes(dtype), block_size=request.block_size,
        gpu_memory_utilization=request.gpu_memory_utilization,
        max_num_seqs=request.max_num_seqs, max_num_batched_tokens=request.max_num_batched_tokens,
        enforce_eager=request.enforce_eager,
        max_cuda_graph_batch_size=request.max_cuda_graph_batch_size,
        mixed_cuda_graphs=request.mixed_cuda_graphs,
        kv_dtype_bytes=None if request.kv_cache_dtype == "auto" else 1,
        expert_parallel=request.enable_expert_parallel,
        fp8_weights=request.quantization == "fp8")
    pool = GpuPool(request.num_gpus, request.gpu_memory_bytes, min(gpus_per_node, request.num_gpus))
    fixed = {"tp": request.tensor_parallel_size, "pp": request.pipeline_parallel_size,
             "dp": request.data_parallel_size}
    layouts = plan_layouts(shape, pool, limits, request.target_concurrency, fixed)
    plan = Plan(shape, request, pool, limits, dtype, layouts,
                warnings=plan_warnings(shape, limits))
    plan.reason = (pick_reason(layouts, request.target_concurrency) if layouts
                   else _no_candidate_reason(request))
    best = plan.best
    if limits.expert_parallel:  # what the engine will warn about for the recommended layout
        note = expert_parallel_problem(shape) or (
            expert_parallel_layout_note(shape, best.tp, best.dp) if best is not None else None)
        if note:
            plan.warnings.append(note)
    return plan


def _check_request(request: PlanRequest) -> None:
    """The engine's own limits (EngineConfig.resolve()), so a plan never assumes settings that
    `serve` would refuse; each message names the flag to change."""
    positive = {"--max-model-len": request.max_model_len, "--gpus-per-node": request.gpus_per_node,
                "--target-concurrency": request.target_concurrency,
                "--max-num-seqs": request.max_num_seqs,
                "--max-num-batched-tokens": request.max_num_batched_tokens,
                "--tensor-parallel-size": request.tensor_parallel_size,
                "--pipeline-parallel-size": request.pipeline_parallel_size,
                "--data-parallel-size": request.data_parallel_size}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}.")
    if request.block_size < 1 or request.block_size & (request.block_size - 1):
        raise ValueError(f"--block-size must be a power of two, got {request.block_size}.")
    if not 0.0 < request.gpu_memory_utilization <= 1.0:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got "
                         f"{request.gpu_memory_utilization}.")


def plan_warnings(shape: ModelShape, limits: ServingLimits) -> list[str]:
    """The engine's start-up warnings that the plan can foresee (EngineConfig.resolve())."""
    warnings = []
    # Past max_position_embeddings (stretched by RoPE scaling) positions were never trained.
    limit = shape.default_max_model_len
    if limits.max_model_len > limit:
        what = (f"max_position_embeddings {limit}" if limit == shape.max_position_embeddings
                else f"context of {limit} tokens ({shape.rope_type} RoPE scaling)")
        warnings.append(f"max_model_len {limits.max_model_len} is beyond the model's {what}: "
                        "positions past it were never trained and outputs there may be wrong.")
    return warnings


def _no_candidate_reason(request: PlanRequest) -> str:
    """The pinned sizes leave no layout to evaluate: say why instead of an empty table."""
    pinned = [f"{name} {value}" for name, value in (("TP", request.tensor_parallel_size),
                                                    ("PP", request.pipeline_parallel_size),
                                                    ("DP", request.data_parallel_size))
              if value is not None]
    return (f"No layout of {request.num_gpus} GPUs has {' x '.join(pinned)}: TP and PP must "
            f"divide the GPU count and TP x PP x DP must not exceed it; change the GPU count or "
            "the pinned sizes.")


def _stage_dict(s: Any) -> dict[str, Any]:
    return {"stage": s.stage, "layers": [s.start_layer, s.end_layer],
            "weights_bytes": s.weights_bytes, "activation_bytes": s.activation_bytes,
            "overhead_bytes": s.overhead_bytes, "kv_cache_bytes": s.kv_cache_bytes,
            "cuda_graph_bytes": s.cuda_graph_bytes, "usable_bytes": s.usable_bytes,
            "total_bytes": s.total_bytes, "kv_bytes_per_block": s.kv_bytes_per_block}


def _layout_dict(p: LayoutPlan) -> dict[str, Any]:
    return {"tensor_parallel_size": p.tp, "pipeline_parallel_size": p.pp,
            "data_parallel_size": p.dp, "gpus_per_group": p.gpus_per_group,
            "nodes_per_group": p.nodes_per_group, "feasible": p.feasible, "rank": p.rank,
            "num_blocks": p.num_blocks, "kv_tokens_per_replica": p.kv_tokens,
            "max_seqs_per_replica": p.max_seqs_at_max_len, "total_seqs": p.total_seqs,
            "meets_target": p.meets_target, "problems": p.problems, "notes": p.notes,
            "stages": [_stage_dict(s) for s in p.stages]}


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    shape, limits, pool = plan.shape, plan.limits, plan.pool
    best = plan.best
    return {
        "format_version": PLAN_FORMAT_VERSION,
        "model": {"name": shape.name, "model_file": shape.model_file or shape.name,
                  "architecture": shape.architecture,
                  "served_by_engine": shape.served, "num_params": total_params(shape),
                  "num_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
                  "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                  "hidden_size": shape.hidden_size, "vocab_size": shape.vocab_size,
                  "kv_bytes_per_token": shape.num_layers * kv_bytes_per_token_layer(
                      shape, 1, limits.kv_elem_bytes),
                  "moe": shape.moe is not None, "mla": shape.mla is not None},
        "hardware": {"num_gpus": pool.num_gpus, "gpu_memory_bytes": pool.gpu_memory_bytes,
                     "gpus_per_node": pool.gpus_per_node, "num_nodes": pool.num_nodes},
        "serving": {"dtype": plan.dtype, "max_model_len": limits.max_model_len,
                    "block_size": limits.block_size,
                    "gpu_memory_utilization": limits.gpu_memory_utilization,
                    "max_num_seqs": limits.max_num_seqs,
                    "max_num_batched_tokens": limits.max_num_batched_tokens,
                    "enforce_eager": limits.enforce_eager,
                    "max_cuda_graph_batch_size": limits.max_cuda_graph_batch_size,
                    "mixed_cuda_graphs": limits.mixed_cuda_graphs,
                    "kv_cache_dtype": plan.request.kv_cache_dtype,
                    "quantization": plan.request.quantization,
                    "enable_expert_parallel": limits.expert_parallel,
                    "target_concurrency": plan.request.target_concurrency},
        "recommended": _layout_dict(best) if best else None,
        "reason": plan.reason,
        "warnings": list(plan.warnings),
        "layouts": [_layout_dict(p) for p in plan.layouts],
    }
